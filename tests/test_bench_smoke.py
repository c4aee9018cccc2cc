"""The benchmarks' measuring machinery (bench/): figure lines and goals, the child-process protocol,
process-tree memory sampling, and the pure helpers the figures rest on. Fast: no torch models,
no Ray; the benchmarks themselves run with `python -m bench.run_all --quick`."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from bench.common import BenchError, Figure, Goal, TreeMemorySampler, ratio, run_child, stream_child
from bench.model_cost import dynunet_plan
from bench.run_all import summary
from bench.transfer import Curve, TransferSettings, mean_dice, median_or_none, median_ratio, steps_ratio, texture_case


def test_figure_lines_say_missed_only_when_a_goal_is_missed():
    assert Figure("speedup", 6.0, "x", Goal(">=", 5.0)).line() == "speedup: 6.00x (goal >= 5.00x)"
    assert Figure("speedup", 4.0, "x", Goal(">=", 5.0)).line().endswith("(goal >= 5.00x) MISSED")
    assert Figure("slowdown", 1.2, "x", Goal("<=", 1.05)).missed
    assert not Figure("slowdown", 1.05, "x", Goal("<=", 1.05)).missed
    assert Figure("steps", None, "x", Goal("<=", 0.5), note="not reached").line() == \
        "steps: n/a [not reached] (goal <= 0.500x) MISSED"
    assert Figure("rate", 123.4, " patches/s").line() == "rate: 123 patches/s (info)"


def test_summary_counts_missed_goals_and_errors():
    figures = [Figure("a", 2.0, "x", Goal(">=", 1.0)), Figure("b", 0.5, "x", Goal(">=", 1.0)), Figure("c", 1.0)]
    lines = summary(figures, {"s3": "BenchError: moto down"})
    assert lines == ["goals met: 1 of 2", "MISSED: b", "ERROR in s3: BenchError: moto down"]


def test_ratio_refuses_a_zero_denominator():
    assert ratio(3.0, 2.0, "t") == 1.5
    with pytest.raises(BenchError, match="t: denominator is 0"):
        ratio(1.0, 0.0, "t")


def test_run_child_returns_the_functions_json_result():
    result = run_child("bench.common.fmt", {"value": 1234.5}, threads=1, timeout=120)
    assert result.result == "1234" and result.peak_pss_mib > result.peak_private_mib > 1 and result.wall_s > 0


def test_run_child_reports_a_failing_side_in_one_line():
    with pytest.raises(BenchError, match=r"bench.common.ratio: child exited with 1: .*denominator is 0"):
        run_child("bench.common.ratio", {"numerator": 1.0, "denominator": 0.0, "what": "x"}, threads=1, timeout=120)


def sleep_then_return(seconds: float) -> str:
    """A child-process target for the stream_child tests."""
    print("a figure line", flush=True)
    time.sleep(seconds)
    return "done"


def test_stream_child_passes_output_through_and_returns_the_result(capsys):
    assert stream_child("tests.test_bench_smoke.sleep_then_return", {"seconds": 0}, threads=1, timeout=120) == "done"
    out = capsys.readouterr().out
    assert "a figure line" in out and "BENCH_RESULT" not in out


def test_stream_child_stops_a_benchmark_that_runs_past_its_timeout():
    start = time.perf_counter()
    with pytest.raises(BenchError, match=r"sleep_then_return: stopped after 3 s \(timeout\)"):
        stream_child("tests.test_bench_smoke.sleep_then_return", {"seconds": 120}, threads=1, timeout=3)
    assert time.perf_counter() - start < 60


def test_tree_sampler_counts_a_grandchild_allocation():
    # the child starts a grandchild that touches 150 MiB, then both wait
    grandchild = "b = bytearray(150 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nimport time; time.sleep(1.5)"
    child = textwrap.dedent(f"""
        import subprocess, sys
        subprocess.run([sys.executable, "-c", {grandchild!r}], check=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child])
    with TreeMemorySampler(proc.pid, interval=0.05) as sampler:
        proc.wait(timeout=60)
    assert proc.returncode == 0
    assert 150 <= sampler.peak_kib.private / 1024 < 300  # the bytearray, once
    assert sampler.peak_kib.pss >= sampler.peak_kib.private and sampler.peak_kib.rss >= sampler.peak_kib.pss


