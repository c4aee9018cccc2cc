"""crossdim evaluate: per-case Dice/HD95 cross-checked against MONAI, reports, MLflow run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from crossdim.data.preprocess import PreprocessPlan
from crossdim.evaluate import add_arguments, best_and_worst, main, run, summary_table
from crossdim.train.targets import TargetSpec
from tests.infer_helpers import (
    _card, blob_volume, log_and_register, plan, stub_model, write_checkpoint, write_shard_dataset,
)

REGIONS = {"body": [1, 2], "blob": [2]}
THRESHOLDS = [0.25, 1.5]  # body: intensity > 0.25 (0.5 inside the body box), blob: > 1.5
SPACING = [1.5, 1.5, 1.5]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSDIM_CACHE_DIR", str(tmp_path / "cache"))


def _regions_card(preprocess: PreprocessPlan) -> dict:
    target = TargetSpec(kind="regions", channel_names=list(REGIONS), regions=REGIONS)
    labels = {"labels": {"0": "background", "1": "body", "2": "blob"}, "regions": REGIONS}
    return _card(preprocess, target, labels, ["MR"], [32, 32, 32], None, "msd", "")


@pytest.fixture
def setup(tmp_path):
    """A stub model 'body > 0.25, blob > 1.5' and 4 cases whose truth blob is shifted by i voxels
    (so Dice falls and HD95 grows with i)."""
    preprocess = plan(target_spacing=SPACING, scheme="none")
    card = _regions_card(preprocess)
    ckpt = write_checkpoint(tmp_path / "ckpt", stub_model(num_classes=2, regions=True, thresholds=THRESHOLDS), card)
    cases = []
    for i in range(4):
        image, truth, affine = blob_volume(oblique=bool(i % 2), seed=i)
        body = (image > 0).astype(np.uint8)
        label = body + np.roll(truth, i, axis=0) * body  # 1 body, 2 (shifted) blob
        cases.append((f"case{i}", image[None], label.astype(np.uint8), affine))
    write_shard_dataset(str(tmp_path / "data"), cases, preprocess, card["dataset"])
    return ckpt, tmp_path / "data"


def _monai_reference(data: Path) -> pd.DataFrame:
    """Per-case figures computed independently: the stub's rule applied to the stored image,
    MONAI metrics called directly."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    from crossdim.data.shards import iter_cases

    rows = []
    for case in iter_cases(str(data)):
        x = torch.from_numpy(case.image[0])
        lab = torch.from_numpy(case.label.astype(np.int64))
        pred = torch.stack([x > THRESHOLDS[0], x > THRESHOLDS[1]])[None].float()
        truth = torch.stack([lab >= 1, lab == 2])[None].float()
        dice = DiceMetric(include_background=True, reduction="none")(pred, truth)[0]
        hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
            pred, truth, spacing=list(case.spacing))[0]
        rows.append({"case_id": case.id, "dice_body": float(dice[0]), "dice_blob": float(dice[1]),
                     "hd95_body": float(hd[0]), "hd95_blob": float(hd[1])})
    return pd.DataFrame(rows)


def test_figures_match_monai_and_reports_are_written(setup, tmp_path):
    ckpt, data = setup
    report = run(str(ckpt), str(data), split=None, output=str(tmp_path / "report"), log_to_mlflow=False)

    expected = _monai_reference(data)
    got = report.per_case.set_index("case_id").loc[expected["case_id"]]
    for column in ("dice_body", "dice_blob", "hd95_body", "hd95_blob"):
        np.testing.assert_allclose(got[column].to_numpy(), expected[column].to_numpy(), rtol=1e-5, atol=1e-5)
    blob = got["dice_blob"].to_numpy()
    assert blob[0] > 0.95 and np.all(np.diff(blob) < 0) and blob[-1] < 0.9  # the shifts are seen
    assert got["hd95_blob"].to_numpy()[-1] > 2.0

    files = {p.name for p in (tmp_path / "report").iterdir()}
    assert files == {"per_case.csv", "per_case.parquet", "summary.csv", "summary.md", "overlay_best.png",
                     "overlay_worst.png"}
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "report" / "per_case.parquet"), report.per_case)
    csv = pd.read_csv(tmp_path / "report" / "per_case.csv")
    np.testing.assert_allclose(csv["dice_blob"], report.per_case["dice_blob"], rtol=1e-6)
    summary = pd.read_csv(tmp_path / "report" / "summary.csv").set_index(["class", "metric"])
    np.testing.assert_allclose(summary.loc[("blob", "dice"), "mean"], expected["dice_blob"].mean(), rtol=1e-5)
    np.testing.assert_allclose(summary.loc[("blob", "dice"), "median"], expected["dice_blob"].median(), rtol=1e-5)
    np.testing.assert_allclose(summary.loc[("blob", "dice"), "std"], expected["dice_blob"].std(ddof=0), rtol=1e-5)
    with Image.open(tmp_path / "report" / "overlay_worst.png") as png:
        assert png.size[0] > 200 and png.size[1] > 100


