"""The preprocessing job: raw dataset -> checksummed Parquet shards + manifest (Ray Data on CPUs).

    run_preprocess(PreprocessConfig(format="msd", input="/data/Task04", output="s3://b/task04"))

1. Validate before any work: config fields, format, output writable, input lists >= 1 case.
2. Fingerprint = sha256 of (input files' names relative to the input root + sizes, the dataset
   description, the output-affecting config, PIPELINE_VERSION). Modification times are left out on
   purpose, so a copy of the dataset elsewhere has the same fingerprint. A manifest with the same
   fingerprint (and its shards present) makes the run a no-op that says so; a different one rebuilds.
3. Plan: a Ray Data pass over up to `plan_sample_cases` evenly spread cases measures spacing/shape
   and CT foreground intensities (`preprocess.fit_plan`); cases are then assigned to shards by
   sorted id, `cases_per_shard` from the estimated preprocessed size. Plan and assignment are kept
   in `<output>/_progress/plan.json`, so a resumed job uses exactly the same shards.
4. One Ray Data pipeline loads + preprocesses every case of the pending shards (`concurrency` tasks
   in flight, order preserved); the driver writes each shard as soon as its cases are in (temp name
   + rename, or one S3 PUT) and then `_progress/<shard>.json` (sha256, case records, quarantine,
   statistics). A case that fails to load or preprocess is quarantined with a one-line reason.
   On resume, a shard whose progress record matches the fingerprint and whose file still has the
   recorded sha256 is not redone.
5. `manifest.json` is written last, atomically; then stale shards and `_progress/` are removed.

Splits: seeded k-fold over the written cases, cases of one patient in one fold; fewer patients than
`num_folds` -> one fold per patient (the manifest records `num_folds` and `requested_folds`);
fewer than 2 -> DataError.

Failure injection (tests): CROSSDIM_FAIL_AFTER_SHARDS=N raises after N shards were written by this run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import crossdim
from crossdim import storage
from crossdim.config import PreprocessConfig, load_config
from crossdim.data import shards
from crossdim.data.formats import get_format
from crossdim.data.formats.base import Case, DataError, DatasetInfo
from crossdim.data.preprocess import PreprocessPlan, case_fingerprint, fit_plan, preprocess_case, resampled_shape

PIPELINE_VERSION = 1  # bump when preprocessing changes its output for the same plan
PROGRESS_DIR = "_progress"
FAIL_AFTER_ENV = "CROSSDIM_FAIL_AFTER_SHARDS"
STATS_SAMPLE = 1000  # foreground voxels per channel and case kept for dataset percentiles
# config fields that do not change the output (left out of the fingerprint)
RUNTIME_FIELDS = {"input", "output", "concurrency"}


class InjectedFailure(RuntimeError):
    """Raised by the CROSSDIM_FAIL_AFTER_SHARDS test hook."""


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `crossdim preprocess` / `python -m pipelines.preprocess`."""
    parser.add_argument("--format", choices=("msd", "brats", "camus", "chaos"), help="dataset layout")
    parser.add_argument("--input", help="raw dataset directory")
    parser.add_argument("--output", help="output URI: a local directory or s3://bucket/prefix")
    parser.add_argument("--config", help="YAML file with PreprocessConfig fields")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (repeatable), e.g. --set target_spacing=[1,1,1]")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    """YAML (--config), then --set overrides, then --format/--input/--output when given."""
    config = load_config(PreprocessConfig, args.config, list(args.overrides or []))
    for name in ("format", "input", "output"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(config, name, value)
    return config


def main(args: argparse.Namespace) -> int:
    run_preprocess(config_from_args(args), progress=getattr(args, "progress", True))
    return 0


# ----------------------------------------------------------------------------- the job
def run_preprocess(config: PreprocessConfig, progress: bool = True) -> dict[str, Any]:
    """Preprocess `config.input` into shards + manifest at `config.output`; returns the summary."""
    started = time.time()
    info, cases = validate(config)
    fingerprint = dataset_fingerprint(config, info, cases)
    output = str(config.output)
    previous = _previous_manifest(output)
    if previous is not None and previous.get("fingerprint") == fingerprint and _shards_intact(output, previous):
        _say(f"up to date: {output} (fingerprint {fingerprint[:16]})")
        return _summary(previous, output, started, up_to_date=True, reused=len(previous["shards"]))
    if previous is not None:
        old = str(previous.get("fingerprint"))
        why = ("shard files missing or changed" if old == fingerprint
               else f"fingerprint changed ({old[:16]} -> {fingerprint[:16]})")
        _say(f"rebuilding {output}: {why}")
        storage.delete(storage.join(output, shards.MANIFEST_NAME))
    state = load_or_fit_plan(config, info, cases, fingerprint)
    run = process_shards(config, info, state, fingerprint, progress)
    manifest = build_manifest(config, info, cases, state, run.records, fingerprint)
    shards.write_manifest(output, manifest)
    _cleanup(output, manifest)
    summary = _summary(manifest, output, started, up_to_date=False, reused=run.reused)
    summary["workers"] = len(run.workers)
    _say(_summary_text(summary))
    return summary


def validate(config: PreprocessConfig) -> tuple[DatasetInfo, list[Case]]:
    """Every check that can fail before work: fields, format, cases present, output writable."""
    for name in ("format", "input", "output"):
        if not getattr(config, name):
            raise ValueError(f"preprocess config: field '{name}' is required (--{name})")
    reader = get_format(str(config.format))
    if storage.is_s3(str(config.input)) or not os.path.isdir(str(config.input)):
        raise DataError(f"{config.input}: input must be an existing local dataset directory")
    info = reader.read_dataset(str(config.input))
    cases = sorted(info.cases, key=lambda c: c.id)[: config.max_cases]
    if not cases:
        raise DataError(f"{config.input}: no cases found ({config.format} layout)")
    storage.check_writable(str(config.output))
    return info, cases


def _say(text: str) -> None:
    print(f"[crossdim preprocess] {text}", flush=True)


# ----------------------------------------------------------------------------- fingerprint
def dataset_fingerprint(config: PreprocessConfig, info: DatasetInfo, cases: Sequence[Case]) -> str:
    """sha256 over input file names (relative to the input root) + sizes, dataset description and config."""
    root = os.path.abspath(str(config.input))
    files = [[case.id, [entry for path in (*dict.fromkeys(case.images), case.label) if path
                        for entry in _file_entries(path, root)]] for case in cases]
    payload = {
        "pipeline_version": PIPELINE_VERSION,
        "shard_format_version": shards.FORMAT_VERSION,
        "dataset": _dataset_description(info),
        "config": config.model_dump(mode="json", exclude=RUNTIME_FIELDS),
        "files": files,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _file_entries(path: str, root: str) -> list[list[Any]]:
    """[[relative name, size], ...] for a file or every file below a directory (DICOM series)."""
    if os.path.isdir(path):
        found = sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names)
        return [[os.path.relpath(p, root), os.path.getsize(p)] for p in found]
    size = os.path.getsize(path) if os.path.exists(path) else -1
    return [[os.path.relpath(os.path.abspath(path), root), size]]


def _dataset_description(info: DatasetInfo) -> dict[str, Any]:
    return {
        "format": info.format, "name": info.name, "modality": info.modality,
        "channel_names": list(info.channel_names), "channel_modalities": list(info.channel_modalities),
        "labels": {str(k): v for k, v in sorted(info.labels.items())}, "regions": dict(info.regions),
        "spatial_dims": info.spatial_dims, "label_convention": info.label_convention,
    }


def _previous_manifest(output: str) -> dict[str, Any] | None:
    if not storage.exists(storage.join(output, shards.MANIFEST_NAME)):
        return None
    try:
        return shards.read_manifest(output)
    except DataError:
        return None


def _shards_intact(output: str, manifest: dict[str, Any]) -> bool:
    """Cheap check for the no-op path: every shard file exists with its recorded size."""
    for entry in manifest.get("shards", []):
        fs, path = storage.filesystem(shards.shard_uri(output, entry["file"]))
        if fs.get_file_info(path).size != entry["bytes"]:
            return False
    return True


# ----------------------------------------------------------------------------- plan + assignment
def load_or_fit_plan(config: PreprocessConfig, info: DatasetInfo, cases: Sequence[Case],
                     fingerprint: str) -> dict[str, Any]:
    """{"fingerprint", "plan", "shards": [[ids]], ...}: from `_progress/plan.json` if it matches, else fitted."""
    uri = storage.join(str(config.output), PROGRESS_DIR, "plan.json")
    if storage.exists(uri):
        state = json.loads(storage.read_text(uri))
        if state.get("fingerprint") == fingerprint:
            _say(f"resuming with the recorded plan ({len(state['shards'])} shards)")
            return state
    state = fit_state(config, info, cases, fingerprint)
    storage.write_text(uri, json.dumps(state))
    return state


def fit_state(config: PreprocessConfig, info: DatasetInfo, cases: Sequence[Case], fingerprint: str) -> dict[str, Any]:
    sample = sample_cases(cases, config.plan_sample_cases)
    rows = _ray_map([{"id": c.id} for c in sample], _fingerprint_item,
                    {"info": info, "orientation": config.orientation}, config.concurrency)
    fingerprints = [json.loads(r["fingerprint"]) for r in rows if r["fingerprint"]]
    plan = fit_plan(info, fingerprints, target_spacing=config.target_spacing, orientation=config.orientation,
                    normalization=config.normalization, ct_percentiles=config.ct_percentiles,
                    crop_foreground=config.crop_foreground, image_dtype=config.image_dtype)
    case_bytes = estimate_case_bytes(fingerprints, plan)
    per_shard = max(1, int(config.shard_target_mb * 1e6 // max(case_bytes, 1)))
    ids = [c.id for c in cases]
    return {
        "fingerprint": fingerprint, "plan": plan.model_dump(mode="json"),
        "plan_cases": [f["id"] for f in fingerprints], "estimated_case_bytes": case_bytes,
        "cases_per_shard": per_shard,
        "shards": [ids[i : i + per_shard] for i in range(0, len(ids), per_shard)],
    }


def sample_cases(cases: Sequence[Case], count: int) -> list[Case]:
    """Up to `count` cases evenly spread over the sorted list (deterministic)."""
    if len(cases) <= count:
        return list(cases)
    return [cases[i * len(cases) // count] for i in range(count)]


def estimate_case_bytes(fingerprints: Sequence[dict[str, Any]], plan: PreprocessPlan) -> int:
    """Mean uncompressed row size (image + label) after resampling, from the plan's sample."""
    itemsize = np.dtype(plan.image_dtype).itemsize
    sizes = [int(np.prod(resampled_shape(f["shape"], f["spacing"], plan.target_spacing)))
             * (f["channels"] * itemsize + 1) for f in fingerprints]
    return int(np.mean(sizes)) if sizes else 1


