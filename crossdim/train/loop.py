"""The per-worker training loop (`train_loop_per_worker`), shared by `crossdim.train.run` and Tune.

Per worker:
1. ingest: stream this worker's share of the cases from Ray Data (`crossdim.train.ingest`: every
   case reaches exactly one worker) and keep them decoded in memory: cases are small and patches
   are drawn from them many times;
2. model: `create_model` (+ `transfer.initialize` on rank 0 for a fresh start; DDP broadcasts
   rank 0's weights), or the last checkpoint's state on every rank when resuming; then
   `ray.train.torch.prepare_model` (DDP when there are several workers);
3. each epoch: `steps_per_epoch` steps of patch sampling + MONAI augmentation, AMP, grad clipping;
   validation on whole val cases every `validation.every` epochs (metrics all-reduced); rank 0
   logs to MLflow and writes the checkpoint; every rank calls `ray.train.report`.

A NaN/Inf loss on any rank stops every rank (flag all-reduced each step): they report
`nonfinite_loss` without a checkpoint (rank 0 also logs it to MLflow) and return early. Ray's
Result only carries the metrics of the latest checkpoint, so the contract is: a worker loop ends
before the last epoch only on a non-finite loss; the driver then raises NonFiniteLossError naming
the epoch, and the last good checkpoint stays the latest one.

Failure injection for tests (read by the driver from the environment, passed in `WorkerJob`):
`CROSSDIM_FAIL_ONCE=<epoch>:<marker file>` raises in rank 1 (rank 0 when alone) half-way
through that epoch if the marker file does not exist yet (creating it first), so the retry
succeeds; `CROSSDIM_NAN_LOSS_AT=<epoch>` turns rank 0's loss into NaN in that epoch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import numpy as np
import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from crossdim.config import TrainConfig
from crossdim.data.sampling import PatchSampler, SampleSpec
from crossdim.train.checkpoint import TrainState, epoch_seed, load_train_state, save_checkpoint, unwrap
from crossdim.train.ingest import load_cases
from crossdim.train.targets import TargetSpec, encode_labels


log = logging.getLogger(__name__)


class WorkerJob(BaseModel):
    """Everything a worker needs, resolved by the driver (travels as a plain dict)."""

    model_config = ConfigDict(extra="forbid")

    config: TrainConfig
    target: TargetSpec
    in_channels: int
    data_spatial_dims: int
    train_ids: list[str]
    val_ids: list[str]
    dataset_info: dict[str, Any]  # written as each checkpoint's dataset.json
    tracking_uri: str | None = None
    run_id: str | None = None
    fail_once: str | None = None  # "<epoch>:<marker file>"
    nan_loss_at: int | None = None


@dataclass
class Worker:
    rank: int
    world: int
    device: torch.device


# ----------------------------------------------------------------------------- small helpers
def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """"auto": bf16 on a GPU that supports it (else fp16), off on CPU; "off": None."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


def autocast_factory(device: torch.device, dtype: torch.dtype | None) -> Callable[[], ContextManager]:
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Sum (or max) a few floats over workers; identity without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.cpu().tolist()


def encode_batch(labels: np.ndarray, spec: TargetSpec) -> np.ndarray:
    return np.stack([encode_labels(label, spec) for label in labels])


def sample_spec(job: WorkerJob) -> SampleSpec:
    data = job.config.data
    slice_axis = data.slice_axis if job.data_spatial_dims == 3 and len(data.patch_size) == 2 else None
    return SampleSpec(tuple(data.patch_size), data.foreground_ratio, slice_axis)


def reseed(seed: int, sampler: PatchSampler) -> None:
    torch.manual_seed(seed)
    sampler.reseed(seed)


# ----------------------------------------------------------------------------- model and state
def build_model(job: WorkerJob, initialize: bool) -> nn.Module:
    """The configured model; `initialize` applies init.pretrained (rank 0 of a fresh start).
    Random initialisation follows `seed`, so the same config starts from the same weights."""
    from crossdim.models import create_model
    from crossdim.train.transfer import initialize_model, model_pretrained_arg

    cfg = job.config
    torch.manual_seed(cfg.seed)
    pretrained = model_pretrained_arg(cfg.init) if initialize else False
    model = create_model(cfg.model.arch, encoder=cfg.model.encoder, in_channels=job.in_channels,
                         num_classes=job.target.num_channels, pretrained=pretrained, **cfg.model.options)
    if initialize:
        initialize_model(model, cfg.init, job.tracking_uri)
    return model


