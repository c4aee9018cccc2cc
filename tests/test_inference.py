"""crossdim predict: geometry-preserving inference on every input kind, registry pull + cache,
batch runs with failing cases, and one-line errors."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from crossdim.config import PredictConfig
from crossdim.data.formats.base import DataError
from crossdim.infer.predictor import flip_sets, probabilities_to_labels
from crossdim.infer.registry import RegistryError
from crossdim.inference import add_arguments, load_predictor, main, predict
from crossdim.train.targets import TargetSpec
from tests.infer_helpers import (
    blob_volume, dice, log_and_register, multiclass_card, plan, regions_card, save_nifti, stub_model,
    write_checkpoint, write_shard_dataset,
)

LABELS = {0: "background", 1: "blob"}
THRESHOLD = 1.5  # blob 2.5, body 0.5: the midpoint


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSDIM_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def blob_ckpt(tmp_path) -> Path:
    """3D stub model 'blob = intensity > 1.5', trained on 1.5 mm isotropic (so inference resamples)."""
    card = multiclass_card(plan(target_spacing=[1.5, 1.5, 1.5], scheme="none"), LABELS, ["MR"], [32, 32, 32])
    return write_checkpoint(tmp_path / "ckpt", stub_model(thresholds=[THRESHOLD]), card)


def _labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


# ----------------------------------------------------------------------------- geometry
def test_oblique_anisotropic_nifti_keeps_grid_and_places_labels(tmp_path, blob_ckpt):
    image, truth, affine = blob_volume(shape=(40, 44, 24), spacing=(0.9, 1.3, 2.5), oblique=True)
    scan = save_nifti(tmp_path / "scan.nii.gz", image, affine)
    out = tmp_path / "pred.nii.gz"
    summary = predict(str(blob_ckpt), str(scan), str(out), PredictConfig(tta=True, save_probabilities=True))

    assert summary.succeeded == 1 and summary.results[0].output == str(out)
    written = nib.load(str(out))
    labels = np.asarray(written.dataobj)
    assert labels.shape == image.shape and labels.dtype == np.uint8
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (1, 2)  # input's codes
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(affine)
    assert set(np.unique(labels)) == {0, 1}
    assert dice(labels, truth) >= 0.95  # resampled to 1.5 mm and back, through an oblique affine

    probs = nib.load(str(tmp_path / "pred_probabilities.nii.gz"))
    p = np.asarray(probs.dataobj)
    assert p.shape == (*image.shape, 2) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(p.argmax(-1), labels)
    np.testing.assert_allclose(probs.affine, affine, atol=1e-5)


def test_flip_tta_maps_predictions_back(tmp_path, blob_ckpt):
    """A pointwise model is flip-equivariant: TTA must give the plain prediction (a flip that is
    not undone would mirror the off-centre blob)."""
    image, truth, affine = blob_volume(oblique=False)
    scan = save_nifti(tmp_path / "scan.nii.gz", image, affine)
    predictor = load_predictor(str(blob_ckpt), PredictConfig(tta=True, save_probabilities=True))
    with_tta = predictor.predict(image[None], affine)
    predictor.config = PredictConfig(tta=False, save_probabilities=True)
    plain = predictor.predict(image[None], affine)
    assert len(flip_sets(3)) == 8
    np.testing.assert_allclose(with_tta.probabilities, plain.probabilities, atol=1e-5)
    assert dice(with_tta.labels, truth) >= 0.95 and scan.exists()


def test_dicom_series_input(tmp_path, blob_ckpt):
    from crossdim.data.formats.chaos import read_series
    from crossdim.data.synth import DicomSeries, write_dicom_series

    image, truth, affine = blob_volume(shape=(36, 40, 20), spacing=(0.8, 0.8, 3.0), oblique=True, seed=1)
    series = tmp_path / "series"
    write_dicom_series(str(series), np.round(image * 1000).astype(np.uint16), affine,
                       DicomSeries(modality="MR", patient="p1", key="k1", rescale=(1.0, 0.0), descending=True),
                       np.random.default_rng(0))
    card = multiclass_card(plan(target_spacing=[1.5, 1.5, 1.5], scheme="none"), LABELS, ["MR"], [32, 32, 32])
    ckpt = write_checkpoint(tmp_path / "ckpt_dcm", stub_model(thresholds=[THRESHOLD * 1000]), card)

    predict(str(ckpt), str(series), str(tmp_path / "out"))
    written = nib.load(str(tmp_path / "out" / "series.nii.gz"))
    reference, _ = read_series(str(series))
    assert written.shape == reference.array.shape == image.shape
    np.testing.assert_allclose(written.affine, reference.affine, atol=1e-4)
    np.testing.assert_allclose(written.affine, affine, atol=1e-3)
    assert dice(np.asarray(written.dataobj), truth) >= 0.95


def test_omnianet_style_2d_window_predicts_3d_slice_by_slice(tmp_path):
    image, truth, affine = blob_volume(oblique=True, seed=2)
    scan = save_nifti(tmp_path / "scan.nii", image, affine)  # uncompressed NIfTI too
    card = multiclass_card(plan(target_spacing=[1.2, 1.2, 2.0], scheme="none"), LABELS, ["MR"], [32, 32],
                           slice_axis=2)
    ckpt = write_checkpoint(tmp_path / "ckpt2d", stub_model(thresholds=[THRESHOLD], spatial_dims=2), card)
    predict(str(ckpt), str(scan), str(tmp_path / "pred.nii.gz"))  # the stub rejects non-2D input
    written = nib.load(str(tmp_path / "pred.nii.gz"))
    assert written.shape == image.shape
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    assert dice(np.asarray(written.dataobj), truth) >= 0.95


def test_real_omnianet_on_2d_mhd_keeps_grid(tmp_path):
    from crossdim.data.formats.io import read_itk
    from crossdim.models import create_model

    rng = np.random.default_rng(0)
    array = rng.normal(100, 20, size=(50, 60)).astype(np.float32)  # (x, y)
    itk = sitk.GetImageFromArray(array.T)  # ITK arrays are (y, x)
    itk.SetSpacing((0.7, 0.4))
    itk.SetOrigin((10.0, -5.0))
    itk.SetDirection((0.0, 1.0, 1.0, 0.0))  # axes swapped: a non-trivial orientation
    path = tmp_path / "echo.mhd"
    sitk.WriteImage(itk, str(path))
    model = create_model("omnianet", encoder="test_efficientnet", in_channels=1, num_classes=3).eval()
    card = multiclass_card(plan(spatial_dims=2, target_spacing=[0.5, 0.5]), {0: "bg", 1: "lv", 3: "myo"},
                           ["US"], [32, 32], fmt="camus")
    ckpt = write_checkpoint(tmp_path / "ckpt_omnia", model, card)
    predict(str(ckpt), str(path), str(tmp_path / "out"))
    written = nib.load(str(tmp_path / "out" / "echo.nii.gz"))
    reference = read_itk(str(path))
    assert written.shape == array.shape
    np.testing.assert_allclose(written.affine[:2, [0, 1, 3]], reference.affine[:2, [0, 1, 3]], atol=1e-5)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 3}  # raw label values, not indices


@pytest.mark.parametrize("convention", ["brats2021", "brats2023"])
def test_brats_case_folder_channels_and_label_convention(tmp_path, convention):
    from crossdim.data.synth import write_brats

    naming = convention[-4:]
    root = write_brats(str(tmp_path / "brats"), 2, seed=3, naming=naming)
    case_dir = Path(root) / sorted(os.listdir(root))[0]
    thresholds = [800.0, 500.0, 700.0]  # ET <- channel 0, TC <- channel 1, WT <- channel 2 (model order)
    card = regions_card(plan(channels=4, scheme="none"), convention, [32, 32, 32])
    model = stub_model(in_channels=4, num_classes=3, regions=True, thresholds=thresholds)
    ckpt = write_checkpoint(tmp_path / "ckpt_brats", model, card)
    predict(str(ckpt), str(case_dir), str(tmp_path / "out"))

    out = np.asarray(nib.load(str(tmp_path / "out" / f"{case_dir.name}.nii.gz")).dataobj)
    names = card["dataset"]["channel_names"]  # model order, not the folder's alphabetical order
    raw = [np.asarray(nib.load(str(case_dir / f"{case_dir.name}{'_' if naming == '2021' else '-'}{n}.nii.gz")).dataobj)
           for n in names]
    et_value = 4 if convention == "brats2021" else 3
    expected = np.zeros(out.shape, np.uint8)
    expected[raw[2] > thresholds[2]] = 2  # WT paints edema
    expected[raw[1] > thresholds[1]] = 1  # TC paints the core
    expected[raw[0] > thresholds[0]] = et_value
    assert set(np.unique(out)) <= {0, 1, 2, et_value} and (out == et_value).any()
    np.testing.assert_array_equal(out, expected)

    # the same channels as one 4D NIfTI (MSD style, channels last, in model order)
    affine = nib.load(str(case_dir / f"{case_dir.name}{'_' if naming == '2021' else '-'}{names[0]}.nii.gz")).affine
    stacked = save_nifti(tmp_path / "stacked.nii.gz", np.stack(raw, -1).astype(np.float32), affine)
    predict(str(ckpt), str(stacked), str(tmp_path / "stacked_pred.nii.gz"))
    np.testing.assert_array_equal(_labels(tmp_path / "stacked_pred.nii.gz"), expected)

    # the whole dataset folder: listed by the BraTS reader, one output per case
    summary = predict(str(ckpt), root, str(tmp_path / "all"))
    assert (summary.total, summary.failed) == (2, 0)
    assert sorted(p.name for p in (tmp_path / "all").glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in os.listdir(root))
    np.testing.assert_array_equal(_labels(tmp_path / "all" / f"{case_dir.name}.nii.gz"), expected)


@pytest.mark.parametrize("convention", ["brats2021", "brats2023"])
def test_regions_to_label_values(convention):
    et = 4 if convention == "brats2021" else 3
    spec = TargetSpec(kind="regions", channel_names=["ET", "TC", "WT"],
                      regions={"ET": [et], "TC": [1, et], "WT": [1, 2, et]})
    # voxels: background, edema only, core (TC + WT), enhancing (all three)
    probs = np.array([[0.1, 0.2, 0.3, 0.9], [0.1, 0.2, 0.8, 0.9], [0.2, 0.7, 0.9, 0.95]])
    np.testing.assert_array_equal(probabilities_to_labels(probs, spec), [0, 2, 1, et])
    multi = TargetSpec(kind="multiclass", channel_names=["bg", "a", "b"], label_values=[0, 1, 4])
    np.testing.assert_array_equal(probabilities_to_labels(np.array([[0.6, 0.1, 0.2], [0.3, 0.8, 0.1],
                                                                      [0.1, 0.1, 0.7]]), multi), [0, 1, 4])


# ----------------------------------------------------------------------------- other inputs
def test_shard_dataset_input_is_written_on_the_original_grid(tmp_path, blob_ckpt):
    cases = []
    for i in range(3):
        image, truth, affine = blob_volume(oblique=bool(i % 2), seed=i)
        cases.append((f"case{i}", image[None], truth, affine))
    card = json.loads((blob_ckpt / "dataset.json").read_text())
    write_shard_dataset(str(tmp_path / "shards"), cases, plan(target_spacing=[1.5, 1.5, 1.5], scheme="none"),
                        card["dataset"])
    summary = predict(str(blob_ckpt), str(tmp_path / "shards"), str(tmp_path / "out"))
    assert (summary.total, summary.failed) == (3, 0)
    for case_id, image, truth, affine in cases:
        written = nib.load(str(tmp_path / "out" / f"{case_id}.nii.gz"))
        assert written.shape == truth.shape
        np.testing.assert_allclose(written.affine, affine, atol=1e-5)
        assert dice(np.asarray(written.dataobj), truth) >= 0.95


def _batch_dir(tmp_path: Path, count: int, corrupt: int | None) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path / "batch"
    folder.mkdir()
    truths = {}
    for i in range(count):
        image, truth, affine = blob_volume(oblique=True, seed=10 + i)
        path = save_nifti(folder / f"scan{i}.nii.gz", image, affine)
        truths[f"scan{i}"] = truth
        if i == corrupt:
            path.write_bytes(path.read_bytes()[:300])  # truncated gzip stream
    return folder, truths


def test_batch_with_a_corrupt_case_finishes_the_others(tmp_path, blob_ckpt):
    folder, truths = _batch_dir(tmp_path, 3, corrupt=1)
    summary = predict(str(blob_ckpt), str(folder), str(tmp_path / "out"))
    assert (summary.total, summary.succeeded, summary.failed) == (3, 2, 1)
    failures = json.loads((tmp_path / "out" / "failures.json").read_text())
    assert [f["id"] for f in failures] == ["scan1"]
    assert "scan1.nii.gz" in failures[0]["error"] and "\n" not in failures[0]["error"]
    report = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (report["succeeded"], report["failed"]) == (2, 1)
    assert not (tmp_path / "out" / "scan1.nii.gz").exists()
    for case_id in ("scan0", "scan2"):
        assert dice(_labels(tmp_path / "out" / f"{case_id}.nii.gz"), truths[case_id]) >= 0.95


@pytest.mark.slow
def test_batch_on_ray_with_a_corrupt_case(tmp_path, blob_ckpt, capsys):
    import ray

    folder, truths = _batch_dir(tmp_path, 3, corrupt=0)
    repo = str(Path(__file__).resolve().parents[1])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,  # workers build the stub model too
             runtime_env={"env_vars": {"PYTHONPATH": repo},
                          "worker_process_setup_hook": "tests.infer_helpers.register_stub"})
    try:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args(["--model", str(blob_ckpt), "--input", str(folder), "--output",
                                  str(tmp_path / "out"), "--workers", "1"])
        assert main(args) == 3  # non-zero: a case failed
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        # shard rows on Ray actors: decoded there and inverted onto their original grid
        image, truth, affine = blob_volume(oblique=True, seed=21)
        card = json.loads((blob_ckpt / "dataset.json").read_text())
        write_shard_dataset(str(tmp_path / "shards"), [("a", image[None], truth, affine), ("b", image[None], truth, affine)],
                            plan(target_spacing=[1.5, 1.5, 1.5], scheme="none"), card["dataset"])
        shard_summary = predict(str(blob_ckpt), str(tmp_path / "shards"), str(tmp_path / "shard_out"), workers=1)
    finally:
        ray.shutdown()
    assert (shard_summary.total, shard_summary.failed) == (2, 0)
    written = nib.load(str(tmp_path / "shard_out" / "b.nii.gz"))
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    assert dice(np.asarray(written.dataobj), truth) >= 0.95
    assert (printed["total"], printed["succeeded"], printed["failed"]) == (3, 2, 1)
    failures = json.loads((tmp_path / "out" / "failures.json").read_text())
    assert [f["id"] for f in failures] == ["scan0"] and "unreadable NIfTI" in failures[0]["error"]
    for case_id in ("scan1", "scan2"):
        assert dice(_labels(tmp_path / "out" / f"{case_id}.nii.gz"), truths[case_id]) >= 0.95


# ----------------------------------------------------------------------------- errors
def _one_line_error(exc_type, call, *needles):
    with pytest.raises(exc_type) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_channel_mismatch_names_file_and_counts(tmp_path, blob_ckpt):
    image, _, affine = blob_volume(oblique=False)
    one = save_nifti(tmp_path / "one.nii.gz", image, affine)
    two = save_nifti(tmp_path / "two.nii.gz", np.stack([image, image], -1), affine)
    card = regions_card(plan(channels=4, scheme="none"), "brats2021", [32, 32, 32])
    four_ckpt = write_checkpoint(tmp_path / "ckpt4", stub_model(in_channels=4, num_classes=3, regions=True), card)
    _one_line_error(DataError, lambda: predict(str(four_ckpt), str(one), str(tmp_path / "a.nii.gz")),
                    str(one), "1 channel(s), the model expects 4 (flair, t1, t1ce, t2)")
    _one_line_error(DataError, lambda: predict(str(blob_ckpt), str(two), str(tmp_path / "b.nii.gz")),
                    str(two), "2 channel(s), the model expects 1")
    predictor = load_predictor(str(four_ckpt))
    _one_line_error(DataError, lambda: predictor.predict(image[None], affine, where="array"),
                    "array: 1 channel(s), the model expects 4")


def test_bad_inputs_are_one_line_errors(tmp_path, blob_ckpt):
    image, _, affine = blob_volume(oblique=False)
    broken = save_nifti(tmp_path / "broken.nii.gz", image, affine)
    broken.write_bytes(broken.read_bytes()[:200])
    _one_line_error(DataError, lambda: predict(str(blob_ckpt), str(broken), str(tmp_path / "o.nii.gz")),
                    str(broken), "unreadable NIfTI")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    _one_line_error(DataError, lambda: predict(str(blob_ckpt), str(text), str(tmp_path / "o.nii.gz")),
                    str(text), "unsupported input file type")
    _one_line_error(DataError, lambda: predict(str(blob_ckpt), str(tmp_path / "nope"), str(tmp_path / "o")),
                    "input does not exist")
    _one_line_error(ValueError, lambda: load_predictor(str(tmp_path)), "no crossdim checkpoint")
    _one_line_error(ValueError, lambda: load_predictor("s3:/bucket"), "not a directory, s3:// URI or MLflow model URI")


def test_unreachable_registry_is_a_one_line_error(monkeypatch):
    from tests.servers import free_port

    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    _one_line_error(RegistryError, lambda: load_predictor("models:/brats@champion"), url, "unreachable")


# ----------------------------------------------------------------------------- the registry
@pytest.mark.slow
def test_pull_by_alias_from_mlflow_server_with_cache_and_verification(tmp_path, blob_ckpt, mlflow_server, moto_s3):
    from crossdim.infer.pull import CACHE_RECORD, cache_root
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    run = client.create_run(client.create_experiment("infer-test"))
    assert log_and_register(mlflow_server, run.info.run_id, blob_ckpt, "blob", "champion") == "1"

    first = load_predictor("models:/blob@champion")
    assert (first.source.name, first.source.version, first.source.cached) == ("blob", "1", False)
    assert Path(first.source.directory).is_relative_to(cache_root())
    assert (Path(first.source.directory) / "dataset.json").is_file()
    again = load_predictor("models:/blob/1")
    assert again.source.cached and again.source.directory == first.source.directory

    weights = Path(first.source.directory) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # tamper with the cached copy
    repaired = load_predictor("models:/blob@champion")
    assert not repaired.source.cached
    record = json.loads((cache_root() / Path(first.source.directory).relative_to(cache_root()).parts[0]
                         / CACHE_RECORD).read_text())
    assert record["pinned"].endswith("models:/blob/1")

    _one_line_error(RegistryError, lambda: load_predictor("models:/blob@staging"), "no alias 'staging'")
    _one_line_error(RegistryError, lambda: load_predictor("models:/blob/5"), "has no version 5")
    _one_line_error(RegistryError, lambda: load_predictor("models:/nothing@champion"), "no registered model named 'nothing'")

    # CLI path with the alias, outputs on S3
    image, truth, affine = blob_volume(oblique=True, seed=7)
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(2):
        save_nifti(folder / f"s{i}.nii.gz", image, affine)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert main(parser.parse_args(["--model", "models:/blob@champion", "--input", str(folder),
                                   "--output", moto_s3.uri("preds")])) == 0
    assert moto_s3.keys("preds") == ["preds/s0.nii.gz", "preds/s1.nii.gz", "preds/summary.json"]
    body = moto_s3.client().get_object(Bucket=moto_s3.bucket, Key="preds/s1.nii.gz")["Body"].read()
    local = tmp_path / "s1.nii.gz"
    local.write_bytes(body)
    assert dice(_labels(local), truth) >= 0.95
