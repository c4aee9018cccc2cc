"""Preprocessed datasets: Parquet shards + `manifest.json` at an output URI (local or s3://).

Layout::

    <uri>/manifest.json                 written last, atomically; the only entry point for readers
    <uri>/shards/shard-00000.parquet    zstd, one row per case (schema: SHARD_SCHEMA)

Row columns: ``id``; ``image`` (C-order raw bytes, ``image_dtype`` float16|float32) with
``image_shape`` = (C, *spatial); ``label`` (uint8 raw bytes, nullable) with ``label_shape``
(*spatial); ``spacing`` (mm per spatial axis, preprocessed grid); ``affine`` (16 floats,
preprocessed voxel -> world RAS mm); ``geometry`` (JSON: what inference needs to invert the
preprocessing, see crossdim.data.preprocess).

Two read paths share `decode_row`: `open_shards` (a Ray Dataset, for Ray Train) and `iter_cases`
(plain pyarrow through crossdim.storage, no Ray). Both check each shard file's sha256 against the
manifest before reading it, unless ``verify=False``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from crossdim import storage
from crossdim.data.formats.base import DataError

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
IMAGE_DTYPES = ("float16", "float32")
_HASH_CHUNK = 8 << 20

SHARD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("image_shape", pa.list_(pa.int32()), nullable=False),
        pa.field("image_dtype", pa.string(), nullable=False),
        pa.field("label", pa.binary(), nullable=True),
        pa.field("label_shape", pa.list_(pa.int32()), nullable=True),
        pa.field("spacing", pa.list_(pa.float64()), nullable=False),
        pa.field("affine", pa.list_(pa.float64()), nullable=False),
        pa.field("geometry", pa.string(), nullable=False),
    ]
)


class ShardChecksumError(DataError):
    """A shard file whose sha256 differs from the manifest (corrupt or replaced)."""


@dataclass
class CaseArrays:
    """One decoded case. `image` float32 (C, *spatial); `label` uint8 (*spatial) or None."""

    id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, ...]
    affine: np.ndarray  # 4x4 float64, preprocessed voxel -> world RAS mm
    geometry: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- rows
def encode_case(case: CaseArrays, image_dtype: str = "float16") -> dict[str, Any]:
    """CaseArrays -> a shard row (the inverse of `decode_row`, up to the image dtype's precision)."""
    if image_dtype not in IMAGE_DTYPES:
        raise ValueError(f"image_dtype: {image_dtype!r} is not one of {', '.join(IMAGE_DTYPES)}")
    image = np.asarray(case.image)
    if image.ndim not in (3, 4):
        raise ValueError(f"case {case.id}: image must be (C, *spatial) with 2 or 3 spatial dims, got {image.shape}")
    spatial = image.shape[1:]
    label = None if case.label is None else np.asarray(case.label)
    if label is not None and label.shape != spatial:
        raise ValueError(f"case {case.id}: label shape {label.shape} != image spatial shape {spatial}")
    affine = np.asarray(case.affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"case {case.id}: affine must be 4x4, got {affine.shape}")
    if len(case.spacing) != len(spatial):
        raise ValueError(f"case {case.id}: spacing {tuple(case.spacing)} does not match {len(spatial)} spatial dims")
    return {
        "id": str(case.id),
        "image": np.ascontiguousarray(image, dtype=image_dtype).tobytes(),
        "image_shape": [int(s) for s in image.shape],
        "image_dtype": image_dtype,
        "label": None if label is None else np.ascontiguousarray(label, dtype=np.uint8).tobytes(),
        "label_shape": None if label is None else [int(s) for s in label.shape],
        "spacing": [float(s) for s in case.spacing],
        "affine": [float(v) for v in affine.reshape(-1)],
        "geometry": json.dumps(case.geometry, sort_keys=True),
    }


def decode_row(row: dict[str, Any], keep_dtype: bool = False) -> CaseArrays:
    """A shard row (from pyarrow `to_pylist` or a Ray Data row/batch slice) -> CaseArrays.

    The image comes back as float32, or with `keep_dtype` in its stored dtype (float16 by default:
    half the memory, for holders such as the training sampler that cast each patch as they cut it).
    """
    case_id = str(row["id"])
    dtype = str(row["image_dtype"])
    if dtype not in IMAGE_DTYPES:
        raise DataError(f"case {case_id}: unknown image_dtype {dtype!r}")
    image_shape = tuple(int(s) for s in row["image_shape"])
    image = _from_bytes(row["image"], dtype, image_shape, f"case {case_id}: image")
    if not keep_dtype:
        image = image.astype(np.float32, copy=False)
    label = None
    if row.get("label") is not None:
        label_shape = tuple(int(s) for s in row["label_shape"])
        label = _from_bytes(row["label"], "uint8", label_shape, f"case {case_id}: label")
    geometry = row["geometry"]
    return CaseArrays(
        id=case_id,
        image=image,
        label=label,
        spacing=tuple(float(s) for s in row["spacing"]),
        affine=np.asarray(row["affine"], dtype=np.float64).reshape(4, 4),
        geometry=json.loads(geometry) if isinstance(geometry, (str, bytes)) else dict(geometry or {}),
    )


def _from_bytes(data: Any, dtype: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    try:
        buf = memoryview(data).cast("B")  # bytes, Arrow buffers, numpy arrays: no copy
    except TypeError:
        buf = memoryview(bytes(data))
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if buf.nbytes != expected:
        raise DataError(f"{what}: {buf.nbytes} bytes do not match shape {shape} ({dtype})")
    return np.frombuffer(buf, dtype=dtype).reshape(shape).copy()


def case_sha256(row: dict[str, Any]) -> str:
    """sha256 of a row's encoded image bytes followed by its label bytes (if any)."""
    h = hashlib.sha256(row["image"])
    if row.get("label") is not None:
        h.update(row["label"])
    return h.hexdigest()


def case_record(row: dict[str, Any], shard_file: str) -> dict[str, Any]:
    """The manifest's `cases[]` entry for an encoded row."""
    shape = list(row["image_shape"])
    return {
        "id": row["id"],
        "shard": shard_file,
        "shape": shape[1:],
        "spacing": list(row["spacing"]),
        "channels": shape[0],
        "has_label": row.get("label") is not None,
        "sha256": case_sha256(row),
    }


# ----------------------------------------------------------------------------- writing
def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def shard_uri(uri: str, name: str) -> str:
    return storage.join(uri, SHARDS_DIR, name)


def encode_shard(rows: Sequence[dict[str, Any]], compression: str = "zstd") -> bytes:
    """Encoded rows -> the bytes of one Parquet file (one row group per case keeps reads light)."""
    table = pa.Table.from_pylist(list(rows), schema=SHARD_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression, row_group_size=1)
    return sink.getvalue().to_pybytes()


def write_shard(uri: str, name: str, rows: Sequence[dict[str, Any]], compression: str = "zstd") -> dict[str, Any]:
    """Write one shard atomically (local: temp name + rename; S3: one PUT). Returns its manifest entry."""
    data = encode_shard(rows, compression)
    storage.write_bytes(shard_uri(uri, name), data)
    return {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "num_rows": len(rows)}


def write_manifest(uri: str, manifest: dict[str, Any]) -> None:
    storage.write_text(storage.join(uri, MANIFEST_NAME), json.dumps(manifest, indent=1, sort_keys=False))


# ----------------------------------------------------------------------------- splits
def make_splits(ids: Sequence[str], num_folds: int, seed: int,
                groups: dict[str, str] | None = None) -> dict[str, Any]:
    """Seeded k-fold over sorted ids (cases of one group, e.g. one patient, share a fold).

    Fewer groups than `num_folds` -> as many folds as groups (recorded in `num_folds`); fewer than
    2 groups cannot be split and raises DataError.
    """
    groups = groups or {}
    keys = sorted({groups.get(i, i) for i in ids})
    if len(keys) < 2:
        raise DataError(f"only {len(keys)} usable case group(s): need at least 2 to make train/val splits")
    k = min(num_folds, len(keys))
    random.Random(seed).shuffle(keys)
    fold_of = {key: n % k for n, key in enumerate(keys)}
    ordered = sorted(ids)
    folds = [
        {"train": [i for i in ordered if fold_of[groups.get(i, i)] != f],
         "val": [i for i in ordered if fold_of[groups.get(i, i)] == f]}
        for f in range(k)
    ]
    return {"num_folds": k, "requested_folds": num_folds, "seed": seed, "folds": folds}


def select_ids(manifest: dict[str, Any], split: str | None = None, fold: int = 0) -> list[str]:
    """Case ids of a split ("train" | "val") of one fold, or all cases (split None), manifest order."""
    all_ids = [c["id"] for c in manifest["cases"]]
    if split is None:
        return all_ids
    if split not in ("train", "val"):
        raise ValueError(f"split: {split!r} must be 'train', 'val' or None")
    folds = manifest.get("splits", {}).get("folds", [])
    if not 0 <= fold < len(folds):
        raise ValueError(f"fold: {fold} is out of range; the manifest has {len(folds)} folds")
    wanted = set(folds[fold][split])
    return [i for i in all_ids if i in wanted]


# ----------------------------------------------------------------------------- reading
def read_manifest(uri: str) -> dict[str, Any]:
    """The manifest of a preprocessed dataset at `uri` (a directory URI, or the manifest.json itself)."""
    path = str(uri) if str(uri).endswith(MANIFEST_NAME) else storage.join(uri, MANIFEST_NAME)
    try:
        text = storage.read_text(path)
    except storage.StorageError as exc:
        raise DataError(f"{path}: no readable manifest; not a preprocessed dataset? ({exc})") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: manifest is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise DataError(f"{path}: unsupported manifest format_version {version!r} (expected {FORMAT_VERSION})")
    return manifest


def dataset_root(uri: str) -> str:
    return str(uri)[: -len(MANIFEST_NAME)].rstrip("/") if str(uri).endswith(MANIFEST_NAME) else str(uri)


def file_sha256(uri: str) -> str:
    """Streamed sha256 of a file URI."""
    fs, path = storage.filesystem(uri)
    h = hashlib.sha256()
    try:
        with fs.open_input_stream(path) as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
    except OSError as exc:
        raise DataError(f"{uri}: cannot read shard ({str(exc).splitlines()[0][:200]})") from None
    return h.hexdigest()


def check_shard_bytes(name: str, data: bytes, expected: str) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ShardChecksumError(f"{name}: sha256 {actual[:12]}... does not match the manifest ({expected[:12]}...)")


def verify_shard(uri: str, entry: dict[str, Any]) -> None:
    actual = file_sha256(shard_uri(uri, entry["file"]))
    if actual != entry["sha256"]:
        raise ShardChecksumError(
            f"{shard_uri(uri, entry['file'])}: sha256 {actual[:12]}... does not match the manifest "
            f"({entry['sha256'][:12]}...)"
        )


def shards_for(manifest: dict[str, Any], ids: Iterable[str]) -> list[dict[str, Any]]:
    """Manifest shard entries holding any of `ids`, in manifest order."""
    ids = set(ids)
    wanted = {c["shard"] for c in manifest["cases"] if c["id"] in ids}
    return [s for s in manifest["shards"] if s["file"] in wanted]


def open_shards(uri: str, split: str | None = None, fold: int = 0, verify: bool = True) -> "ray.data.Dataset":
    """A Ray Dataset of shard rows (decode each with `decode_row`) for one split of one fold.

    With `verify`, every shard file read is checked against the manifest's sha256 first.
    """
    import ray.data
    from ray.data.expressions import col

    root = dataset_root(uri)
    manifest = read_manifest(root)
    ids = select_ids(manifest, split, fold)
    entries = shards_for(manifest, ids)
    if not entries:
        raise DataError(f"{root}: no cases in split {split!r} of fold {fold}")
    if verify:
        for entry in entries:
            verify_shard(root, entry)
    fs, _ = storage.filesystem(root)
    paths = [storage.filesystem(shard_uri(root, e["file"]))[1] for e in entries]
    ds = ray.data.read_parquet(paths, filesystem=fs, file_extensions=["parquet"])
    if split is not None:
        ds = ds.filter(expr=col("id").is_in(ids))
    return ds


def iter_cases(uri: str, ids: Iterable[str] | None = None, split: str | None = None, fold: int = 0,
               verify: bool = True, keep_dtype: bool = False) -> Iterator[CaseArrays]:
    """Decoded cases in manifest order, read with pyarrow through crossdim.storage (no Ray).

    `ids` restricts to those cases (unknown ids raise DataError); `split`/`fold` as in `open_shards`;
    `keep_dtype` as in `decode_row`.
    """
    root = dataset_root(uri)
    manifest = read_manifest(root)
    wanted = select_ids(manifest, split, fold)
    if ids is not None:
        requested = set(ids)
        unknown = sorted(requested - {c["id"] for c in manifest["cases"]})
        if unknown:
            raise DataError(f"{root}: unknown case id(s) {', '.join(unknown[:5])}")
        wanted = [i for i in wanted if i in requested]
    wanted_set = set(wanted)
    for entry in shards_for(manifest, wanted):
        yield from _iter_shard(root, entry, wanted_set, verify, keep_dtype)


def _iter_shard(root: str, entry: dict[str, Any], wanted: set[str], verify: bool,
                keep_dtype: bool) -> Iterator[CaseArrays]:
    name = shard_uri(root, entry["file"])
    data = storage.read_bytes(name)
    if verify:
        check_shard_bytes(name, data, entry["sha256"])
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{name}: not a readable Parquet shard ({exc})") from None
    ids = table.column("id").to_pylist()
    try:
        for index, case_id in enumerate(ids):
            if case_id in wanted:
                yield decode_row(_row(table, index), keep_dtype)
    finally:
        del table, data
        pa.default_memory_pool().release_unused()  # the decoded shard's buffers go back to the OS


def _row(table: pa.Table, index: int) -> dict[str, Any]:
    """Row `index` of a shard table; binary cells as zero-copy Arrow buffers (decode copies them once)."""
    row = {}
    for name, column in zip(table.column_names, table.columns):
        cell = column[index]
        binary = pa.types.is_binary(cell.type) or pa.types.is_large_binary(cell.type)
        row[name] = cell.as_buffer() if binary and cell.is_valid else cell.as_py()
    return row
