"""Whole-case validation: sliding-window inference, Dice and HD95 per class, reduced across workers.

- `predict_logits`: MONAI `sliding_window_inference` with the training patch as the window
  (overlap and gaussian/constant blending from ValidationConfig). A 2D model on 3D cases
  (Omnia-Net on CT/MR) predicts slice by slice along `slice_axis` and the slices are stacked.
- `MetricSums`: per-class sums and counts of Dice (MONAI `DiceMetric`, an empty truth with an
  empty prediction scores 1, with a non-empty one 0) and HD95 (MONAI `HausdorffDistanceMetric`,
  percentile 95, in mm from the case spacing; undefined values, i.e. an empty truth or prediction,
  are left out of the mean). `all_reduce` sums them over workers (torch.distributed), so each
  worker validates only its own cases and every rank ends with the same numbers.
- `summary` -> {"val_dice": mean over classes, "val_dice_<name>", "val_hd95_<name>"}.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from crossdim.config import ValidationConfig
from crossdim.train.targets import TargetSpec, logits_to_masks, masks_from_labels

SLICE_CHUNK = 32  # 2D slices predicted per call when a 2D model validates a 3D case


def predict_logits(model: nn.Module, image: torch.Tensor, roi: Sequence[int], cfg: ValidationConfig,
                   slice_axis: int | None = None) -> torch.Tensor:
    """Logits (1, K, *S) for one case `image` (1, C, *S) (on the model's device)."""
    from monai.inferers import sliding_window_inference

    def window(x: torch.Tensor) -> torch.Tensor:
        return sliding_window_inference(x, list(roi), cfg.sw_batch_size, model, overlap=cfg.sw_overlap,
                                        mode=cfg.sw_mode)

    spatial = image.ndim - 2
    if spatial == len(roi):
        return window(image)
    if spatial == 3 and len(roi) == 2 and slice_axis is not None:
        return _slicewise(window, image, slice_axis % 3)
    raise ValueError(f"cannot predict a {spatial}-D case with a {len(roi)}-D window (slice_axis={slice_axis})")


def _slicewise(window: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, axis: int) -> torch.Tensor:
    """(1, C, *S3) -> slices along spatial `axis` as a batch -> predicted -> (1, K, *S3)."""
    moved = image[0].movedim(axis + 1, 0)  # (N, C, a, b)
    outs = [window(moved[i : i + SLICE_CHUNK]) for i in range(0, moved.shape[0], SLICE_CHUNK)]
    return torch.cat(outs, 0).movedim(0, axis + 1)[None]  # (1, K, *S3)


@dataclass
class MetricSums:
    """Running per-class Dice/HD95 sums and counts (float64 tensors of length `len(names)`)."""

    names: list[str]
    values: torch.Tensor = field(init=False)  # rows: dice_sum, dice_n, hd_sum, hd_n

    def __post_init__(self) -> None:
        self.values = torch.zeros(4, len(self.names), dtype=torch.float64)

    def add(self, dice: torch.Tensor, hd95: torch.Tensor | None = None) -> None:
        """Per-class values of one case (NaN/inf entries are not counted)."""
        for row, vals in ((0, dice), (2, hd95)):
            if vals is None:
                continue
            vals = vals.detach().double().cpu().reshape(-1)
            ok = torch.isfinite(vals)
            self.values[row] += torch.where(ok, vals, torch.zeros_like(vals))
            self.values[row + 1] += ok.double()

    def all_reduce(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            backend = dist.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            buf = self.values.to(device)
            dist.all_reduce(buf)
            self.values = buf.cpu()

    def summary(self, prefix: str = "val_") -> dict[str, float]:
        dice = self.values[0] / self.values[1].clamp(min=1)
        hd = self.values[2] / self.values[3].clamp(min=1)
        out: dict[str, float] = {}
        scored = self.values[1] > 0
        out[f"{prefix}dice"] = float(dice[scored].mean()) if scored.any() else float("nan")
        for i, name in enumerate(self.names):
            out[f"{prefix}dice_{name}"] = float(dice[i]) if self.values[1, i] > 0 else float("nan")
            if self.values[3, i] > 0:
                out[f"{prefix}hd95_{name}"] = float(hd[i])
        out[f"{prefix}cases"] = float(self.values[1].max())
        return out


def case_scores(pred: torch.Tensor, truth: torch.Tensor, spacing: Sequence[float] | None,
                hd95: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-class Dice and HD95 of boolean masks (1, K, *S) (pure)."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    pred_f, truth_f = pred.float(), truth.float()
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(pred_f, truth_f)[0]
    if not hd95:
        return dice, None
    both = pred.flatten(2).any(-1) & truth.flatten(2).any(-1)  # HD95 is undefined otherwise
    hd = torch.full_like(dice, float("nan"))
    if both.any():
        metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
        kwargs = {"spacing": list(spacing)} if spacing is not None else {}
        full = metric(pred_f, truth_f, **kwargs)[0]
        hd = torch.where(both[0].to(full.device), full, hd.to(full.device))
    return dice, hd


def metric_channels(masks: torch.Tensor, spec: TargetSpec) -> torch.Tensor:
    """Drop the background channel of multiclass masks (pure)."""
    return masks if spec.kind == "regions" else masks[:, 1:]


@dataclass
class Overlay:
    """One slice for the validation picture: image (H, W), truth and prediction label maps."""

    case_id: str
    image: np.ndarray
    truth: np.ndarray
    prediction: np.ndarray


def overlay_slice(case_id: str, image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> Overlay:
    """The slice with the most foreground of a (C, *S) image and (*S) label maps (pure)."""
    if truth.ndim == 2:
        return Overlay(case_id, image[0], truth, pred)
    counts = (truth > 0).sum(axis=(1, 2)) + (pred > 0).sum(axis=(1, 2))
    z = int(np.argmax(counts))
    return Overlay(case_id, image[0, z], truth[z], pred[z])


def label_index_map(masks: torch.Tensor) -> np.ndarray:
    """Masks (1, K, *S) -> channel index map for pictures: argmax for one-hot, highest true region (pure)."""
    m = masks[0].cpu().numpy()
    weights = np.arange(1, m.shape[0] + 1).reshape((-1,) + (1,) * (m.ndim - 1))
    return (m * weights).max(0).astype(np.uint8)


def validate(model: nn.Module, cases: Iterable, spec: TargetSpec, roi: Sequence[int], cfg: ValidationConfig,
             device: torch.device, slice_axis: int | None = None,
             autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> tuple[MetricSums, Overlay | None]:
    """Score every case (objects with id, image (C, *S), label (*S), spacing) on this worker.

    Call `sums.all_reduce()` afterwards on every rank (collective) to get global numbers.
    """
    sums = MetricSums(spec.metric_names)
    overlay = None
    model.eval()
    with torch.no_grad():
        for n, case in enumerate(cases):
            if cfg.max_cases is not None and n >= cfg.max_cases:
                break
            image = torch.from_numpy(np.ascontiguousarray(case.image))[None].to(device)
            with autocast():
                logits = predict_logits(model, image, roi, cfg, slice_axis).float()
            pred = logits_to_masks(logits, spec)
            truth = masks_from_labels(torch.from_numpy(case.label.astype(np.int64))[None].to(device), spec)
            dice, hd = case_scores(metric_channels(pred, spec).cpu(), metric_channels(truth, spec).cpu(),
                                   case.spacing, cfg.hd95)
            sums.add(dice, hd)
            if overlay is None:
                overlay = overlay_slice(case.id, case.image, label_index_map(metric_channels(truth, spec)),
                                        label_index_map(metric_channels(pred, spec)))
    return sums, overlay