def _fingerprint_item(item: dict[str, Any], info: DatasetInfo, orientation: str) -> dict[str, Any]:
    case = _case_by_id(info, item["id"])
    try:
        loaded = get_format(info.format).load_case(case, info)
        return {"id": case.id, "fingerprint": json.dumps(case_fingerprint(loaded, info, orientation))}
    except Exception:  # noqa: BLE001 - an unreadable case is left out of the plan (quarantined later)
        return {"id": case.id, "fingerprint": ""}


def _case_by_id(info: DatasetInfo, case_id: str) -> Case:
    return next(c for c in info.cases if c.id == case_id)


# ----------------------------------------------------------------------------- shards
@dataclass
class ShardRun:
    records: list[dict[str, Any]]  # one progress record per shard, in shard order
    reused: int  # shards found done (resume)
    workers: set[str] = field(default_factory=set)  # "host:pid" of the processes that preprocessed cases


def process_shards(config: PreprocessConfig, info: DatasetInfo, state: dict[str, Any], fingerprint: str,
                   progress: bool) -> ShardRun:
    """Write every shard not already done (resume: verified progress records are kept)."""
    output = str(config.output)
    records: dict[int, dict[str, Any]] = {}
    for index in range(len(state["shards"])):
        record = _done_record(output, index, fingerprint)
        if record is not None:
            records[index] = record
    reused = len(records)
    pending = [i for i in range(len(state["shards"])) if i not in records]
    if reused:
        _say(f"{reused} shard(s) already done, {len(pending)} to go")
    fail_after = int(os.environ.get(FAIL_AFTER_ENV, "0") or 0)
    written, workers = 0, set()
    for index, results in _shard_results(config, info, state, pending, progress):
        records[index] = write_shard_results(output, index, results, fingerprint, config.compression)
        workers |= {r["worker"] for r in results}
        written += 1
        if progress:
            _say(_shard_line(records[index], written, len(pending)))
        if fail_after and written >= fail_after:
            raise InjectedFailure(f"{FAIL_AFTER_ENV}={fail_after}: injected failure after {written} shard(s)")
    return ShardRun([records[i] for i in range(len(state["shards"]))], reused, workers)