@dataclass
class Trainables:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    state: TrainState


def setup_trainables(job: WorkerJob, worker: Worker, dtype: torch.dtype | None) -> Trainables:
    import ray.train
    import ray.train.torch

    from crossdim.train.optim import build_optimizer, build_scheduler

    checkpoint = ray.train.get_checkpoint()
    model = build_model(job, initialize=checkpoint is None and worker.rank == 0).to(worker.device)
    optimizer = build_optimizer(model, job.config.optim)
    scheduler = build_scheduler(optimizer, job.config.optim, job.config.epochs)
    scaler = torch.amp.GradScaler(worker.device.type, enabled=dtype == torch.float16)
    state = TrainState(seed=job.config.seed, mlflow_run_id=job.run_id or "")
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_train_state(directory, model, optimizer, scheduler, scaler)
        state.mlflow_run_id = job.run_id or state.mlflow_run_id
    model = ray.train.torch.prepare_model(model)
    return Trainables(model, optimizer, scheduler, scaler, state)


# ----------------------------------------------------------------------------- one epoch
@dataclass
class EpochStats:
    loss_sum: float = 0.0
    steps: int = 0
    wait_s: float = 0.0
    total_s: float = 0.0
    nonfinite: bool = False


def train_epoch(t: Trainables, sampler: PatchSampler, loss_fn: nn.Module, job: WorkerJob, worker: Worker,
                autocast: Callable[[], ContextManager], epoch: int) -> EpochStats:
    cfg, stats = job.config, EpochStats()
    t.model.train()
    start = time.perf_counter()
    for step in range(cfg.steps_per_epoch):
        fetch = time.perf_counter()
        images, labels = sampler.batch(cfg.data.batch_size)
        x = torch.from_numpy(images).to(worker.device, non_blocking=True)
        y = torch.from_numpy(encode_batch(labels, job.target)).to(worker.device, non_blocking=True)
        stats.wait_s += time.perf_counter() - fetch
        with autocast():
            logits = t.model(x)
        loss = loss_fn(logits.float(), y)
        if job.nan_loss_at == epoch and worker.rank == 0:
            loss = loss * float("nan")
        if all_reduce([0.0 if torch.isfinite(loss).item() else 1.0], "max")[0] > 0:
            stats.nonfinite = True
            break
        optimizer_step(t, loss, cfg.grad_clip)
        stats.loss_sum += float(loss.detach())
        stats.steps += 1
        maybe_fail(job, worker, epoch, step)
    stats.total_s = time.perf_counter() - start
    return stats


def optimizer_step(t: Trainables, loss: torch.Tensor, grad_clip: float | None) -> None:
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(loss).backward()
    if grad_clip:
        t.scaler.unscale_(t.optimizer)
        torch.nn.utils.clip_grad_norm_(t.model.parameters(), grad_clip)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.state.global_step += 1


def maybe_fail(job: WorkerJob, worker: Worker, epoch: int, step: int) -> None:
    """The CROSSDIM_FAIL_ONCE test hook (see the module docstring)."""
    if not job.fail_once or worker.rank != min(1, worker.world - 1):
        return
    at, _, marker = job.fail_once.partition(":")
    if int(at) != epoch or step != job.config.steps_per_epoch // 2 or os.path.exists(marker):
        return
    with open(marker, "w") as f:
        f.write(f"failed at epoch {epoch} step {step} rank {worker.rank}\n")
    raise RuntimeError(f"injected worker failure (CROSSDIM_FAIL_ONCE) at epoch {epoch}, rank {worker.rank}")


# ----------------------------------------------------------------------------- epoch end
def epoch_metrics(stats: EpochStats, t: Trainables, job: WorkerJob, worker: Worker, epoch: int) -> dict[str, float]:
    loss_sum, steps, wait, total = all_reduce([stats.loss_sum, stats.steps, stats.wait_s, stats.total_s])
    samples = job.config.data.batch_size * steps
    return {
        "epoch": float(epoch),
        "loss": loss_sum / max(steps, 1),
        "lr": float(t.optimizer.param_groups[0]["lr"]),
        "samples_per_s": samples / max(total / worker.world, 1e-9),
        "data_wait_frac": wait / max(total, 1e-9),
        "global_step": float(t.state.global_step),
    }


