"""Benchmark 2 - shards from S3 vs local: the same ingest, shards on a moto S3 endpoint vs a path.

The storage-bound part of the ingest is reading the shards (the sampler then works in memory),
so the goal is on that part, through both readers:
- `iter_cases` (pyarrow through crossdim.storage, sha256-checked): what inference/evaluation use;
- `open_shards` + `iter_rows` + `decode_row` (Ray Data, shards verified against the manifest
  first): what a training worker's `load_cases` does.
Each load is repeated (local and S3 alternating) and the medians compared. The first epoch's
ingest (load + `steps` training-sampler batches) is reported for scale. moto is a local Python
server: it shows the protocol/client overhead, not a real network's latency or bandwidth.
Goal: S3 <= 1.5x local.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict

from bench.common import BenchOptions, Figure, Goal, emit, ensure_ray, median, moto_s3, ratio, say
from bench.data import DatasetSpec, shard_dataset
from bench.ingest import FOREGROUND_RATIO
from bench.ingest import settings as ingest_settings

Loader = Callable[[str], list]


class S3Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data: DatasetSpec
    patch: int
    repeats: int
    epoch_batches: int = 50  # TrainConfig.steps_per_epoch default
    batch_size: int = 2  # DataConfig.batch_size default


def settings(opts: BenchOptions) -> S3Settings:
    base = ingest_settings(opts)
    return S3Settings(data=base.data, patch=base.patch, repeats=1 if opts.quick else 3,
                      epoch_batches=5 if opts.quick else 50)


def load_iter_cases(uri: str) -> list:
    from crossdim.data.shards import iter_cases

    return list(iter_cases(uri))


def load_ray_data(uri: str) -> list:
    from crossdim.data.shards import decode_row, open_shards

    return [decode_row(row) for row in open_shards(uri, verify=True).iter_rows()]


def timed_load(loader: Loader, uri: str, expected: int) -> float:
    start = time.perf_counter()
    cases = loader(uri)
    seconds = time.perf_counter() - start
    if len(cases) != expected:
        raise RuntimeError(f"{uri}: read {len(cases)} cases, expected {expected}")
    return seconds


def sampling_seconds(cases: list, s: S3Settings) -> float:
    """One epoch of the training sampler over loaded cases (storage-independent)."""
    from crossdim.data.sampling import PatchSampler, SampleSpec

    sampler = PatchSampler(cases, SampleSpec((s.patch,) * 3, FOREGROUND_RATIO), seed=0, augment=None)
    start = time.perf_counter()
    for _ in range(s.epoch_batches):
        sampler.batch(s.batch_size)
    return time.perf_counter() - start


def compare(name: str, loader: Loader, local: str, remote: str, s: S3Settings) -> tuple[float, float]:
    """(median local s, median S3 s) of `repeats` alternating loads, after one untimed warm-up each."""
    for uri in (local, remote):
        loader(uri)
    times: dict[str, list[float]] = {local: [], remote: []}
    for _ in range(s.repeats):
        for uri in (local, remote):
            times[uri].append(timed_load(loader, uri, s.data.cases))
    say(f"s3: {name}: local {times[local]}, s3 {times[remote]}")
    return median(times[local]), median(times[remote])


def run(opts: BenchOptions) -> list[Figure]:
    s = settings(opts)
    local = shard_dataset(s.data, opts.workdir)
    ensure_ray()
    from crossdim import storage

    figures = []
    with moto_s3(os.path.join(opts.workdir, "moto")) as s3:
        remote = storage.upload_dir(local, s3.uri("shards"))
        sample_s = sampling_seconds(load_iter_cases(local), s)
        for name, loader in (("iter_cases", load_iter_cases), ("ray_data", load_ray_data)):
            local_s, s3_s = compare(name, loader, local, remote, s)
            figures += [
                Figure(f"s3_{name}_load_local_s", local_s, " s", note=f"{s.data.cases} cases {s.data.size}^3"),
                Figure(f"s3_{name}_load_s3_s", s3_s, " s"),
                Figure(f"s3_vs_local_{name}_load", ratio(s3_s, local_s, "local load"), "x", Goal("<=", 1.5)),
                Figure(f"s3_vs_local_{name}_first_epoch", ratio(s3_s + sample_s, local_s + sample_s, "local epoch"),
                       "x", note=f"load + {s.epoch_batches} batches of {s.batch_size}x{s.patch}^3"),
            ]
    return emit(figures)