def _shard_results(config: PreprocessConfig, info: DatasetInfo, state: dict[str, Any], pending: Sequence[int],
                   progress: bool) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """(shard index, its case results) as soon as all cases of a shard came out of Ray Data."""
    items = [{"id": case_id, "shard": index} for index in pending for case_id in state["shards"][index]]
    if not items:
        return
    expected = {index: len(state["shards"][index]) for index in pending}
    buffers: dict[int, list[dict[str, Any]]] = {index: [] for index in pending}
    kwargs = {"info": info, "plan": PreprocessPlan.model_validate(state["plan"])}
    for row in _ray_map(items, _process_item, kwargs, config.concurrency, progress):
        index = int(row["shard"])
        buffers[index].append(_plain_row(row))
        if len(buffers[index]) == expected[index]:
            yield index, sorted(buffers.pop(index), key=lambda r: r["id"])


def _ray_map(items: list[dict[str, Any]], fn: Any, fn_kwargs: dict[str, Any], concurrency: int | None,
             progress: bool = False) -> Iterator[dict[str, Any]]:
    """`fn` over `items` on Ray Data CPU tasks (one case per block), streamed back in order."""
    import ray.data

    with _data_context(progress):
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        compute = ray.data.TaskPoolStrategy(size=concurrency)
        yield from ds.map(fn, fn_kwargs=fn_kwargs, compute=compute).iter_rows()