def test_split_selects_the_fold_cases(setup, tmp_path):
    from crossdim.data.shards import read_manifest, select_ids

    ckpt, data = setup
    report = run(str(ckpt), str(data), split="val", fold=1, log_to_mlflow=False, hd95=False)
    assert sorted(report.per_case["case_id"]) == sorted(select_ids(read_manifest(str(data)), "val", 1))
    assert report.per_case["hd95_blob"].isna().all()
    with pytest.raises(ValueError, match="fold: 5 is out of range"):
        run(str(ckpt), str(data), split="val", fold=5, log_to_mlflow=False)


def test_summary_leaves_undefined_hd95_out_and_ranks_cases():
    from crossdim.evaluate import CaseEvaluation

    table = pd.DataFrame({"case_id": ["a", "b", "c"], "dice_x": [1.0, 0.5, 0.0],
                          "hd95_x": [1.0, 3.0, float("nan")], "mean_dice": [1.0, 0.5, 0.0]})
    summary = summary_table(table, ["x"]).set_index("metric")
    assert summary.loc["hd95", "count"] == 2 and summary.loc["hd95", "mean"] == pytest.approx(2.0)
    assert summary.loc["dice", "median"] == pytest.approx(0.5) and summary.loc["dice", "count"] == 3
    cases = [CaseEvaluation(i, {"x": d}, {"x": 0.0}) for i, d in (("a", 0.7), ("b", float("nan")), ("c", 0.9))]
    ranked = best_and_worst(cases)
    assert (ranked["best"].case_id, ranked["worst"].case_id) == ("c", "b")


@pytest.mark.slow
def test_evaluation_run_is_logged_and_linked_to_the_model_version(setup, tmp_path, local_mlflow, capsys):
    import mlflow
    from mlflow.tracking import MlflowClient


    ckpt, data = setup
    client = MlflowClient(local_mlflow)
    experiment = client.create_experiment("train", artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_experiment("crossdim-evaluation", artifact_location=(tmp_path / "eval-artifacts").as_uri())
    train_run = client.create_run(experiment)
    assert log_and_register(local_mlflow, train_run.info.run_id, ckpt, "blob", "champion") == "1"

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert main(parser.parse_args(["--model", "models:/blob@champion", "--data", str(data), "--split", "all"])) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run_info = client.get_run(printed["run_id"])
    tags = run_info.data.tags
    assert tags["crossdim.model_name"] == "blob" and tags["crossdim.model_version"] == "1"
    assert tags["crossdim.model_uri"] == "models:/blob@champion" and tags["crossdim.data_fingerprint"] == "d" * 16
    assert tags["crossdim.split"] == "all"
    expected = _monai_reference(data)
    assert run_info.data.metrics["dice_blob_mean"] == pytest.approx(expected["dice_blob"].mean(), rel=1e-5)
    artifacts = {f.path for f in client.list_artifacts(printed["run_id"], "evaluation")}
    assert {"evaluation/per_case.parquet", "evaluation/overlay_best.png", "evaluation/summary.md"} <= artifacts
    version = client.get_model_version("blob", "1")
    assert version.tags["crossdim.evaluation.all.fold0"] == printed["run_id"]
    assert mlflow.get_tracking_uri() != ""  # the fluent API was not left pointing elsewhere
