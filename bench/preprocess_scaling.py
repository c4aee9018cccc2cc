"""Benchmark 6 - preprocessing scaling: cases/s of `run_preprocess` with concurrency 1 vs 2.

The real job (`crossdim.data.job.run_preprocess`: plan pass, per-case load + preprocess on Ray
Data tasks, shards + progress records written by the driver, manifest) runs on the same raw
synthetic BraTS dataset into a fresh output per run. A small warm-up run at concurrency 2 starts
and warms two Ray worker processes first (imports are not what is measured). Runs alternate
1, 2, 2, 1, ... and the medians are compared; cases/s = cases written / the job's own seconds.
Goal: concurrency 2 >= 1.7x concurrency 1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import uuid

from pydantic import BaseModel, ConfigDict

from bench.common import BenchOptions, Figure, Goal, emit, ensure_ray, median, ratio, say
from bench.data import DatasetSpec, raw_dataset
from bench.ingest import settings as ingest_settings


class ScalingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data: DatasetSpec
    rounds: int  # each round runs concurrency 1 and 2 once (order alternating)
    warmup_cases: int = 4


def settings(opts: BenchOptions) -> ScalingSettings:
    return ScalingSettings(data=ingest_settings(opts).data, rounds=1 if opts.quick else 2,
                           warmup_cases=2 if opts.quick else 4)


def preprocess_rate(raw: str, workdir: str, concurrency: int, max_cases: int | None = None) -> tuple[float, float]:
    """(cases/s, seconds) of one run into a fresh output directory (removed afterwards)."""
    from crossdim.config import PreprocessConfig
    from crossdim.data.job import run_preprocess

    out = os.path.join(workdir, f"preprocess-c{concurrency}-{uuid.uuid4().hex[:8]}")
    try:
        config = PreprocessConfig(format="brats", input=raw, output=out, concurrency=concurrency, max_cases=max_cases)
        with contextlib.redirect_stdout(sys.stderr):  # its progress lines are not figures
            summary = run_preprocess(config, progress=False)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return ratio(summary["cases_written"], summary["seconds"], "preprocess seconds"), float(summary["seconds"])


def run(opts: BenchOptions) -> list[Figure]:
    s = settings(opts)
    raw = raw_dataset(s.data, opts.workdir)
    ensure_ray()
    say(f"preprocess: warm-up ({s.warmup_cases} cases, concurrency 2)")
    preprocess_rate(raw, opts.workdir, 2, s.warmup_cases)
    rates: dict[int, list[float]] = {1: [], 2: []}
    for round_index in range(s.rounds):
        for concurrency in ((1, 2) if round_index % 2 == 0 else (2, 1)):
            rate, seconds = preprocess_rate(raw, opts.workdir, concurrency)
            say(f"preprocess: concurrency {concurrency}: {rate:.2f} cases/s ({seconds:.1f} s)")
            rates[concurrency].append(rate)
    one, two = median(rates[1]), median(rates[2])
    label = f"{s.data.cases} cases {s.data.size}^3 x4ch, {s.rounds} run(s) each"
    return emit([
        Figure("preprocess_concurrency1_cases_per_s", one, " cases/s", note=label),
        Figure("preprocess_concurrency2_cases_per_s", two, " cases/s"),
        Figure("preprocess_scaling_2_vs_1", ratio(two, one, "concurrency 1 rate"), "x", Goal(">=", 1.7)),
    ])