@contextmanager
def _data_context(progress: bool) -> Iterator[None]:
    """Order-preserving execution (bounded driver memory, shards finish in order) while the job runs."""
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars)
    context.execution_options.preserve_order, context.enable_progress_bars = True, progress
    try:
        yield
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved


def _process_item(item: dict[str, Any], info: DatasetInfo, plan: PreprocessPlan) -> dict[str, Any]:
    """One case on a Ray worker -> an encoded shard row, or a quarantine record (`reason`)."""
    case = _case_by_id(info, item["id"])
    out: dict[str, Any] = {"id": case.id, "shard": item["shard"], "reason": "", "stats": "",
                           "worker": f"{socket.gethostname()}:{os.getpid()}"}
    out.update({name: None for name in shards.SHARD_SCHEMA.names if name != "id"})
    try:
        loaded = get_format(info.format).load_case(case, info)
        image, label, spacing, affine, geometry = preprocess_case(loaded, info, plan)
        arrays = shards.CaseArrays(case.id, image, label, spacing, affine, geometry)
        out.update(shards.encode_case(arrays, plan.image_dtype))
        out["stats"] = json.dumps(case_statistics(loaded.image, loaded.label, label, geometry))
    except Exception as exc:  # noqa: BLE001 - any failure quarantines this case, never the job
        out["reason"] = quarantine_reason(case, exc)
    return out


