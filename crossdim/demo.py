"""`crossdim demo` / `make demo`: the main job end to end on embedded defaults.

synthetic BraTS-layout data -> Ray Data preprocessing into local shards -> DX-Net (tiny timm
encoder inflated to 3D) on 2 Ray Train workers, tracked in a local sqlite MLflow store -> model
registered with an alias -> pulled back by alias -> prediction of a held-out case -> its Dice.

A second run reuses what is there: the raw data, the shards (the preprocessing job is a no-op),
and the registered model (pass --retrain to train again).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEMO_MODEL_NAME = "crossdim-demo-dxnet"
DEMO_ALIAS = "champion"
DEMO_CASES = 10
HELDOUT_SEED = 1234

# The embedded training defaults (configs/demo.yaml holds the same values for `crossdim train`).
DEMO_TRAIN: dict[str, Any] = {
    "name": "crossdim-demo",
    "model": {"arch": "dxnet", "encoder": "test_efficientnet", "options": {"stem_channels": 8, "decoder_channels": [64, 32, 16, 16, 8]}},
    "data": {"patch_size": [32, 32, 16], "batch_size": 2, "foreground_ratio": 0.5},
    "optim": {"name": "adamw", "lr": 3e-3, "schedule": "cosine"},
    "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
    "validation": {"every": 2, "sw_batch_size": 2, "hd95": False},
    "epochs": 6,
    "steps_per_epoch": 12,
}


@dataclass
class DemoPaths:
    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "raw" / "brats"

    @property
    def heldout(self) -> Path:
        return self.root / "raw" / "heldout"

    @property
    def shards(self) -> Path:
        return self.root / "shards" / "brats"

    @property
    def results(self) -> Path:
        return self.root / "ray_results"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"


def step(number: int, text: str) -> None:
    print(f"\n[{number}/6] {text}", flush=True)


def write_data(paths: DemoPaths) -> None:
    from crossdim.data.synth import write_synthetic

    if _has_cases(paths.raw, DEMO_CASES) and _has_cases(paths.heldout, 1):
        print(f"  reusing synthetic data in {paths.raw}")
        return
    write_synthetic("brats", str(paths.raw), DEMO_CASES, seed=0)
    write_synthetic("brats", str(paths.heldout), 1, seed=HELDOUT_SEED)
    print(f"  wrote {DEMO_CASES} training cases to {paths.raw} and 1 held-out case to {paths.heldout}")


def _has_cases(folder: Path, count: int) -> bool:
    return folder.is_dir() and len([p for p in folder.iterdir() if p.is_dir()]) >= count


def preprocess(paths: DemoPaths) -> dict[str, Any]:
    from crossdim.config import PreprocessConfig
    from crossdim.data.job import run_preprocess

    config = PreprocessConfig(format="brats", input=str(paths.raw), output=str(paths.shards), num_folds=5)
    return run_preprocess(config)


def train(paths: DemoPaths, retrain: bool, overrides: list[str] | None = None) -> str:
    """Train and register; returns the registered model URI (by alias)."""
    from crossdim.config import TrainConfig, deep_merge, load_config
    from crossdim.train import run

    model_uri = f"models:/{DEMO_MODEL_NAME}@{DEMO_ALIAS}"
    if not retrain and alias_version(DEMO_MODEL_NAME, DEMO_ALIAS, paths.tracking_uri) is not None:
        print(f"  reusing {model_uri} (pass --retrain to train again)")
        return model_uri
    name = DEMO_TRAIN["name"] + (time.strftime("-%Y%m%d-%H%M%S") if retrain else "")
    config = load_config(TrainConfig, None, overrides, base=deep_merge(DEMO_TRAIN, {
        "name": name,
        "storage_path": str(paths.results),
        "data": {"manifest": str(paths.shards)},
        "tracking": {"tracking_uri": paths.tracking_uri, "experiment": "crossdim-demo",
                     "registered_model_name": DEMO_MODEL_NAME, "alias": DEMO_ALIAS},
    }))
    result = run(config)
    print(f"  trained {result.epochs_completed} epochs; best val_dice {_fmt(result.best_val_dice)} "
          f"(epoch {result.best_epoch}); registered {DEMO_MODEL_NAME} version {result.registered_version}")
    return model_uri


def alias_version(name: str, alias: str, tracking_uri: str) -> str | None:
    """The version holding `alias`, or None when the model or the alias does not exist yet."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient(tracking_uri=tracking_uri).get_model_version_by_alias(name, alias).version
    except MlflowException:
        return None


def predict_heldout(paths: DemoPaths, model_uri: str) -> tuple[Path, Path]:
    from crossdim.inference import predict

    case_dir = sorted(p for p in paths.heldout.iterdir() if p.is_dir())[0]
    output = paths.predictions / f"{case_dir.name}.nii.gz"
    predict(model_uri, str(case_dir), str(output))
    print(f"  predicted {case_dir.name} -> {output}")
    return case_dir, output


def region_dice(truth_file: Path, prediction_file: Path) -> dict[str, float]:
    """Dice of the BraTS regions (2021 labels: ET={4}, TC={1,4}, WT={1,2,4}) on the input's grid."""
    import nibabel as nib

    truth = np.asarray(nib.load(str(truth_file)).dataobj)
    pred = np.asarray(nib.load(str(prediction_file)).dataobj)
    if truth.shape != pred.shape:
        raise ValueError(f"{prediction_file}: shape {pred.shape} differs from the input's {truth.shape}")
    regions = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}
    return {name: _dice(np.isin(truth, v), np.isin(pred, v)) for name, v in regions.items()}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(a, b).sum() / denom)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run_demo(workdir: str = "crossdim-demo", retrain: bool = False, overrides: list[str] | None = None) -> dict[str, float]:
    started = time.perf_counter()
    paths = DemoPaths(Path(workdir).resolve())
    paths.root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # The demo's registry is its own sqlite store: the pull by alias below reads it too.
    os.environ["MLFLOW_TRACKING_URI"] = paths.tracking_uri
    step(1, "synthetic BraTS-layout dataset")
    write_data(paths)
    step(2, "preprocessing with Ray Data into checksummed Parquet shards")
    preprocess(paths)
    step(3, "training DX-Net (test_efficientnet inflated to 3D) on 2 Ray Train workers")
    model_uri = train(paths, retrain, overrides)
    step(4, f"pulling {model_uri} from the registry and predicting the held-out case")
    case_dir, output = predict_heldout(paths, model_uri)
    step(5, "scoring the prediction against the held-out truth")
    truth = next(case_dir.glob("*_seg.nii.gz"))
    dice = region_dice(truth, output)
    print("  held-out Dice: " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items())
          + f" (mean {np.mean(list(dice.values())):.3f})")
    step(6, "where everything is")
    print(f"  raw data     {paths.raw}\n  shards       {paths.shards}\n  checkpoints  {paths.results}\n"
          f"  prediction   {output}\n  model        {model_uri}  (tracking {paths.tracking_uri})\n"
          f"  MLflow UI    mlflow ui --backend-store-uri {paths.tracking_uri} --host 127.0.0.1 --port 5000")
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
    return dice


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default=os.environ.get("CROSSDIM_DEMO_DIR", "crossdim-demo"),
                        help="where the demo writes data, shards, checkpoints, MLflow store (default ./crossdim-demo)")
    parser.add_argument("--retrain", action="store_true", help="train a new model even if one is registered")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training field of the embedded defaults, e.g. --set epochs=2")


def main(args: argparse.Namespace) -> int:
    run_demo(args.workdir, args.retrain, args.overrides)
    return 0
