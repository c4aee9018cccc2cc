"""Benchmark 5 - the transfer claim: training steps for a DX-Net to reach a validation Dice,
started from a 2D encoder trained on the task's slices (inflated) vs from random weights.

Task (synthetic, 1 channel, size^3 voxels): ellipsoids that differ from their surroundings only
by texture. Background and objects carry the same sinusoidal stripes (same mean, same variance,
Gaussian noise on top) at orientations 90 degrees apart in the in-plane axes (0, 1), with a slow
phase drift along the depth axis (2) so no two slices are the same. No intensity threshold
separates them: a net needs oriented filters and context, which is what a pretrained encoder
brings. (On the earlier task, bright BraTS-like ellipsoids, a random init reached Dice 0.8 in 40
steps from the full-resolution skip path alone, and inflation did not help: 1.5x the steps.)
For each seed (own volumes, own init):
1. 2D: an Omnia-Net (same timm encoder, same stem width and activation as the DX-Net) trains on
   slices along axis 2 of the training volumes for `pretrain_steps` steps.
2. 3D, three arms, same seed (same decoder init, same batches), same loss (crossdim's Dice+BCE)
   and optimizer (crossdim's default NAdam+Lookahead): random init; the Omnia-Net's encoder and
   stem inflated with `repeat` (I3D: kernel repeated over depth / depth); with `center` (kernel
   in the middle slice, zeros elsewhere).
Every `eval_every` steps the Dice over the validation volumes is measured; an arm's figure is the
first step that reaches `target_dice` (capped at `max_steps`: "not reached"). Figures are
medians over the seeds, the per-seed values in the note. The 2D pretraining's steps and time are
reported next to it (it is not free; a natural-image encoder is pretrained once, elsewhere).
Goal: inflated (repeat) <= 0.5x the steps of random init.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from bench.common import BenchOptions, Figure, Goal, emit, median, ratio, say, set_threads

REGIONS = {"object": [1]}  # one sigmoid output
ARMS = ("random", "repeat", "center")


class TransferSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    encoder: str = "test_efficientnet"
    size: int = 32  # volume edge = 3D patch edge
    train_cases: int = 16
    val_cases: int = 4
    batch: int = 2
    pretrain_steps: int = 100
    pretrain_batch: int = 16  # slices
    max_steps: int = 80
    eval_every: int = 2
    target_dice: float = 0.8
    noise: float = 0.3  # Gaussian noise std; the stripes' amplitude is 1
    drift: float = 0.3  # stripe phase change per voxel along the depth axis (radians)
    seeds: tuple[int, ...] = (0, 1, 2)


def settings(opts: BenchOptions) -> TransferSettings:
    if opts.quick:
        return TransferSettings(train_cases=4, val_cases=2, pretrain_steps=4, pretrain_batch=4, max_steps=4,
                                eval_every=2, seeds=(0,))
    return TransferSettings()


# ----------------------------------------------------------------------------- data (pure)
@dataclass(frozen=True)
class Volume:
    image: np.ndarray  # float32 (1, S, S, S)
    label: np.ndarray  # uint8 (S, S, S), 1 = object
    id: str = ""


def texture_case(rng: np.random.Generator, size: int, noise: float, drift: float) -> Volume:
    """One volume of the texture task (pure given `rng`): 1-2 ellipsoids whose stripes run at 90
    degrees to the background's (orientation jittered by +-0.2 rad, period 3.5-5 voxels)."""
    a, b, depth = np.meshgrid(*[np.arange(size, dtype=np.float64)] * 3, indexing="ij")

    def stripes(angle: float) -> np.ndarray:
        k = 2 * np.pi / rng.uniform(3.5, 5.0)
        return np.sin(k * (np.cos(angle) * a + np.sin(angle) * b) + drift * depth + rng.uniform(0, 2 * np.pi))

    base = rng.uniform(-0.2, 0.2)
    background, inside = stripes(base), stripes(base + np.pi / 2)
    label = np.zeros((size,) * 3, bool)
    grid = np.stack([a, b, depth])
    for _ in range(int(rng.integers(1, 3))):
        center = rng.uniform(0.25 * size, 0.75 * size, 3)[:, None, None, None]
        radii = rng.uniform(0.12 * size, 0.25 * size, 3)[:, None, None, None]
        label |= (((grid - center) / radii) ** 2).sum(0) <= 1
    image = np.where(label, inside, background) + rng.normal(0.0, noise, label.shape)
    return Volume(image[None].astype(np.float32), label.astype(np.uint8))


