"""Shard rows, shard files, manifests and both read paths (pyarrow and Ray Data)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from crossdim.data import shards
from crossdim.data.formats.base import DataError
from crossdim.data.shards import CaseArrays, ShardChecksumError


def _case(case_id: str, seed: int, spatial: tuple[int, ...] = (6, 7, 5), channels: int = 2,
          labelled: bool = True) -> CaseArrays:
    rng = np.random.default_rng(seed)
    affine = np.diag([1.5, 0.8, 2.0, 1.0])
    affine[:3, 3] = rng.normal(size=3)
    return CaseArrays(
        id=case_id,
        image=rng.normal(size=(channels, *spatial)).astype(np.float32),
        label=rng.integers(0, 3, size=spatial, dtype=np.uint8) if labelled else None,
        spacing=(1.5, 0.8, 2.0)[: len(spatial)],
        affine=affine,
        geometry={"original_shape": list(spatial), "source_files": [f"{case_id}.nii.gz"]},
    )


def _write_dataset(uri: str, cases: list[CaseArrays], per_shard: int = 2, dtype: str = "float32") -> dict:
    """A minimal but complete dataset (shards + manifest), as the preprocessing job writes it."""
    records, entries = [], []
    for index in range(0, len(cases), per_shard):
        rows = [shards.encode_case(c, dtype) for c in cases[index : index + per_shard]]
        name = shards.shard_name(index // per_shard)
        entries.append(shards.write_shard(uri, name, rows))
        records += [shards.case_record(r, name) for r in rows]
    manifest = {
        "format_version": shards.FORMAT_VERSION, "fingerprint": "test", "cases": records,
        "quarantined": [], "shards": entries,
        "splits": shards.make_splits([c.id for c in cases], num_folds=2, seed=0),
    }
    shards.write_manifest(uri, manifest)
    return manifest


def test_encode_decode_round_trip_float32_exact_and_float16_rounded():
    case = _case("a", 0)
    back = shards.decode_row(shards.encode_case(case, "float32"))
    assert back.id == "a" and back.image.dtype == np.float32 and back.label.dtype == np.uint8
    np.testing.assert_array_equal(back.image, case.image)
    np.testing.assert_array_equal(back.label, case.label)
    np.testing.assert_array_equal(back.affine, case.affine)
    assert back.spacing == case.spacing and back.geometry == case.geometry
    half = shards.decode_row(shards.encode_case(case, "float16"))
    np.testing.assert_array_equal(half.image, case.image.astype(np.float16).astype(np.float32))
    assert np.abs(half.image - case.image).max() < 5e-3 * max(1.0, np.abs(case.image).max())


def test_keep_dtype_holds_float16_images_with_the_same_values(tmp_path):
    """Training workers keep the stored float16 (half the memory); values equal the float32 decode."""
    case = _case("a", 0)
    row = shards.encode_case(case, "float16")
    kept, widened = shards.decode_row(row, keep_dtype=True), shards.decode_row(row)
    assert kept.image.dtype == np.float16 and widened.image.dtype == np.float32
    assert kept.image.nbytes * 2 == widened.image.nbytes
    np.testing.assert_array_equal(kept.image.astype(np.float32), widened.image)
    _write_dataset(str(tmp_path), [case, _case("b", 1)], dtype="float16")
    assert {c.image.dtype for c in shards.iter_cases(str(tmp_path), keep_dtype=True)} == {np.dtype(np.float16)}
    assert {c.image.dtype for c in shards.iter_cases(str(tmp_path))} == {np.dtype(np.float32)}


def test_encode_rejects_inconsistent_cases_with_a_named_error():
    bad = _case("b", 1)
    bad.label = bad.label[:-1]
    with pytest.raises(ValueError, match="case b: label shape"):
        shards.encode_case(bad)
    with pytest.raises(ValueError, match="image_dtype"):
        shards.encode_case(_case("c", 2), "int8")


def test_decode_rejects_truncated_bytes():
    row = shards.encode_case(_case("t", 3))
    row["image"] = row["image"][:-2]
    with pytest.raises(DataError, match="case t: image: .* bytes do not match"):
        shards.decode_row(row)


def test_unlabelled_2d_case_round_trips():
    case = _case("u", 4, spatial=(9, 11), channels=1, labelled=False)
    row = shards.encode_case(case, "float32")
    assert row["label"] is None and row["label_shape"] is None
    back = shards.decode_row(row)
    assert back.label is None and back.image.shape == (1, 9, 11) and back.spacing == (1.5, 0.8)


def test_shard_file_schema_and_checksum(tmp_path):
    rows = [shards.encode_case(_case(f"c{i}", i)) for i in range(3)]
    entry = shards.write_shard(str(tmp_path), "shard-00000.parquet", rows)
    path = tmp_path / "shards" / "shard-00000.parquet"
    assert entry["num_rows"] == 3 and entry["bytes"] == path.stat().st_size
    assert entry["sha256"] == shards.file_sha256(str(path))
    meta = pq.ParquetFile(path)
    assert meta.schema_arrow.equals(shards.SHARD_SCHEMA, check_metadata=False)
    assert meta.metadata.row_group(0).column(1).compression.lower() == "zstd"
    assert not [p for p in os.listdir(path.parent) if ".tmp" in p]


def test_make_splits_partition_ids_and_are_seeded():
    ids = [f"case{i:02d}" for i in range(11)]
    splits = shards.make_splits(ids, num_folds=5, seed=3)
    assert splits["num_folds"] == 5 and len(splits["folds"]) == 5
    vals = [set(f["val"]) for f in splits["folds"]]
    assert set().union(*vals) == set(ids) and sum(len(v) for v in vals) == len(ids)
    for fold in splits["folds"]:
        assert not set(fold["train"]) & set(fold["val"]) and set(fold["train"]) | set(fold["val"]) == set(ids)
    assert shards.make_splits(list(reversed(ids)), 5, 3) == splits
    assert shards.make_splits(ids, 5, 4) != splits


def test_make_splits_keeps_groups_together_and_caps_folds():
    ids = ["p1_a", "p1_b", "p2_a", "p2_b", "p3_a"]
    groups = {i: i.split("_")[0] for i in ids}
    splits = shards.make_splits(ids, num_folds=5, seed=0, groups=groups)
    assert splits["num_folds"] == 3 and splits["requested_folds"] == 5
    for fold in splits["folds"]:
        assert len({groups[i] for i in fold["val"]}) == 1
    with pytest.raises(DataError, match="need at least 2"):
        shards.make_splits(["only"], 5, 0)


def test_iter_cases_reads_back_all_and_by_split(tmp_path):
    cases = [_case(f"c{i}", i) for i in range(5)]
    manifest = _write_dataset(str(tmp_path), cases)
    got = {c.id: c for c in shards.iter_cases(str(tmp_path))}
    assert sorted(got) == [c.id for c in cases]
    for case in cases:
        np.testing.assert_array_equal(got[case.id].image, case.image)
        np.testing.assert_array_equal(got[case.id].label, case.label)
    val = [c.id for c in shards.iter_cases(str(tmp_path), split="val", fold=1)]
    assert val == sorted(manifest["splits"]["folds"][1]["val"])
    assert [c.id for c in shards.iter_cases(str(tmp_path), ids=["c3"])] == ["c3"]
    with pytest.raises(DataError, match="unknown case id"):
        list(shards.iter_cases(str(tmp_path), ids=["nope"]))
    with pytest.raises(ValueError, match="fold: 7"):
        list(shards.iter_cases(str(tmp_path), split="val", fold=7))


def test_case_sha256_in_manifest_matches_stored_bytes(tmp_path):
    manifest = _write_dataset(str(tmp_path), [_case(f"c{i}", i) for i in range(3)])
    table = pq.read_table(tmp_path / "shards" / "shard-00000.parquet")
    row = table.slice(0, 1).to_pylist()[0]
    assert manifest["cases"][0]["sha256"] == shards.case_sha256(row)
    assert manifest["cases"][0]["shape"] == [6, 7, 5] and manifest["cases"][0]["channels"] == 2


def test_checksum_mismatch_names_the_shard(tmp_path):
    _write_dataset(str(tmp_path), [_case(f"c{i}", i) for i in range(4)])
    path = tmp_path / "shards" / "shard-00001.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardChecksumError, match="shard-00001.parquet: sha256"):
        list(shards.iter_cases(str(tmp_path)))
    # shard 0 is intact: reading only its cases works
    assert [c.id for c in shards.iter_cases(str(tmp_path), ids=["c0", "c1"])] == ["c0", "c1"]
    with pytest.raises(ShardChecksumError, match="shard-00001.parquet"):
        shards.open_shards(str(tmp_path))


def test_read_manifest_errors_are_one_line(tmp_path):
    with pytest.raises(DataError, match="no readable manifest"):
        shards.read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        shards.read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(DataError, match="format_version 99"):
        shards.read_manifest(str(tmp_path))


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_open_shards_rows_decode_like_iter_cases(tmp_path, ray_local):
    cases = [_case(f"c{i}", i) for i in range(5)] + [_case("u", 9, labelled=False)]
    manifest = _write_dataset(str(tmp_path), cases, dtype="float16")
    rows = shards.open_shards(str(tmp_path)).take_all()
    decoded = {r["id"]: shards.decode_row(r) for r in rows}
    plain = {c.id: c for c in shards.iter_cases(str(tmp_path))}
    assert sorted(decoded) == sorted(plain) == sorted(c.id for c in cases)
    for case_id, case in plain.items():
        np.testing.assert_array_equal(decoded[case_id].image, case.image)
        assert (decoded[case_id].label is None) == (case.label is None)
        if case.label is not None:
            np.testing.assert_array_equal(decoded[case_id].label, case.label)
        np.testing.assert_array_equal(decoded[case_id].affine, case.affine)
        assert decoded[case_id].geometry == case.geometry
    train = sorted(r["id"] for r in shards.open_shards(str(tmp_path), split="train", fold=0).take_all())
    assert train == sorted(manifest["splits"]["folds"][0]["train"])
