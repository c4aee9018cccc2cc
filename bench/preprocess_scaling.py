"""Benchmark 6 - preprocessing scaling: cases/s of `run_preprocess` with concurrency 1 vs 2.

The real job (`crossdim.data.job.run_preprocess`: plan pass, per-case load + preprocess on Ray
Data tasks, shards + progress records written by the driver, manifest) runs on the same raw
synthetic BraTS dataset into a fresh output per run. A small warm-up run at concurrency 2 starts
and warms two Ray worker processes first (imports are not what is measured). Runs alternate
1, 2, 2, 1, ... and the medians are compared; cases/s = cases written / the job's own seconds.
Goal: concurrency 2 >= 1.7x concurrency 1.

Where the CPU goes (info): around each run the machine's busy CPU time (/proc/stat) and each
process's (/proc/PID/stat) are read, grouped into the Ray workers (`ray::` processes), this
driver, Ray's own daemons (raylet, GCS, dashboard, monitors) and everything else. At concurrency
1 the whole job keeps `busy cores` of the machine busy; with that much work, `nproc` cores cannot
finish a run faster than busy CPU-seconds / nproc, which bounds the speed-up this machine can show
(`preprocess_scaling_bound_this_machine`). A goal missed under that bound is the machine's limit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import uuid
from dataclasses import dataclass

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


CPU_GROUPS = ("ray workers", "driver", "ray daemons", "other")
_RAY_DAEMONS = ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env", "ray_client_server")


@dataclass
class CpuUse:
    """CPU-seconds spent during one run: the machine's busy total and per process group."""

    busy_s: float
    groups: dict[str, float]

    def note(self) -> str:
        return ", ".join(f"{name} {self.groups.get(name, 0.0):.1f}" for name in CPU_GROUPS)


def machine_busy_s() -> float:
    """Busy CPU-seconds of the whole machine so far (all cores, /proc/stat: not idle, not iowait)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def process_cpu() -> dict[int, tuple[str, float]]:
    """{pid: (group, CPU-seconds so far)} of every readable process."""
    tick, me, out = os.sysconf("SC_CLK_TCK"), os.getpid(), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(entry)] = (cpu_group(int(entry), me, cmdline), (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_group(pid: int, driver: int, cmdline: str) -> str:
    """The group a process's CPU time is counted in (pure)."""
    if pid == driver:
        return "driver"
    if cmdline.startswith("ray::"):
        return "ray workers"
    if any(name in cmdline for name in _RAY_DAEMONS):
        return "ray daemons"
    return "other"


def cpu_between(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], busy_s: float) -> CpuUse:
    groups = {name: 0.0 for name in CPU_GROUPS}
    for pid, (group, seconds) in after.items():
        groups[group] += seconds - (before[pid][1] if pid in before else 0.0)
    return CpuUse(busy_s, groups)


def preprocess_rate(raw: str, workdir: str, concurrency: int,
                    max_cases: int | None = None) -> tuple[float, float, CpuUse]:
    """(cases/s, seconds, CPU use) of one run into a fresh output directory (removed afterwards)."""
    from crossdim.config import PreprocessConfig
    from crossdim.data.job import run_preprocess

    out = os.path.join(workdir, f"preprocess-c{concurrency}-{uuid.uuid4().hex[:8]}")
    processes, busy = process_cpu(), machine_busy_s()
    try:
        config = PreprocessConfig(format="brats", input=raw, output=out, concurrency=concurrency, max_cases=max_cases)
        with contextlib.redirect_stdout(sys.stderr):  # its progress lines are not figures
            summary = run_preprocess(config, progress=False)
        cpu = cpu_between(processes, process_cpu(), machine_busy_s() - busy)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    seconds = float(summary["seconds"])
    return ratio(summary["cases_written"], seconds, "preprocess seconds"), seconds, cpu


def run(opts: BenchOptions) -> list[Figure]:
    s = settings(opts)
    raw = raw_dataset(s.data, opts.workdir)
    ensure_ray()
    say(f"preprocess: warm-up ({s.warmup_cases} cases, concurrency 2)")
    preprocess_rate(raw, opts.workdir, 2, s.warmup_cases)
    rates: dict[int, list[float]] = {1: [], 2: []}
    runs: dict[int, list[tuple[float, CpuUse]]] = {1: [], 2: []}
    for round_index in range(s.rounds):
        for concurrency in ((1, 2) if round_index % 2 == 0 else (2, 1)):
            rate, seconds, cpu = preprocess_rate(raw, opts.workdir, concurrency)
            say(f"preprocess: concurrency {concurrency}: {rate:.2f} cases/s ({seconds:.1f} s; "
                f"machine busy {cpu.busy_s:.1f} CPU-s: {cpu.note()})")
            rates[concurrency].append(rate)
            runs[concurrency].append((seconds, cpu))
    one, two = median(rates[1]), median(rates[2])
    label = f"{s.data.cases} cases {s.data.size}^3 x4ch, {s.rounds} run(s) each"
    return emit([
        Figure("preprocess_concurrency1_cases_per_s", one, " cases/s", note=label),
        Figure("preprocess_concurrency2_cases_per_s", two, " cases/s"),
        Figure("preprocess_scaling_2_vs_1", ratio(two, one, "concurrency 1 rate"), "x", Goal(">=", 1.7)),
        *cpu_figures(runs, os.cpu_count() or 1),
    ])


def cpu_figures(runs: dict[int, list[tuple[float, CpuUse]]], cores: int) -> list[Figure]:
    """Busy cores per concurrency and the speed-up bound of this machine (medians over runs; pure)."""
    out, bound = [], None
    for concurrency, measured in runs.items():
        busy = median([cpu.busy_s / seconds for seconds, cpu in measured])
        groups = {name: median([cpu.groups[name] for _, cpu in measured]) for name in CPU_GROUPS}
        note = "CPU-s per run: " + ", ".join(f"{name} {groups[name]:.1f}" for name in CPU_GROUPS)
        out.append(Figure(f"preprocess_concurrency{concurrency}_busy_cores", busy, " cores",
                          note=f"of {cores}; {note}"))
        if concurrency == 1:
            bound = min(float(cores), 2.0) / busy if busy > 0 else None
    if bound is not None:
        out.append(Figure("preprocess_scaling_bound_this_machine", bound, "x",
                          note=f"{cores} cores / busy cores at concurrency 1: no run can go faster"))
    return out
