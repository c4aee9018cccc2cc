"""Benchmark 5 - the transfer claim: training steps for a DX-Net to reach a validation Dice,
started from a 2D encoder trained on the task's slices (inflated) vs from random weights.

Task: synthetic BraTS-like volumes (`crossdim.data.synth.brats_case`, 4 MRI channels, 1 mm,
size^3 voxels, z-scored per channel over the head); target: the three BraTS regions (ET, TC, WT,
sigmoid outputs). Patches are whole volumes, drawn by the real training sampler.
1. 2D: an Omnia-Net (same timm encoder, same stem width and activation as the DX-Net) trains on
   axial slices of the training volumes for `pretrain_steps` steps.
2. 3D, three arms, same seed (same decoder init, same batches), same loss (crossdim's Dice+BCE)
   and optimizer (crossdim's default NAdam+Lookahead): random init; the Omnia-Net's encoder and
   stem inflated with `repeat` (I3D: kernel repeated over depth / depth); with `center` (kernel
   in the middle slice, zeros elsewhere).
Every `eval_every` steps the mean Dice over regions and validation volumes is measured; the
figure is the first step that reaches `target_dice` (capped at `max_steps`: "not reached").
The 2D pretraining's steps and time are reported next to it (it is not free).
Goal: inflated (repeat) <= 0.5x the steps of random init.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from bench.common import BenchOptions, Figure, Goal, emit, ratio, say, set_threads

REGIONS = {"ET": [4], "TC": [1, 4], "WT": [1, 2, 4]}  # BraTS 2021 label values per region
ARMS = ("random", "repeat", "center")


class TransferSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    encoder: str = "test_efficientnet"
    size: int = 32  # volume edge = 3D patch edge
    train_cases: int = 16
    val_cases: int = 4
    batch: int = 2
    pretrain_steps: int = 150
    pretrain_batch: int = 16  # slices
    max_steps: int = 200
    eval_every: int = 10
    target_dice: float = 0.8
    seed: int = 0


def settings(opts: BenchOptions) -> TransferSettings:
    if opts.quick:
        return TransferSettings(train_cases=4, val_cases=2, pretrain_steps=4, pretrain_batch=4, max_steps=4,
                                eval_every=2)
    return TransferSettings()


# ----------------------------------------------------------------------------- data (pure)
@dataclass(frozen=True)
class Volume:
    image: np.ndarray  # float32 (4, S, S, S), z-scored per channel over the head
    label: np.ndarray  # uint8 (S, S, S), BraTS 2021 values
    id: str = ""


def zscore_nonzero(image: np.ndarray) -> np.ndarray:
    """Per-channel z-score over the non-zero voxels of each channel; zeros stay zero (pure)."""
    out = np.zeros_like(image, dtype=np.float32)
    for c, channel in enumerate(image):
        mask = channel != 0
        if mask.any():
            values = channel[mask]
            out[c][mask] = (values - values.mean()) / max(float(values.std()), 1e-6)
    return out


def make_volumes(count: int, first_index: int, s: TransferSettings) -> list[Volume]:
    from crossdim.data.synth import BRATS_SEQUENCES, brats_case, case_rng

    volumes = []
    for index in range(first_index, first_index + count):
        case = brats_case(case_rng(s.seed, index), shape=(s.size,) * 3, spacing=(1.0, 1.0, 1.0))
        image = np.stack([case.channels[name] for name in BRATS_SEQUENCES])
        volumes.append(Volume(zscore_nonzero(image), case.label, f"case{index}"))
    return volumes


def region_targets(labels: np.ndarray) -> np.ndarray:
    """(B, *S) BraTS labels -> (B, 3, *S) float32 region masks (ET, TC, WT) (pure)."""
    from crossdim.train.targets import encode_labels

    spec = target_spec()
    return np.stack([encode_labels(label, spec) for label in labels])


def target_spec() -> Any:
    from crossdim.train.targets import TargetSpec

    return TargetSpec(kind="regions", channel_names=list(REGIONS), regions=REGIONS)


def mean_dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean Dice over batch and channels of boolean masks (B, K, *S); empty vs empty counts 1 (pure)."""
    axes = tuple(range(2, pred.ndim))
    inter = (pred & target).sum(axes)
    total = pred.sum(axes) + target.sum(axes)
    dice = np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)
    return float(dice.mean())


# ----------------------------------------------------------------------------- training
@dataclass
class Curve:
    steps_to_target: int | None
    dice: list[tuple[int, float]]  # (step, val Dice)
    seconds: float


def evaluate(model: Any, x: Any, target: np.ndarray) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        pred = (model(x) > 0).numpy()
    model.train()
    return mean_dice(pred, target > 0.5)


def train(model: Any, sampler: Any, batch: int, val: tuple[Any, np.ndarray], s: TransferSettings,
          max_steps: int, stop_at_target: bool = True) -> Curve:
    """Train with crossdim's loss and optimizer; evaluate every `eval_every` steps."""
    import torch

    from crossdim.config import LossConfig, OptimConfig
    from crossdim.train.losses import build_loss
    from crossdim.train.optim import build_optimizer

    loss_fn, optimizer = build_loss(target_spec(), LossConfig()), build_optimizer(model, OptimConfig())
    curve, start = Curve(None, [], 0.0), time.perf_counter()
    model.train()
    for step in range(1, max_steps + 1):
        images, labels = sampler.batch(batch)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(torch.from_numpy(images)), torch.from_numpy(region_targets(labels)))
        loss.backward()
        optimizer.step()
        if step % s.eval_every == 0 or step == max_steps:
            curve.dice.append((step, evaluate(model, *val)))
            if curve.steps_to_target is None and curve.dice[-1][1] >= s.target_dice:
                curve.steps_to_target = step
                if stop_at_target:
                    break
    curve.seconds = time.perf_counter() - start
    return curve