def make_volumes(count: int, first_index: int, s: TransferSettings, seed: int) -> list[Volume]:
    volumes = []
    for index in range(first_index, first_index + count):
        volume = texture_case(np.random.default_rng([seed, index]), s.size, s.noise, s.drift)
        volumes.append(Volume(volume.image, volume.label, f"case{index}"))
    return volumes


def region_targets(labels: np.ndarray) -> np.ndarray:
    """(B, *S) labels -> (B, 1, *S) float32 object masks (pure)."""
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


def pretrain_2d(train_set: list[Volume], val_set: list[Volume], s: TransferSettings, seed: int) -> tuple[Any, Curve]:
    """An Omnia-Net trained on slices along axis 2 (random 2D patches = whole slices)."""
    import torch

    from crossdim.data.sampling import PatchSampler, SampleSpec
    from crossdim.models import create_model

    torch.manual_seed(seed)
    model = create_model("omnianet", encoder=s.encoder, in_channels=1, num_classes=len(REGIONS), act="silu")
    sampler = PatchSampler(train_set, SampleSpec((s.size, s.size), 0.33, slice_axis=2), seed=seed)
    val_x, val_y = val_slices(val_set)
    return model, train(model, sampler, s.pretrain_batch, (val_x, val_y), s, s.pretrain_steps, stop_at_target=False)


def val_slices(val_set: list[Volume]) -> tuple[Any, np.ndarray]:
    """Every slice along axis 2 of the validation volumes as a 2D batch."""
    import torch

    images = np.concatenate([np.moveaxis(v.image, 3, 0) for v in val_set])  # (B*S, C, S, S)
    labels = np.concatenate([np.moveaxis(v.label, 2, 0) for v in val_set])  # (B*S, S, S)
    return torch.from_numpy(np.ascontiguousarray(images)), region_targets(labels)


def dxnet_arm(arm: str, state_2d: dict[str, Any], s: TransferSettings, seed: int) -> Any:
    """The DX-Net of one arm; every arm draws the same random init first (same seed)."""
    import torch

    from crossdim.models import create_model

    torch.manual_seed(seed)
    mode = "repeat" if arm == "random" else arm
    model = create_model("dxnet", encoder=s.encoder, in_channels=1, num_classes=len(REGIONS), inflate_mode=mode)
    if arm != "random":
        model.load_2d_state(state_2d)
    return model


def run_arms(s: TransferSettings, seed: int) -> tuple[Curve, dict[str, Curve]]:
    """The 2D pretraining and the three 3D arms of one seed."""
    import torch

    from crossdim.data.sampling import PatchSampler, SampleSpec

    train_set = make_volumes(s.train_cases, 0, s, seed)
    val_set = make_volumes(s.val_cases, s.train_cases, s, seed)
    say(f"transfer: seed {seed}: 2D pretraining on slices, {s.pretrain_steps} steps")
    model_2d, curve_2d = pretrain_2d(train_set, val_set, s, seed)
    state_2d = {k: v.detach().clone() for k, v in model_2d.state_dict().items()}
    val_x = torch.from_numpy(np.stack([v.image for v in val_set]))
    val_y = region_targets(np.stack([v.label for v in val_set]))
    curves = {}
    for arm in ARMS:
        sampler = PatchSampler(train_set, SampleSpec((s.size,) * 3, 0.33), seed=seed)
        curves[arm] = train(dxnet_arm(arm, state_2d, s, seed), sampler, s.batch, (val_x, val_y), s, s.max_steps)
        say(f"transfer: seed {seed}: {arm}: steps to target {curves[arm].steps_to_target}, "
            f"Dice {[round(d, 2) for _, d in curves[arm].dice]}")
    return curve_2d, curves


