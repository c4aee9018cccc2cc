"""`crossdim evaluate`: score a registered model on one split of a preprocessed (shard) dataset.

    report = run("models:/brats_dxnet@champion", "s3://bucket/brats_pre", split="val", fold=0)

Per case and class (BraTS: ET/TC/WT regions; else every non-background class): Dice (MONAI
`DiceMetric`; empty truth and empty prediction score 1) and HD95 in mm (MONAI
`HausdorffDistanceMetric`, percentile 95, from the case spacing; undefined -> NaN when the truth
or the prediction is empty). Scored on the preprocessed grid the labels are stored on, with the
same sliding window / TTA settings as `crossdim predict`.

Outputs (`output` folder, local or s3://, default a temporary folder): `per_case.csv`,
`per_case.parquet`, `summary.csv` (mean/median/std/count per class and metric), `summary.md`,
`overlay_best.png`, `overlay_worst.png` (the cases with the highest and lowest mean Dice). With
`log_to_mlflow` the same files go into an evaluation run (experiment `crossdim-evaluation`)
tagged with the model name/version/URI and the data URI/fingerprint/split/fold; its metrics are
linked to the model version's logged model, and the model version gets a tag pointing back at
the run.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from crossdim import storage
from crossdim.config import PredictConfig

EXPERIMENT = "crossdim-evaluation"
REPORT_FILES = ("per_case.csv", "per_case.parquet", "summary.csv", "summary.md")


@dataclass
class CaseEvaluation:
    case_id: str
    dice: dict[str, float]
    hd95: dict[str, float]
    overlay: Any = None  # crossdim.train.validation.Overlay (one slice, for the pictures)

    @property
    def mean_dice(self) -> float:
        values = [v for v in self.dice.values() if math.isfinite(v)]
        return float(np.mean(values)) if values else float("nan")


@dataclass
class EvaluationReport:
    model_uri: str
    data_uri: str
    split: str | None
    fold: int
    per_case: pd.DataFrame
    summary: pd.DataFrame
    output: str
    files: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None
    skipped: list[str] = field(default_factory=list)  # cases without a label


# ----------------------------------------------------------------------------- scoring (pure-ish)
def prediction_masks(probs: torch.Tensor, spec: Any) -> torch.Tensor:
    """Probabilities (1, K, *S) -> boolean masks (1, K, *S): regions > 0.5, multi-class argmax one-hot."""
    if spec.kind == "regions":
        return probs > 0.5
    index = probs.argmax(1)
    return torch.stack([index == k for k in range(probs.shape[1])], 1)


def truth_masks(label: np.ndarray, spec: Any) -> torch.Tensor:
    """Raw label map (*S) -> boolean masks (1, K, *S) in the order of `spec.channel_names` (pure).

    (Ordered by channel name on purpose: a spec read back from JSON written with sorted keys
    has its `regions` dict in alphabetical order, not in output-channel order.)"""
    raw = torch.from_numpy(label.astype(np.int64))
    if spec.kind == "regions":
        chans = [torch.isin(raw, torch.tensor(spec.regions[name])) for name in spec.channel_names]
    else:
        chans = [raw == value for value in spec.label_values]
    return torch.stack(chans)[None]


def score_case(case: Any, probs: np.ndarray, spec: Any, hd95: bool = True) -> CaseEvaluation:
    """Dice/HD95 per scored class of one decoded shard case and its probabilities (K, *S)."""
    from crossdim.train.validation import case_scores, label_index_map, metric_channels, overlay_slice

    pred = metric_channels(prediction_masks(torch.from_numpy(probs)[None], spec), spec)
    truth = metric_channels(truth_masks(case.label, spec), spec)
    dice, hd = case_scores(pred, truth, case.spacing, hd95)
    names = spec.metric_names
    overlay = overlay_slice(case.id, case.image, label_index_map(truth), label_index_map(pred))
    return CaseEvaluation(
        case_id=case.id,
        dice={n: float(dice[i]) for i, n in enumerate(names)},
        hd95={n: float(hd[i]) if hd is not None else float("nan") for i, n in enumerate(names)},
        overlay=overlay,
    )


def per_case_table(cases: list[CaseEvaluation], names: list[str]) -> pd.DataFrame:
    rows = []
    for case in cases:
        row: dict[str, Any] = {"case_id": case.case_id}
        row.update({f"dice_{n}": case.dice[n] for n in names})
        row.update({f"hd95_{n}": case.hd95[n] for n in names})
        row["mean_dice"] = case.mean_dice
        rows.append(row)
    columns = ["case_id", *[f"dice_{n}" for n in names], *[f"hd95_{n}" for n in names], "mean_dice"]
    return pd.DataFrame(rows, columns=columns)


def summary_table(per_case: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Mean/median/std/count per class and metric, NaN (undefined HD95) left out (pure)."""
    rows = []
    for metric in ("dice", "hd95"):
        for name in names:
            values = per_case[f"{metric}_{name}"].astype(float)
            values = values[np.isfinite(values)]
            rows.append({"class": name, "metric": metric, "mean": values.mean() if len(values) else np.nan,
                         "median": values.median() if len(values) else np.nan,
                         "std": values.std(ddof=0) if len(values) else np.nan, "count": int(len(values))})
    return pd.DataFrame(rows, columns=["class", "metric", "mean", "median", "std", "count"])