def quarantine_reason(case: Case, exc: BaseException) -> str:
    """One line naming the file: readers' DataErrors already do; others get the case's first file."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    files = [p for p in (*case.images, case.label) if p]
    if not any(os.path.basename(p) in text for p in files):
        text = f"{files[0] if files else case.id}: {type(exc).__name__}: {text}"
    return text[:400]


def case_statistics(raw_image: np.ndarray, raw_label: np.ndarray | None, label: np.ndarray | None,
                    geometry: dict[str, Any]) -> dict[str, Any]:
    """Per-case statistics (JSON-able): raw foreground intensity moments + sample per channel,
    original spacing, class voxel counts of the stored label."""
    mask = raw_label > 0 if raw_label is not None and raw_label.any() else (raw_image != 0).any(axis=0)
    rng = np.random.default_rng(0)
    channels = []
    for channel in raw_image:
        values = channel[mask].astype(np.float64)
        sample = values if values.size <= STATS_SAMPLE else rng.choice(values, STATS_SAMPLE, replace=False)
        channels.append({"n": int(values.size), "sum": float(values.sum()), "sumsq": float((values**2).sum()),
                         "sample": [round(float(v), 4) for v in sample]})
    classes = {} if label is None else {str(int(v)): int(n) for v, n in zip(*np.unique(label, return_counts=True))}
    return {"spacing": geometry["original_spacing"], "channels": channels, "classes": classes}


def _plain_row(row: Any) -> dict[str, Any]:
    """A Ray Data row -> plain Python values (list columns may arrive as numpy arrays)."""
    out = dict(row)
    for name in ("image_shape", "label_shape", "spacing", "affine"):
        if out.get(name) is not None:
            out[name] = [v.item() if hasattr(v, "item") else v for v in out[name]]
    return out


def write_shard_results(output: str, index: int, results: Sequence[dict[str, Any]], fingerprint: str,
                        compression: str) -> dict[str, Any]:
    """Write a shard (if any case succeeded), then its progress record; returns the record."""
    name = shards.shard_name(index)
    good = [r for r in results if not r["reason"]]
    rows = [{k: r[k] for k in shards.SHARD_SCHEMA.names} for r in good]
    entry = shards.write_shard(output, name, rows, compression) if rows else None
    record = {
        "fingerprint": fingerprint, "index": index, "entry": entry,
        "cases": [shards.case_record(row, name) for row in rows],
        "quarantined": [{"id": r["id"], "reason": r["reason"]} for r in results if r["reason"]],
        "stats": {r["id"]: json.loads(r["stats"]) for r in good},
    }
    storage.write_text(_progress_uri(output, index), json.dumps(record))
    return record


def _progress_uri(output: str, index: int) -> str:
    return storage.join(output, PROGRESS_DIR, shards.shard_name(index).replace(".parquet", ".json"))


def _done_record(output: str, index: int, fingerprint: str) -> dict[str, Any] | None:
    """The progress record of a finished shard, if it matches the fingerprint and the file's sha256."""
    uri = _progress_uri(output, index)
    if not storage.exists(uri):
        return None
    try:
        record = json.loads(storage.read_text(uri))
    except json.JSONDecodeError:
        return None
    if record.get("fingerprint") != fingerprint:
        return None
    entry = record.get("entry")
    if entry is not None:
        target = shards.shard_uri(output, entry["file"])
        if not storage.exists(target) or shards.file_sha256(target) != entry["sha256"]:
            return None
    return record


def _shard_line(record: dict[str, Any], done: int, total: int) -> str:
    entry = record["entry"] or {"file": shards.shard_name(record["index"]), "bytes": 0}
    return (f"{entry['file']}: {len(record['cases'])} case(s), {len(record['quarantined'])} quarantined, "
            f"{_size(entry['bytes'])} ({done}/{total})")


# ----------------------------------------------------------------------------- manifest
def build_manifest(config: PreprocessConfig, info: DatasetInfo, cases: Sequence[Case], state: dict[str, Any],
                   records: Sequence[dict[str, Any]], fingerprint: str) -> dict[str, Any]:
    case_records = [c for r in records for c in r["cases"]]
    groups = {c.id: dict(c.extra).get("patient", c.id) for c in cases}
    stats = {k: v for r in records for k, v in r["stats"].items()}
    resolved = config.model_dump(mode="json", exclude={"output"})
    resolved.update(target_spacing=state["plan"]["target_spacing"], requested_target_spacing=config.target_spacing,
                    plan=state["plan"], plan_cases=state["plan_cases"], cases_per_shard=state["cases_per_shard"])
    return {
        "format_version": shards.FORMAT_VERSION,
        "fingerprint": fingerprint,
        "fingerprint_basis": "input file names relative to the input root + sizes (no mtimes), dataset "
                             "description, preprocessing config, pipeline version",
        "cases": case_records,
        "quarantined": [q for r in records for q in r["quarantined"]],
        "splits": shards.make_splits([c["id"] for c in case_records], config.num_folds, config.seed, groups),
        "shards": [r["entry"] for r in records if r["entry"] is not None],
        "dataset": _dataset_description(info),
        "preprocess": resolved,
        "statistics": dataset_statistics(stats, state["plan"]["target_spacing"], info),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "crossdim_version": crossdim.__version__,
    }


