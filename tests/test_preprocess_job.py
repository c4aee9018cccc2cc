"""The Ray Data preprocessing job end to end: four layouts, S3 output, quarantine, no-op re-run,
resume after an injected failure, fingerprints, checksums, bad outputs. One Ray session (2 CPUs)."""

from __future__ import annotations

import argparse
import os
import shutil

import numpy as np
import pytest

from crossdim import storage
from crossdim.config import ConfigError, PreprocessConfig
from crossdim.data import job, shards
from crossdim.data.formats import get_format
from crossdim.data.formats.base import DataError
from crossdim.data.preprocess import PreprocessPlan, invert_to_original, oriented_grid, preprocess_case
from crossdim.data.synth import write_synthetic

SMALL_3D = {"shape": (24, 20, 12), "spacing": (1.0, 1.2, 2.5)}
SYNTH = {  # (cases, options): small datasets in each real layout
    "msd": (4, dict(channels=2, **SMALL_3D)),
    "brats": (3, SMALL_3D),
    "camus": (2, {"shape": (32, 28)}),  # 2 patients x 4 (view, phase) 2D cases
    "chaos": (3, {"modality": "CT"}),  # DICOM series + PNG masks, CT normalisation
}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def msd_root(tmp_path_factory) -> str:
    return write_synthetic("msd", str(tmp_path_factory.mktemp("raw") / "msd"), cases=4, seed=0, **SYNTH["msd"][1])


def _config(fmt: str, root: str, output: str, **kw) -> PreprocessConfig:
    base = dict(format=fmt, input=root, output=output, concurrency=2, num_folds=3, shard_target_mb=0.02)
    return PreprocessConfig(**{**base, **kw})


def _mtimes(root: str) -> dict[str, int]:
    return {os.path.join(d, n): os.stat(os.path.join(d, n)).st_mtime_ns for d, _, names in os.walk(root) for n in names}


