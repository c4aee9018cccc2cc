"""Benchmark 3 - Ray Train overhead: step time of a 1-worker TorchTrainer vs a plain PyTorch loop.

Same model (DX-Net on `test_efficientnet`), batch, synthetic data held in memory, optimizer
(NAdam+Lookahead, crossdim's default) and torch thread count on both sides. The Ray side runs
the loop in a `TorchTrainer` worker (model through `prepare_model`, a metrics-only
`ray.train.report` every `report_every` steps, as the real loop reports per epoch). The plain loop
runs in this process before and after the Ray run (machine noise shows as their spread); step
times are medians after warm-up steps. `fit()`'s start-up (worker group, process start) is
reported apart: it is paid once per run, not per step.
Goal: Ray step time <= 1.05x plain.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict

from bench.common import BenchOptions, Figure, Goal, emit, ensure_ray, median, ratio, say, set_threads


class OverheadSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    encoder: str = "test_efficientnet"
    in_channels: int = 4
    num_classes: int = 3
    patch: int = 32
    batch: int = 2
    warmup: int
    steps: int
    report_every: int = 10
    threads: int = 1


def settings(opts: BenchOptions) -> OverheadSettings:
    if opts.quick:
        return OverheadSettings(warmup=1, steps=3, report_every=2, threads=opts.threads)
    return OverheadSettings(warmup=3, steps=30, threads=opts.threads)


def make_model(s: OverheadSettings) -> Any:
    from crossdim.models import create_model

    return create_model("dxnet", encoder=s.encoder, in_channels=s.in_channels, num_classes=s.num_classes)


def make_batch(s: OverheadSettings) -> tuple[Any, Any]:
    """Fixed synthetic batch (seeded), the same on both sides."""
    import torch

    generator = torch.Generator().manual_seed(0)
    shape = (s.batch, s.in_channels, s.patch, s.patch, s.patch)
    x = torch.randn(shape, generator=generator)
    y = (torch.rand((s.batch, s.num_classes, *shape[2:]), generator=generator) > 0.7).float()
    return x, y


def step_times(model: Any, s: OverheadSettings, report: Any = None) -> list[float]:
    """Seconds of each training step after `warmup` steps; `report(step)` after each step if given."""
    import torch

    from crossdim.config import OptimConfig
    from crossdim.train.optim import build_optimizer

    x, y = make_batch(s)
    optimizer = build_optimizer(model, OptimConfig())
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    times = []
    for step in range(s.warmup + s.steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        float(loss.detach())
        if report is not None:
            report(step, float(loss.detach()))
        if step >= s.warmup:
            times.append(time.perf_counter() - start)
    return times


def plain_side(s: OverheadSettings) -> list[float]:
    import torch

    set_threads(s.threads)
    torch.manual_seed(0)
    return step_times(make_model(s), s)


def ray_worker(config: dict[str, Any]) -> None:
    """TorchTrainer worker: the same loop; step times go back in the last report (with a checkpoint)."""
    import json

    import ray.train
    import ray.train.torch
    import torch

    s = OverheadSettings.model_validate(config)
    set_threads(s.threads)
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(make_model(s))

    def report(step: int, loss: float) -> None:
        if (step + 1) % s.report_every == 0:
            ray.train.report({"step": step, "loss": loss})

    times = step_times(model, s, report)
    metrics = {"step_times": json.dumps(times), "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as directory:  # Train V2 keeps only checkpointed metrics in Result
        with open(os.path.join(directory, "step_times.json"), "w") as f:
            f.write(metrics["step_times"])
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def ray_side(s: OverheadSettings, storage: str) -> tuple[list[float], float, int]:
    """(step times, fit() wall seconds, the worker's torch threads)."""
    import json

    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        ray_worker,
        train_loop_config=s.model_dump(),
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"bench-overhead-{uuid.uuid4().hex[:8]}", storage_path=storage),
    )
    start = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - start
    return json.loads(result.metrics["step_times"]), wall, int(result.metrics["threads"])


def run(opts: BenchOptions) -> list[Figure]:
    s = settings(opts)
    ensure_ray()
    os.makedirs(opts.workdir, exist_ok=True)
    say("ray_overhead: plain loop (before)")
    plain = plain_side(s)
    say("ray_overhead: TorchTrainer, 1 worker")
    with tempfile.TemporaryDirectory(prefix="ray-overhead-", dir=opts.workdir) as storage:
        ray_times, fit_wall, worker_threads = ray_side(s, storage)
    say("ray_overhead: plain loop (after)")
    plain += plain_side(s)
    plain_step, ray_step = median(plain), median(ray_times)
    label = f"dxnet {s.encoder} batch {s.batch}x{s.in_channels}x{s.patch}^3, {s.threads} thread(s)"
    return emit([
        Figure("ray_overhead_plain_step_s", plain_step, " s", note=label),
        Figure("ray_overhead_ray_step_s", ray_step, " s", note=f"worker torch threads {worker_threads}"),
        Figure("ray_overhead_plain_step_spread", ratio(max(plain), min(plain), "plain min"), "x",
               note="max/min plain step: the machine's noise"),
        Figure("ray_overhead_fit_startup_s", fit_wall - sum(ray_times), " s",
               note="fit() wall minus timed steps (incl. warm-up steps)"),
        Figure("ray_train_step_vs_plain", ratio(ray_step, plain_step, "plain step"), "x", Goal("<=", 1.05)),
    ])