def should_validate(job: WorkerJob, epoch: int) -> bool:
    every = job.config.validation.every
    return bool(job.val_ids) and ((epoch + 1) % every == 0 or epoch + 1 == job.config.epochs)


def run_validation(t: Trainables, val_cases: list[Any], job: WorkerJob, worker: Worker,
                   autocast: Callable[[], ContextManager]) -> tuple[dict[str, float], Any]:
    from crossdim.train.validation import validate

    slice_axis = sample_spec(job).slice_axis
    sums, overlay = validate(unwrap(t.model), val_cases, job.target, job.config.data.patch_size,
                             job.config.validation, worker.device, slice_axis, autocast)
    sums.all_reduce()
    return sums.summary(), overlay


def update_best(state: TrainState, metrics: dict[str, float], epoch: int) -> None:
    value = metrics.get("val_dice")
    if value is not None and np.isfinite(value) and value > state.best_metric:
        state.best_metric, state.best_epoch = float(value), epoch
    if state.best_epoch >= 0:
        metrics["best_val_dice"], metrics["best_epoch"] = state.best_metric, float(state.best_epoch)


def report(metrics: dict[str, float], t: Trainables | None, job: WorkerJob, worker: Worker, epoch: int) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (none when `t` is None)."""
    import ray.train

    if t is None or worker.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="crossdim-ckpt-") as directory:
        save_checkpoint(directory, t.model, t.state, t.optimizer, t.scheduler, t.scaler, job.dataset_info)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=f"epoch_{epoch:04d}")


# ----------------------------------------------------------------------------- the loop
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point; `config` is a `WorkerJob` as a dict."""
    import ray.train
    import ray.train.torch

    from crossdim.train.losses import build_loss

    job = WorkerJob.model_validate(config)
    ctx = ray.train.get_context()
    worker = Worker(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())
    dtype = amp_dtype(job.config.amp, worker.device)
    autocast = autocast_factory(worker.device, dtype)
    start = time.perf_counter()
    t = setup_trainables(job, worker, dtype)
    train_cases = load_cases("train", keep_dtype=True)
    val_cases = load_cases("val")
    log.info("rank %d/%d on %s: %d train / %d val cases, starting at epoch %d (setup %.1fs)", worker.rank,
             worker.world, worker.device, len(train_cases), len(val_cases), t.state.epoch + 1,
             time.perf_counter() - start)
    if not train_cases:
        raise RuntimeError(f"rank {worker.rank}: no training cases reached this worker")
    sampler = PatchSampler(train_cases, sample_spec(job), job.config.seed, job.config.data.augment)
    loss_fn = build_loss(job.target, job.config.loss)
    logger = epoch_logger(job) if worker.rank == 0 else None
    for epoch in range(t.state.epoch + 1, job.config.epochs):
        if not run_epoch(t, sampler, loss_fn, val_cases, job, worker, autocast, logger, epoch):
            return


def epoch_logger(job: WorkerJob) -> Any:
    if not (job.tracking_uri and job.run_id):
        return None
    from crossdim.tracking import EpochLogger

    return EpochLogger(job.tracking_uri, job.run_id)


def run_epoch(t: Trainables, sampler: PatchSampler, loss_fn: nn.Module, val_cases: list[Any], job: WorkerJob,
              worker: Worker, autocast: Callable[[], ContextManager], logger: Any, epoch: int) -> bool:
    """One epoch, its validation, logging and checkpoint. False when training must stop."""
    reseed(epoch_seed(job.config.seed, worker.rank, epoch), sampler)
    stats = train_epoch(t, sampler, loss_fn, job, worker, autocast, epoch)
    if stats.nonfinite:
        if logger is not None:
            logger.metrics(epoch, {"nonfinite_loss": 1.0})
        report({"epoch": float(epoch), "nonfinite_loss": 1.0, "global_step": float(t.state.global_step)},
               None, job, worker, epoch)
        return False
    metrics = epoch_metrics(stats, t, job, worker, epoch)
    overlay = None
    if should_validate(job, epoch):
        val, overlay = run_validation(t, val_cases, job, worker, autocast)
        metrics.update(val)
    t.scheduler.step()
    t.state.epoch = epoch
    update_best(t.state, metrics, epoch)
    if worker.rank == 0:
        log.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch"))
    if logger is not None:
        logger.metrics(epoch, metrics)
        if overlay is not None:
            logger.overlay(epoch, overlay)
    report(metrics, t, job, worker, epoch)
    return True
