"""Run the benchmarks: `python -m bench.run_all [--quick] [--only NAME ...] [--patch96]`.

Prints a header (command, date, machine, versions), then one line per figure
(`name: value (goal ...)`, `MISSED` when a goal is missed) and a summary. Each benchmark runs in
its own process (its own Ray session, if it needs one) under a time limit, so a hung or failed
benchmark is reported and the others still run. Exit status 1 only when a benchmark could not
run; missed goals are reported, not hidden, and do not fail the run.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from bench.common import BenchOptions, Figure, machine_header, quiet_environment, stream_child

BENCHMARKS = {
    "model_cost": "bench.model_cost",
    "transfer": "bench.transfer",
    "ingest": "bench.ingest",
    "s3": "bench.s3_ingest",
    "ray_overhead": "bench.ray_overhead",
    "preprocess": "bench.preprocess_scaling",
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run whose figures mean little")
    parser.add_argument("--only", action="append", choices=list(BENCHMARKS), help="run only these (repeatable)")
    parser.add_argument("--workdir", help="where synthetic data and outputs go (default: $TMPDIR/crossdim-bench)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process, same on both sides")
    parser.add_argument("--patch96", action="store_true", help="model cost at 96^3 (the issue's GPU patch)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per benchmark")
    return parser.parse_args(argv)


def options(args: argparse.Namespace) -> BenchOptions:
    extra = {"workdir": args.workdir} if args.workdir else {}
    return BenchOptions(quick=args.quick, threads=args.threads, patch96=args.patch96, **extra)


def run_one(name: str, opts: BenchOptions, timeout: float) -> tuple[list[Figure], str | None]:
    """(figures, error line or None) of one benchmark, run in its own process."""
    print(f"== {name}", flush=True)
    start = time.perf_counter()
    try:
        found = stream_child("bench.common.run_benchmark", {"module": BENCHMARKS[name], "opts": opts.model_dump()},
                             opts.threads, timeout)
        figures, error = [Figure.from_dict(f) for f in found], None
    except Exception as exc:  # noqa: BLE001 - one failed benchmark must not hide the others
        figures, error = [], f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        print(f"{name}: ERROR {error}", flush=True)
    print(f"{name}_wall_s: {time.perf_counter() - start:.1f} s (info)", flush=True)
    return figures, error


def summary(figures: list[Figure], errors: dict[str, str]) -> list[str]:
    goals = [f for f in figures if f.goal is not None]
    missed = [f.name for f in goals if f.missed]
    lines = [f"goals met: {len(goals) - len(missed)} of {len(goals)}"]
    if missed:
        lines.append("MISSED: " + ", ".join(missed))
    lines += [f"ERROR in {name}: {error}" for name, error in errors.items()]
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    opts = options(args)
    quiet_environment()
    for line in machine_header(opts, "python -m bench.run_all " + shlex.join(argv)):
        print(line, flush=True)
    figures: list[Figure] = []
    errors: dict[str, str] = {}
    start = time.perf_counter()
    for name in args.only or list(BENCHMARKS):
        found, error = run_one(name, opts, args.timeout)
        figures += found
        if error:
            errors[name] = error
    print("== summary", flush=True)
    for line in summary(figures, errors) + [f"total_wall_s: {time.perf_counter() - start:.1f} s"]:
        print(line, flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