def dataset_statistics(stats: dict[str, dict[str, Any]], target_spacing: list[float] | None,
                       info: DatasetInfo) -> dict[str, Any]:
    """Aggregate per-case statistics: spacings, raw foreground intensities, class voxel fractions."""
    spacings = np.array([s["spacing"] for s in stats.values()]) if stats else np.zeros((0, info.spatial_dims))
    classes: dict[str, int] = {}
    for s in stats.values():
        for value, count in s["classes"].items():
            classes[value] = classes.get(value, 0) + count
    total = sum(classes.values()) or 1
    return {
        "num_cases": len(stats),
        "spacing": {"median": _col(spacings, np.median), "min": _col(spacings, np.min), "max": _col(spacings, np.max),
                    "target": target_spacing},
        "intensity": {name: _intensity([s["channels"][c] for s in stats.values()])
                      for c, name in enumerate(info.channel_names)},
        "intensity_basis": "raw intensities over foreground voxels (label > 0, else non-zero); "
                           f"percentiles from up to {STATS_SAMPLE} sampled voxels per case",
        "class_frequencies": {value: classes[value] / total for value in sorted(classes, key=int)},
    }


def _col(values: np.ndarray, fn: Any) -> list[float] | None:
    return [float(v) for v in fn(values, axis=0)] if len(values) else None


def _intensity(channels: Sequence[dict[str, Any]]) -> dict[str, float] | None:
    n = sum(c["n"] for c in channels)
    if n == 0:
        return None
    mean = sum(c["sum"] for c in channels) / n
    var = max(sum(c["sumsq"] for c in channels) / n - mean**2, 0.0)
    sample = np.concatenate([np.asarray(c["sample"], dtype=np.float64) for c in channels])
    p = np.percentile(sample, [0.5, 50, 99.5])
    return {"mean": mean, "std": var**0.5, "min_sampled": float(sample.min()), "max_sampled": float(sample.max()),
            "p00_5": float(p[0]), "p50": float(p[1]), "p99_5": float(p[2])}


def _cleanup(output: str, manifest: dict[str, Any]) -> None:
    """After the manifest: drop shard files it does not list (an older build) and the progress records."""
    keep = {e["file"] for e in manifest["shards"]}
    for uri in storage.list_files(storage.join(output, shards.SHARDS_DIR)):
        if uri.rsplit("/", 1)[-1] not in keep:
            storage.delete(uri)
    storage.delete(storage.join(output, PROGRESS_DIR))  # recursive; on S3 also its directory marker


# ----------------------------------------------------------------------------- summary
def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.1f} MB" if num_bytes >= 1e6 else f"{num_bytes / 1e3:.1f} kB"


def _summary(manifest: dict[str, Any], output: str, started: float, up_to_date: bool, reused: int) -> dict[str, Any]:
    return {
        "output": output,
        "fingerprint": manifest["fingerprint"],
        "up_to_date": up_to_date,
        "cases_written": len(manifest["cases"]),
        "quarantined": list(manifest["quarantined"]),
        "shards": len(manifest["shards"]),
        "shards_reused": reused,
        "bytes": sum(e["bytes"] for e in manifest["shards"]),
        "seconds": round(time.time() - started, 2),
        "workers": 0,
    }


def _summary_text(summary: dict[str, Any]) -> str:
    lines = [f"wrote {summary['cases_written']} case(s) in {summary['shards']} shard(s), "
             f"{_size(summary['bytes'])}, {len(summary['quarantined'])} quarantined, "
             f"{summary['seconds']:.1f} s -> {summary['output']}"]
    lines += [f"  quarantined {q['id']}: {q['reason']}" for q in summary["quarantined"]]
    return "\n".join(lines)