def test_tree_sampler_counts_pages_shared_by_a_fork_once():
    # 150 MiB touched, then fork(): parent and child map the same copy-on-write pages
    script = textwrap.dedent("""
        import os, time
        b = bytearray(150 << 20)
        for i in range(0, len(b), 4096): b[i] = 1
        pid = os.fork()
        time.sleep(1.5)
        if pid: os.waitpid(pid, 0)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    with TreeMemorySampler(proc.pid, interval=0.05) as sampler:
        proc.wait(timeout=60)
    assert 150 <= sampler.peak_kib.private / 1024 < 200  # counted once (PSS splits it)
    assert sampler.peak_kib.rss / 1024 >= 300  # RSS counts it in both processes


def test_dynunet_plan_follows_the_nnunet_rule():
    assert dynunet_plan(64) == {"kernel_size": [3] * 5, "strides": [1, 2, 2, 2, 2], "upsample_kernel_size": [2] * 4,
                                "filters": [32, 64, 128, 256, 320]}
    assert dynunet_plan(96)["strides"] == [1, 2, 2, 2, 2]  # 96 -> 6: one more halving would go below 4
    assert dynunet_plan(256)["filters"][-1] == 320 and len(dynunet_plan(256)["strides"]) == 6


def test_mean_dice_bounds_and_empty_masks():
    rng = np.random.default_rng(0)
    target = rng.random((2, 3, 8, 8, 8)) > 0.5
    assert mean_dice(target, target) == 1.0
    assert mean_dice(~target, target) == 0.0
    empty = np.zeros_like(target)
    assert mean_dice(empty, empty) == 1.0
    half = target & (rng.random(target.shape) > 0.5)
    assert 0.5 < mean_dice(half, target) < 0.8  # 2|A|/(|A|+2|A|) = 2/3 in expectation


def test_texture_task_is_not_separable_by_intensity_but_by_orientation():
    """Objects and background share mean and spread; only the stripes' direction differs."""
    volume = texture_case(np.random.default_rng(0), 32, noise=0.0, drift=0.0)
    image, label = volume.image[0], volume.label.astype(bool)
    assert volume.image.shape == (1, 32, 32, 32) and 0.02 < label.mean() < 0.5
    assert abs(image[label].mean() - image[~label].mean()) < 0.15
    assert abs(image[label].std() - image[~label].std()) < 0.1

    def energy(axis: int, mask: np.ndarray) -> float:  # mean squared difference along one in-plane axis
        head = tuple(slice(0, -1) if i == axis else slice(None) for i in range(3))
        return float((np.diff(image, axis=axis)[mask[head]] ** 2).mean())

    core = label.copy()
    for axis in range(3):  # away from the border, where the differences mix both textures
        core &= np.roll(label, 1, axis) & np.roll(label, -1, axis)
    outside = ~(label | np.roll(label, 1, 0) | np.roll(label, 1, 1) | np.roll(label, -1, 0) | np.roll(label, -1, 1))
    assert energy(0, core) < 0.5 * energy(1, core) and energy(0, outside) > 2 * energy(1, outside)


def test_steps_ratio_uses_the_cap_as_an_upper_bound_only_for_the_baseline():
    s = TransferSettings(max_steps=200)
    reached, missed = Curve(40, [(40, 0.81)], 1.0), Curve(None, [(200, 0.7)], 1.0)
    assert steps_ratio("r", reached, Curve(100, [], 1.0), s, None).value == 0.4
    bound = steps_ratio("r", reached, missed, s, Goal("<=", 0.5))
    assert bound.value == 0.2 and "upper bound" in bound.note and not bound.missed
    assert steps_ratio("r", missed, reached, s, Goal("<=", 0.5)).missed



def test_medians_over_seeds_rank_a_missed_target_last():
    assert median_or_none([10, None, 30]) == 30 and median_or_none([None, None, 5]) is None
    assert median_or_none([8, 12]) == 10 and median_or_none([8, None]) is None
    s = TransferSettings(max_steps=100)
    runs = [{"a": Curve(10, [], 1.0), "b": Curve(40, [], 1.0)}, {"a": Curve(20, [], 1.0), "b": Curve(None, [], 1.0)},
            {"a": Curve(30, [], 1.0), "b": Curve(30, [], 1.0)}]
    figure = median_ratio("r", "a", "b", runs, s, Goal("<=", 0.5))
    assert figure.value == 0.25 and "per seed 0.25, 0.20, 1.00" in figure.note and not figure.missed

def test_preprocess_cpu_groups_and_the_machine_bound():
    from bench.preprocess_scaling import CpuUse, cpu_figures, cpu_group

    assert cpu_group(7, 7, "python -m bench.run_all") == "driver"
    assert cpu_group(8, 7, "ray::MapBatches(_process_item)") == "ray workers"
    assert cpu_group(9, 7, "/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --foo") == "ray daemons"
    assert cpu_group(10, 7, "sshd: root") == "other"
    groups = {"ray workers": 10.0, "driver": 4.0, "ray daemons": 2.0, "other": 0.0}
    runs = {1: [(10.0, CpuUse(16.0, groups))], 2: [(8.0, CpuUse(16.0, groups))]}
    figures = {f.name: f for f in cpu_figures(runs, cores=2)}
    assert figures["preprocess_concurrency1_busy_cores"].value == 1.6
    assert figures["preprocess_concurrency2_busy_cores"].value == 2.0
    assert figures["preprocess_scaling_bound_this_machine"].value == 1.25  # 2 cores / 1.6 busy
    assert figures["preprocess_scaling_bound_this_machine"].goal is None