# ----------------------------------------------------------------------------- figures
def median_or_none(values: list[float | None]) -> float | None:
    """The median, where None (target not reached) ranks above every number; None if it is the median (pure)."""
    ordered = sorted(values, key=lambda v: float("inf") if v is None else v)
    middle = ordered[(len(ordered) - 1) // 2 : len(ordered) // 2 + 1]
    return None if None in middle else median(middle)


def steps_figure(arm: str, runs: list[dict[str, Curve]], s: TransferSettings) -> Figure:
    """Median steps over seeds."""
    steps = [r[arm].steps_to_target for r in runs]
    seconds = sum(r[arm].seconds for r in runs)
    note = f"per seed {['-' if v is None else v for v in steps]} (- = not within {s.max_steps}), {seconds:.0f} s"
    return Figure(f"transfer_steps_to_dice{s.target_dice:g}_{arm}", median_or_none(steps), " steps", note=note)


def steps_ratio(name: str, arm: Curve, base: Curve, s: TransferSettings, goal: Goal | None) -> Figure:
    """arm/base steps; when only the base missed the target, the cap gives an upper bound."""
    if arm.steps_to_target is None:
        return Figure(name, None, "x", goal, note=f"not reached within {s.max_steps} steps")
    if base.steps_to_target is None:
        return Figure(name, arm.steps_to_target / s.max_steps, "x", goal,
                      note=f"upper bound: the baseline did not reach it within {s.max_steps} steps")
    return Figure(name, ratio(arm.steps_to_target, base.steps_to_target, "baseline steps"), "x", goal)


def median_ratio(name: str, arm: str, base: str, runs: list[dict[str, Curve]], s: TransferSettings,
                 goal: Goal | None) -> Figure:
    """The median over seeds of the per-seed step ratios (a seed without a ratio counts as the worst)."""
    per_seed = [steps_ratio(name, r[arm], r[base], s, goal) for r in runs]
    values = [f.value for f in per_seed]
    note = "per seed " + ", ".join("n/a" if v is None else f"{v:.2f}" for v in values)
    bounds = [f.note for f in per_seed if f.note]
    return Figure(name, median_or_none(values), "x", goal, note=note + (f"; {bounds[0]}" if bounds else ""))


def figures(pretrain: list[Curve], runs: list[dict[str, Curve]], s: TransferSettings) -> list[Figure]:
    dice_2d = ", ".join(f"{c.dice[-1][1]:.3f}" for c in pretrain)
    out = [Figure("transfer_pretrain_2d", float(s.pretrain_steps), " steps",
                  note=f"{s.pretrain_batch} slices/step, {sum(c.seconds for c in pretrain):.0f} s over "
                       f"{len(pretrain)} seed(s), 2D val Dice {dice_2d}; task {s.train_cases} texture volumes "
                       f"{s.size}^3, noise {s.noise:g}, {s.encoder}")]
    out += [steps_figure(arm, runs, s) for arm in ARMS]
    out += [
        median_ratio("transfer_repeat_vs_random_steps", "repeat", "random", runs, s, Goal("<=", 0.5)),
        median_ratio("transfer_center_vs_random_steps", "center", "random", runs, s, None),
        median_ratio("transfer_center_vs_repeat_steps", "center", "repeat", runs, s, None),
    ]
    return out


def run(opts: BenchOptions) -> list[Figure]:
    s = settings(opts)
    set_threads(opts.threads)
    pretrain, runs = [], []
    for seed in s.seeds:
        curve_2d, curves = run_arms(s, seed)
        pretrain.append(curve_2d)
        runs.append(curves)
    return emit(figures(pretrain, runs, s))