def markdown_table(summary: pd.DataFrame) -> str:
    lines = ["| class | metric | mean | median | std | n |", "|---|---|---|---|---|---|"]
    for r in summary.itertuples(index=False):
        lines.append(f"| {r[0]} | {r[1]} | {r[2]:.4f} | {r[3]:.4f} | {r[4]:.4f} | {r[5]} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the run
def run(model_uri: str, data_uri: str, split: str | None = "val", fold: int = 0, *, output: str | None = None,
        config: PredictConfig | None = None, log_to_mlflow: bool = True, hd95: bool = True) -> EvaluationReport:
    """Evaluate `model_uri` on `split` ("train" | "val" | None for all cases) of fold `fold`."""
    from crossdim.data.shards import dataset_root, iter_cases, read_manifest, select_ids
    from crossdim.inference import load_predictor

    root = dataset_root(data_uri)
    manifest = read_manifest(root)
    wanted = select_ids(manifest, split, fold)
    if not wanted:
        raise ValueError(f"{root}: split {split!r} of fold {fold} has no cases")
    predictor = load_predictor(model_uri, config)
    spec = predictor.spec
    evaluated, skipped = [], []
    for n, case in enumerate(iter_cases(root, split=split, fold=fold), 1):
        if case.label is None:
            skipped.append(case.id)
            continue
        evaluated.append(score_case(case, predictor.probabilities(torch.from_numpy(case.image)), spec, hd95))
        print(f"[{n}/{len(wanted)}] {case.id}: mean Dice {evaluated[-1].mean_dice:.4f}", flush=True)
    if not evaluated:
        raise ValueError(f"{root}: no labelled case in split {split!r} of fold {fold}")
    per_case = per_case_table(evaluated, spec.metric_names)
    report = EvaluationReport(model_uri=model_uri, data_uri=root, split=split, fold=fold, per_case=per_case,
                              summary=summary_table(per_case, spec.metric_names),
                              output=output or tempfile.mkdtemp(prefix="crossdim-eval-"), skipped=skipped)
    with tempfile.TemporaryDirectory(prefix="crossdim-eval-") as scratch:
        local = Path(scratch)
        write_report_files(report, evaluated, local)
        if log_to_mlflow:
            report.run_id = log_evaluation(report, predictor.source, manifest, local)
        report.files = publish(local, report.output)
    return report


def write_report_files(report: EvaluationReport, evaluated: list[CaseEvaluation], folder: Path) -> None:
    report.per_case.to_csv(folder / "per_case.csv", index=False)
    report.per_case.to_parquet(folder / "per_case.parquet", index=False)
    report.summary.to_csv(folder / "summary.csv", index=False)
    (folder / "summary.md").write_text(markdown_table(report.summary) + "\n")
    for name, case in best_and_worst(evaluated).items():
        save_overlay(case.overlay, folder / f"overlay_{name}.png", f"{name}: mean Dice {case.mean_dice:.3f}")


def best_and_worst(evaluated: list[CaseEvaluation]) -> dict[str, CaseEvaluation]:
    ranked = sorted(evaluated, key=lambda c: (-np.nan_to_num(c.mean_dice, nan=-1.0), c.case_id))
    return {"best": ranked[0], "worst": ranked[-1]}


def save_overlay(overlay: Any, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    from crossdim.tracking import render_overlay

    fig = render_overlay(overlay)
    try:
        fig.suptitle(title, fontsize=9)
        fig.savefig(path, dpi=80)
    finally:
        plt.close(fig)


def publish(local: Path, output: str) -> dict[str, str]:
    """Copy the report files to `output` (local folder or s3://); returns name -> URI."""
    from crossdim.infer.writers import write_file

    files = {}
    for path in sorted(local.iterdir()):
        uri = storage.join(output, path.name)
        write_file(uri, path.read_bytes())
        files[path.name] = uri
    return files


# ----------------------------------------------------------------------------- MLflow
def evaluation_tags(report: EvaluationReport, source: Any, manifest: dict[str, Any]) -> dict[str, str]:
    from crossdim.tracking import redact_uri

    tags = {
        "crossdim.kind": "evaluation",
        "crossdim.model_uri": redact_uri(report.model_uri),
        "crossdim.data_uri": redact_uri(report.data_uri),
        "crossdim.data_fingerprint": str(manifest.get("fingerprint", "")),
        "crossdim.split": str(report.split or "all"),
        "crossdim.fold": str(report.fold),
    }
    for key, value in (("model_name", source.name), ("model_version", source.version),
                       ("model_run_id", source.run_id)):
        if value:
            tags[f"crossdim.{key}"] = str(value)
    return tags


def summary_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """{"dice_ET_mean": ..., "hd95_ET_median": ..., "dice_mean": ...} with finite values only (pure)."""
    out = {}
    for r in summary.itertuples(index=False):
        for stat, value in (("mean", r[2]), ("median", r[3]), ("std", r[4])):
            if np.isfinite(value):
                out[f"{r[1]}_{r[0]}_{stat}"] = float(value)
    dice_means = summary.loc[summary["metric"] == "dice", "mean"].astype(float)
    if np.isfinite(dice_means).any():
        out["dice_mean"] = float(np.nanmean(dice_means))
    return out


def log_evaluation(report: EvaluationReport, source: Any, manifest: dict[str, Any], folder: Path) -> str:
    """One evaluation run holding the report; linked to the model version both ways."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from crossdim.infer.registry import client as registry_client
    from crossdim.tracking import log_dataset

    client: MlflowClient = registry_client()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
    name = f"eval-{source.name or 'model'}-v{source.version or 'local'}-{report.split or 'all'}-fold{report.fold}"
    run = client.create_run(experiment_id, run_name=name, tags=evaluation_tags(report, source, manifest))
    run_id = run.info.run_id
    model_id = _logged_model_id(client, source)
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0, model_id=model_id) for k, v in summary_metrics(report.summary).items()]
    params = [Param("cases", str(len(report.per_case))), Param("skipped_unlabelled", str(len(report.skipped)))]
    client.log_batch(run_id, metrics=metrics, params=params)
    log_dataset(client, run_id, report.data_uri, manifest)
    client.log_artifacts(run_id, str(folder), artifact_path="evaluation")
    client.set_terminated(run_id)
    if source.name and source.version:
        client.set_model_version_tag(source.name, source.version,
                                     f"crossdim.evaluation.{report.split or 'all'}.fold{report.fold}", run_id)
    return run_id


def _logged_model_id(client: Any, source: Any) -> str | None:
    if not (source.name and source.version):
        return None
    return getattr(client.get_model_version(source.name, source.version), "model_id", None) or None


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="models:/name@alias, models:/name/version, runs:/.., or a dir")
    parser.add_argument("--data", required=True, help="preprocessed dataset (folder or s3:// URI with manifest.json)")
    parser.add_argument("--split", choices=["train", "val", "all"], default="val")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--output", default=None, help="report folder (local or s3://); default: a temp folder")
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-hd95", action="store_true", help="Dice only (HD95 is slow on large volumes)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log an evaluation run")


def main(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from crossdim.config import ConfigError, format_validation_error

    try:
        config = PredictConfig(model=args.model, input=args.data, tta=args.tta, sw_overlap=args.overlap,
                               device=args.device)
    except ValidationError as exc:
        raise ConfigError(f"evaluate arguments: {format_validation_error(exc)}") from None
    report = run(args.model, args.data, None if args.split == "all" else args.split, args.fold,
                 output=args.output, config=config, log_to_mlflow=not args.no_mlflow, hd95=not args.no_hd95)
    print(markdown_table(report.summary))
    print(json.dumps({"cases": len(report.per_case), "output": report.output, "run_id": report.run_id,
                      "files": sorted(report.files)}))
    return 0