# ----------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("fmt", list(SYNTH))
def test_each_layout_round_trips_through_shards(fmt, ray_local, tmp_path):
    cases, opts = SYNTH[fmt]
    root = write_synthetic(fmt, str(tmp_path / "raw"), cases=cases, seed=1, **opts)
    out = str(tmp_path / "out")
    summary = job.run_preprocess(_config(fmt, root, out), progress=False)
    reader = get_format(fmt)
    info = reader.read_dataset(root)
    manifest = shards.read_manifest(out)
    assert summary["cases_written"] == len(info.cases) == len(manifest["cases"]) and not summary["quarantined"]
    assert summary["shards"] == len(manifest["shards"]) >= 2 and summary["workers"] >= 1
    assert not os.path.exists(os.path.join(out, job.PROGRESS_DIR))
    plan = PreprocessPlan.model_validate(manifest["preprocess"]["plan"])
    assert manifest["dataset"]["spatial_dims"] == info.spatial_dims == plan.spatial_dims
    stored = {c.id: c for c in shards.iter_cases(out)}
    by_id = {c.id: c for c in info.cases}
    for case_id in sorted(stored)[:2]:
        loaded = reader.load_case(by_id[case_id], info)
        image, label, spacing, affine, geometry = preprocess_case(loaded, info, plan)
        got = stored[case_id]
        np.testing.assert_array_equal(got.image, image.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(got.label, label)
        np.testing.assert_allclose(got.affine, affine)
        assert got.spacing == pytest.approx(spacing) and got.geometry == geometry
        back = invert_to_original(got.label, got.geometry)
        own_spacing = oriented_grid(loaded.label.shape, loaded.affine, info.spatial_dims, "RAS")[1]
        assert back.shape == loaded.label.shape
        if np.allclose(own_spacing, plan.target_spacing, atol=1e-4):
            np.testing.assert_array_equal(back, loaded.label)  # exact when no resampling was needed
        else:
            assert (back == loaded.label).mean() > 0.97


def test_manifest_contents_splits_and_statistics(ray_local, tmp_path):
    root = write_synthetic("camus", str(tmp_path / "raw"), cases=3, seed=2, shape=(32, 28))
    job.run_preprocess(_config("camus", root, str(tmp_path / "out"), num_folds=5), progress=False)
    m = shards.read_manifest(str(tmp_path / "out"))
    ids = sorted(c["id"] for c in m["cases"])
    assert len(ids) == 12 and m["quarantined"] == []
    # 3 patients < 5 folds: one fold per patient, a patient's 4 cases in one fold
    assert m["splits"]["num_folds"] == 3 and m["splits"]["requested_folds"] == 5
    for fold in m["splits"]["folds"]:
        assert sorted(fold["train"] + fold["val"]) == ids
        assert len({i.split("_")[0] for i in fold["val"]}) == 1 and len(fold["val"]) == 4
    assert sum(s["num_rows"] for s in m["shards"]) == 12
    assert {c["shard"] for c in m["cases"]} == {s["file"] for s in m["shards"]}
    for entry in m["shards"]:
        assert entry["sha256"] == shards.file_sha256(shards.shard_uri(str(tmp_path / "out"), entry["file"]))
    assert m["dataset"]["modality"] == "US" and m["dataset"]["labels"]["0"]
    assert m["preprocess"]["target_spacing"] == pytest.approx([0.6, 0.5])  # synth CAMUS spacing (all cases)
    stats = m["statistics"]
    assert stats["num_cases"] == 12 and stats["spacing"]["median"] == pytest.approx([0.6, 0.5])
    assert sum(stats["class_frequencies"].values()) == pytest.approx(1.0)
    us = stats["intensity"]["US"]
    assert 0 < us["p00_5"] <= us["p50"] <= us["p99_5"] <= 255 and us["std"] > 0


# ----------------------------------------------------------------------------- S3
def test_output_on_s3_reads_back_and_reruns_as_noop(ray_local, msd_root, tmp_path, moto_s3, capsys):
    uri = moto_s3.uri("datasets/msd")
    summary = job.run_preprocess(_config("msd", msd_root, uri), progress=False)
    assert summary["cases_written"] == 4
    keys = moto_s3.keys("datasets/msd/")
    assert "datasets/msd/manifest.json" in keys and not [k for k in keys if "_progress" in k or ".tmp" in k]
    assert len([k for k in keys if k.endswith(".parquet")]) == summary["shards"]
    local = str(tmp_path / "local")
    job.run_preprocess(_config("msd", msd_root, local), progress=False)
    s3_cases = {c.id: c for c in shards.iter_cases(uri)}
    for case in shards.iter_cases(local):
        np.testing.assert_array_equal(s3_cases[case.id].image, case.image)
    assert sorted(r["id"] for r in shards.open_shards(uri, split="val", fold=0).take_all()) == \
        sorted(shards.read_manifest(uri)["splits"]["folds"][0]["val"])
    client = moto_s3.client()
    # objects, not the "prefix/" markers pyarrow re-creates when the write probe is deleted
    objects = [k for k in keys if not k.endswith("/")]
    etags = {k: client.head_object(Bucket=moto_s3.bucket, Key=k)["ETag"] for k in objects}
    stamps = {k: client.head_object(Bucket=moto_s3.bucket, Key=k)["LastModified"] for k in objects}
    capsys.readouterr()
    again = job.run_preprocess(_config("msd", msd_root, uri), progress=False)
    assert again["up_to_date"] and f"up to date: {uri}" in capsys.readouterr().out
    assert moto_s3.keys("datasets/msd/") == keys
    assert {k: client.head_object(Bucket=moto_s3.bucket, Key=k)["LastModified"] for k in objects} == stamps
    assert {k: client.head_object(Bucket=moto_s3.bucket, Key=k)["ETag"] for k in objects} == etags


# ----------------------------------------------------------------------------- robustness
def test_corrupt_file_is_quarantined_and_the_rest_written(ray_local, msd_root, tmp_path):
    root = str(tmp_path / "raw")
    shutil.copytree(msd_root, root)
    bad = os.path.join(root, "imagesTr", "organ_002.nii.gz")
    with open(bad, "r+b") as handle:
        handle.truncate(os.path.getsize(bad) // 2)
    summary = job.run_preprocess(_config("msd", root, str(tmp_path / "out")), progress=False)
    assert summary["cases_written"] == 3 and [q["id"] for q in summary["quarantined"]] == ["organ_002"]
    reason = summary["quarantined"][0]["reason"]
    assert "organ_002.nii.gz" in reason and "\n" not in reason
    manifest = shards.read_manifest(str(tmp_path / "out"))
    assert manifest["quarantined"] == summary["quarantined"]
    assert sorted(c.id for c in shards.iter_cases(str(tmp_path / "out"))) == ["organ_000", "organ_001", "organ_003"]
    assert all("organ_002" not in f["train"] + f["val"] for f in manifest["splits"]["folds"])


def test_rerun_is_a_noop_and_a_changed_config_rebuilds(ray_local, msd_root, tmp_path, capsys):
    out = str(tmp_path / "out")
    first = job.run_preprocess(_config("msd", msd_root, out), progress=False)
    before = _mtimes(out)
    capsys.readouterr()
    again = job.run_preprocess(_config("msd", msd_root, out), progress=False)
    assert again["up_to_date"] and again["fingerprint"] == first["fingerprint"]
    assert f"up to date: {out} (fingerprint {first['fingerprint'][:16]})" in capsys.readouterr().out
    assert _mtimes(out) == before
    rebuilt = job.run_preprocess(_config("msd", msd_root, out, image_dtype="float32", shard_target_mb=1.0),
                                 progress=False)
    assert "rebuilding" in capsys.readouterr().out
    assert rebuilt["fingerprint"] != first["fingerprint"] and not rebuilt["up_to_date"]
    assert rebuilt["shards"] == 1 and os.listdir(os.path.join(out, "shards")) == ["shard-00000.parquet"]
    assert next(shards.iter_cases(out)).image.dtype == np.float32


def test_resume_after_injected_failure_keeps_completed_shards(ray_local, msd_root, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    config = _config("msd", msd_root, out)
    monkeypatch.setenv(job.FAIL_AFTER_ENV, "2")
    with pytest.raises(job.InjectedFailure, match="after 2 shard"):
        job.run_preprocess(config, progress=False)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    done = sorted(os.listdir(os.path.join(out, "shards")))
    assert done == ["shard-00000.parquet", "shard-00001.parquet"]
    stamps = {name: os.stat(os.path.join(out, "shards", name)).st_mtime_ns for name in done}
    monkeypatch.delenv(job.FAIL_AFTER_ENV)
    summary = job.run_preprocess(config, progress=False)
    assert summary["shards_reused"] == 2 and summary["shards"] == 4 and summary["cases_written"] == 4
    assert {n: os.stat(os.path.join(out, "shards", n)).st_mtime_ns for n in done} == stamps
    manifest = shards.read_manifest(out)
    assert sorted(c["id"] for c in manifest["cases"]) == [f"organ_{i:03d}" for i in range(4)]
    assert len(list(shards.iter_cases(out))) == 4  # every checksum verifies


def test_two_workers_write_the_same_bytes_as_one_and_reads_check_them(ray_local, msd_root, tmp_path):
    out, serial = str(tmp_path / "out"), str(tmp_path / "serial")
    summary = job.run_preprocess(_config("msd", msd_root, out, concurrency=2), progress=False)
    job.run_preprocess(_config("msd", msd_root, serial, concurrency=1), progress=False)
    # Ray Data's resource budget decides how many of the 2 allowed tasks run at once (seen: 1 or 2)
    assert summary["workers"] >= 1 and summary["shards"] == 4
    two, one = shards.read_manifest(out), shards.read_manifest(serial)
    assert two["fingerprint"] == one["fingerprint"]  # concurrency does not change the output
    assert [(e["file"], e["sha256"]) for e in two["shards"]] == [(e["file"], e["sha256"]) for e in one["shards"]]
    assert two["cases"] == one["cases"] and two["splits"] == one["splits"]
    path = os.path.join(out, "shards", "shard-00001.parquet")
    with open(path, "r+b") as handle:  # flip one bit in the middle of the file
        handle.seek(100)
        byte = handle.read(1)[0]
        handle.seek(100)
        handle.write(bytes([byte ^ 0x01]))
    with pytest.raises(shards.ShardChecksumError, match="shard-00001.parquet"):
        list(shards.iter_cases(out))
    with pytest.raises(shards.ShardChecksumError, match="shard-00001.parquet"):
        shards.open_shards(out)


# ----------------------------------------------------------------------------- fingerprint (no Ray)
def _fingerprint(config: PreprocessConfig) -> str:
    info, cases = job.validate(config)
    return job.dataset_fingerprint(config, info, cases)


def test_fingerprint_is_stable_across_copies_and_tracks_sizes_and_config(msd_root, tmp_path):
    base = _fingerprint(_config("msd", msd_root, str(tmp_path / "o1")))
    copy = str(tmp_path / "copy")
    shutil.copytree(msd_root, copy)
    os.utime(os.path.join(copy, "labelsTr", "organ_001.nii.gz"), (1, 1))  # mtimes do not count
    assert _fingerprint(_config("msd", copy, str(tmp_path / "o2"), concurrency=1)) == base
    assert _fingerprint(_config("msd", copy, str(tmp_path / "o2"), target_spacing=[1, 1, 1])) != base
    with open(os.path.join(copy, "labelsTr", "organ_001.nii.gz"), "ab") as handle:
        handle.write(b"\0")
    assert _fingerprint(_config("msd", copy, str(tmp_path / "o2"))) != base


# ----------------------------------------------------------------------------- validation (no Ray)
def test_bad_output_uris_fail_early_with_one_line_and_write_nothing(msd_root, tmp_path, moto_s3, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(storage.StorageError, match=f"{blocker}/out") as err:
        job.run_preprocess(_config("msd", msd_root, str(blocker / "out")), progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(storage.StorageError, match="s3://no-such-bucket-xyz/p") as err:
        job.run_preprocess(_config("msd", msd_root, "s3://no-such-bucket-xyz/p"), progress=False)
    assert "\n" not in str(err.value)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(storage.StorageError, match="no S3 credentials") as err:
        job.run_preprocess(_config("msd", msd_root, moto_s3.uri("p")), progress=False)
    assert moto_s3.keys() == [] and "testing" not in str(err.value)


def test_bad_inputs_fail_before_any_work(tmp_path):
    empty = tmp_path / "empty"
    (empty / "imagesTr").mkdir(parents=True)
    (empty / "dataset.json").write_text('{"modality": {"0": "CT"}, "labels": {"0": "bg"}, "training": []}')
    with pytest.raises(DataError, match="no training cases|no cases found"):
        job.run_preprocess(_config("msd", str(empty), str(tmp_path / "out")), progress=False)
    with pytest.raises(DataError, match="missing: input must be an existing local dataset directory"):
        job.run_preprocess(_config("msd", str(tmp_path / "missing"), str(tmp_path / "out")), progress=False)
    with pytest.raises(ValueError, match="field 'output' is required"):
        job.run_preprocess(PreprocessConfig(format="msd", input=str(empty)), progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_arguments_build_the_config(tmp_path):
    parser = argparse.ArgumentParser()
    job.add_arguments(parser)
    yaml_file = tmp_path / "p.yaml"
    yaml_file.write_text("num_folds: 3\ninput: /from/yaml\n")
    args = parser.parse_args(["--format", "camus", "--input", "/data/camus", "--output", "s3://b/p",
                              "--config", str(yaml_file), "--set", "target_spacing=[0.5,0.5]", "--set", "seed=7"])
    config = job.config_from_args(args)
    assert (config.format, config.input, config.output) == ("camus", "/data/camus", "s3://b/p")
    assert config.num_folds == 3 and config.target_spacing == [0.5, 0.5] and config.seed == 7
    with pytest.raises(ConfigError, match="num_folds"):
        job.config_from_args(parser.parse_args(["--set", "num_folds=1"]))