def pretrain_2d(train_set: list[Volume], val_set: list[Volume], s: TransferSettings) -> tuple[Any, Curve]:
    """An Omnia-Net trained on axial slices (random 2D patches = whole slices)."""
    import torch

    from crossdim.data.sampling import PatchSampler, SampleSpec
    from crossdim.models import create_model

    torch.manual_seed(s.seed)
    model = create_model("omnianet", encoder=s.encoder, in_channels=4, num_classes=len(REGIONS), act="silu")
    sampler = PatchSampler(train_set, SampleSpec((s.size, s.size), 0.33, slice_axis=2), seed=s.seed)
    val_x, val_y = val_slices(val_set)
    return model, train(model, sampler, s.pretrain_batch, (val_x, val_y), s, s.pretrain_steps, stop_at_target=False)


def val_slices(val_set: list[Volume]) -> tuple[Any, np.ndarray]:
    """Every axial slice of the validation volumes as a 2D batch."""
    import torch

    images = np.concatenate([np.moveaxis(v.image, 3, 0) for v in val_set])  # (B*S, C, S, S)
    labels = np.concatenate([np.moveaxis(v.label, 2, 0) for v in val_set])  # (B*S, S, S)
    return torch.from_numpy(np.ascontiguousarray(images)), region_targets(labels)


def dxnet_arm(arm: str, state_2d: dict[str, Any], s: TransferSettings) -> Any:
    """The DX-Net of one arm; every arm draws the same random init first (same seed)."""
    import torch

    from crossdim.models import create_model

    torch.manual_seed(s.seed)
    mode = "repeat" if arm == "random" else arm
    model = create_model("dxnet", encoder=s.encoder, in_channels=4, num_classes=len(REGIONS), inflate_mode=mode)
    if arm != "random":
        model.load_2d_state(state_2d)
    return model


def run_arms(s: TransferSettings, threads: int) -> tuple[Curve, dict[str, Curve]]:
    import torch

    from crossdim.data.sampling import PatchSampler, SampleSpec

    set_threads(threads)
    train_set, val_set = make_volumes(s.train_cases, 0, s), make_volumes(s.val_cases, s.train_cases, s)
    say(f"transfer: 2D pretraining on slices, {s.pretrain_steps} steps")
    model_2d, curve_2d = pretrain_2d(train_set, val_set, s)
    state_2d = {k: v.detach().clone() for k, v in model_2d.state_dict().items()}
    val_x = torch.from_numpy(np.stack([v.image for v in val_set]))
    val_y = region_targets(np.stack([v.label for v in val_set]))
    curves = {}
    for arm in ARMS:
        say(f"transfer: 3D arm {arm}, up to {s.max_steps} steps")
        sampler = PatchSampler(train_set, SampleSpec((s.size,) * 3, 0.33), seed=s.seed)
        curves[arm] = train(dxnet_arm(arm, state_2d, s), sampler, s.batch, (val_x, val_y), s, s.max_steps)
        say(f"transfer: {arm}: {curves[arm].dice}")
    return curve_2d, curves


# ----------------------------------------------------------------------------- figures
def steps_figure(arm: str, curve: Curve, s: TransferSettings) -> Figure:
    reached = curve.steps_to_target is not None
    note = f"Dice {curve.dice[-1][1]:.3f} at step {curve.dice[-1][0]}, {curve.seconds:.0f} s"
    if not reached:
        note = f"not reached within {s.max_steps} steps; " + note
    return Figure(f"transfer_steps_to_dice{s.target_dice:g}_{arm}", curve.steps_to_target, " steps", note=note)


def steps_ratio(name: str, arm: Curve, base: Curve, s: TransferSettings, goal: Goal | None) -> Figure:
    """arm/base steps; when only the base missed the target, the cap gives an upper bound."""
    if arm.steps_to_target is None:
        return Figure(name, None, "x", goal, note=f"not reached within {s.max_steps} steps")
    if base.steps_to_target is None:
        return Figure(name, arm.steps_to_target / s.max_steps, "x", goal,
                      note=f"upper bound: the baseline did not reach it within {s.max_steps} steps")
    return Figure(name, ratio(arm.steps_to_target, base.steps_to_target, "baseline steps"), "x", goal)


def figures(curve_2d: Curve, curves: dict[str, Curve], s: TransferSettings) -> list[Figure]:
    out = [Figure("transfer_pretrain_2d", float(s.pretrain_steps), " steps",
                  note=f"{s.pretrain_batch} slices/step, {curve_2d.seconds:.0f} s, 2D val Dice "
                       f"{curve_2d.dice[-1][1]:.3f}; task {s.train_cases} volumes {s.size}^3, {s.encoder}")]
    out += [steps_figure(arm, curves[arm], s) for arm in ARMS]
    out += [
        steps_ratio("transfer_repeat_vs_random_steps", curves["repeat"], curves["random"], s, Goal("<=", 0.5)),
        steps_ratio("transfer_center_vs_random_steps", curves["center"], curves["random"], s, None),
        steps_ratio("transfer_center_vs_repeat_steps", curves["center"], curves["repeat"], s, None),
    ]
    return out


def run(opts: BenchOptions) -> list[Figure]:
    s = settings(opts)
    curve_2d, curves = run_arms(s, opts.threads)
    return emit(figures(curve_2d, curves, s))
