"""Prediction on one case: replay the recorded preprocessing, slide the training window, optional
flip TTA, then invert everything onto the input's own grid.

The checkpoint's `dataset.json` (written by training) is the model card: the dataset section
(channels, labels, regions, label convention, format), the preprocessing plan, the target spec
(multi-class or regions) and the window (patch size, overlap, blending, slice axis for a 2D model
on 3D data). The caller passes nothing else.

Probabilities are inverted (linear resampling) rather than labels, so the label decision is taken
on the original grid: multi-class -> argmax mapped back to the raw label values; regions (BraTS
ET/TC/WT) -> sigmoid > 0.5, painted back into one label map in the dataset's own convention
(0/1/2/4 for brats2021, 0/1/2/3 for brats2023).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from crossdim.config import PredictConfig, ValidationConfig
from crossdim.data.formats.base import DataError
from crossdim.data.preprocess import PreprocessPlan, invert_to_original, preprocess_image_for_inference
from crossdim.train.targets import TargetSpec, masks_to_label_map

DATASET_JSON = "dataset.json"


class Window(BaseModel):
    model_config = ConfigDict(extra="ignore")

    roi_size: list[int]
    overlap: float = 0.5
    mode: Literal["gaussian", "constant"] = "gaussian"
    slice_axis: int | None = None  # a 2D window on 3D data: predict slice by slice along this axis


class ModelCard(BaseModel):
    """What a checkpoint's dataset.json tells inference (extra keys are ignored)."""

    model_config = ConfigDict(extra="ignore")

    dataset: dict[str, Any] = Field(default_factory=dict)
    preprocess: PreprocessPlan
    target: TargetSpec
    window: Window
    in_channels: int
    spatial_dims: int  # of the data (a 2D Omnia-Net trained on 3D volumes says 3)
    fingerprint: str | None = None

    @field_validator("preprocess", mode="before")
    @classmethod
    def _plan(cls, value: Any) -> Any:
        # accept the manifest's resolved preprocess section too: its fitted plan sits under "plan"
        return value["plan"] if isinstance(value, dict) and isinstance(value.get("plan"), dict) else value

    @property
    def channel_names(self) -> tuple[str, ...]:
        names = [str(n) for n in self.dataset.get("channel_names") or []]
        return tuple(names) if len(names) == self.in_channels else tuple(f"{i:04d}" for i in range(self.in_channels))

    @property
    def dataset_format(self) -> str | None:
        return self.dataset.get("format") or None

    @property
    def label_convention(self) -> str:
        return str(self.dataset.get("label_convention") or "")


def read_card(directory: Path) -> ModelCard:
    path = Path(directory) / DATASET_JSON
    if not path.is_file():
        raise ValueError(f"{directory}: checkpoint has no {DATASET_JSON} (preprocessing record, classes, window); "
                         "was it written by crossdim training?")
    try:
        return ModelCard.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError) as exc:
        first = str(exc).splitlines()
        raise ValueError(f"{path}: not a usable model card ({' '.join(first[:3])[:300]})") from None


@dataclass
class Prediction:
    labels: np.ndarray  # (*spatial) uint8, raw label values
    probabilities: np.ndarray | None  # (K, *spatial) float32, one channel per class/region
    class_names: list[str]


# ----------------------------------------------------------------------------- pure helpers
def activation(logits: torch.Tensor, spec: TargetSpec) -> torch.Tensor:
    """Logits (B, K, *S) -> probabilities: softmax over classes, or sigmoid per region (pure)."""
    return torch.sigmoid(logits) if spec.kind == "regions" else torch.softmax(logits, dim=1)


def flip_sets(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes of a (B, C, *S) tensor, the identity first (pure)."""
    axes = range(2, 2 + spatial_dims)
    return [c for r in range(spatial_dims + 1) for c in itertools.combinations(axes, r)]


def probabilities_to_labels(probs: np.ndarray, spec: TargetSpec) -> np.ndarray:
    """Probabilities (K, *S) -> label map (*S) uint8 in raw label values (pure)."""
    if spec.kind == "regions":
        return masks_to_label_map(probs > 0.5, spec)
    lut = np.asarray(spec.label_values, dtype=np.uint8)
    return lut[np.argmax(probs, axis=0)]


def invert_probabilities(probs: np.ndarray, geometry: dict[str, Any], spec: TargetSpec) -> np.ndarray:
    """Probabilities on the preprocessed grid -> on the original grid (linear resampling).

    Outside the cropped box every region is 0; for multi-class the background channel is
    recomputed as 1 - sum(foreground), so it is 1 there and the channels keep summing to 1 (pure)."""
    if spec.kind == "regions":
        return invert_to_original(probs.astype(np.float32), geometry, mode="linear")
    foreground = invert_to_original(probs[1:].astype(np.float32), geometry, mode="linear")
    background = np.clip(1.0 - foreground.sum(axis=0, keepdims=True), 0.0, 1.0)
    return np.concatenate([background, foreground]).astype(np.float32)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a torch device (auto, cpu, cuda, cuda:1, ...)") from None


# ----------------------------------------------------------------------------- the predictor
class Predictor:
    """A model with its card: `predict(image, affine)` for raw inputs, `predict_preprocessed` for
    cases already on the preprocessed grid (shards)."""

    def __init__(self, model: nn.Module, card: ModelCard, config: PredictConfig | None = None,
                 source: Any = None) -> None:
        self.config = config or PredictConfig()
        self.device = resolve_device(self.config.device)
        self.model = model.to(self.device).eval()
        self.card = card
        self.source = source  # the PulledModel it came from (name, version, directory)

    @property
    def spec(self) -> TargetSpec:
        return self.card.target

    @property
    def class_names(self) -> list[str]:
        return list(self.spec.channel_names)

    def check_channels(self, image: np.ndarray, where: str) -> None:
        if image.ndim != self.card.spatial_dims + 1:
            raise DataError(f"{where}: image shape {tuple(image.shape[1:])} is not {self.card.spatial_dims}D "
                            "as the model's training data")
        if image.shape[0] != self.card.in_channels:
            raise DataError(f"{where}: {image.shape[0]} channel(s), the model expects {self.card.in_channels} "
                            f"({', '.join(self.card.channel_names)})")

    def predict(self, image: np.ndarray, affine: np.ndarray, where: str = "image") -> Prediction:
        """A raw image (C, *spatial) + its affine -> labels (and probabilities) on the same grid."""
        self.check_channels(image, where)
        tensor, geometry = preprocess_image_for_inference(image, affine, self.card.preprocess)
        return self.predict_preprocessed(tensor, geometry)

    def predict_preprocessed(self, image: torch.Tensor | np.ndarray, geometry: dict[str, Any]) -> Prediction:
        """A preprocessed image (C, *S) + its geometry record -> prediction on the original grid."""
        probs = self.probabilities(torch.as_tensor(np.asarray(image, dtype=np.float32)))
        original = invert_probabilities(probs, geometry, self.spec)
        labels = probabilities_to_labels(original, self.spec)
        keep = original if self.config.save_probabilities else None
        return Prediction(labels=labels, probabilities=keep, class_names=self.class_names)

    def probabilities(self, image: torch.Tensor) -> np.ndarray:
        """Preprocessed image (C, *S) -> probabilities (K, *S) on the same grid (TTA-averaged)."""
        from crossdim.train.validation import predict_logits

        window = self.card.window
        cfg = ValidationConfig(sw_overlap=self.config.sw_overlap, sw_mode=self.config.sw_mode,
                               sw_batch_size=self.config.sw_batch_size)
        x = image[None].to(self.device)
        flips = flip_sets(x.ndim - 2) if self.config.tta else [()]
        total = None
        with torch.no_grad():
            for axes in flips:
                flipped = torch.flip(x, axes) if axes else x
                logits = predict_logits(self.model, flipped, window.roi_size, cfg, window.slice_axis)
                probs = activation(logits.float(), self.spec)
                probs = torch.flip(probs, axes) if axes else probs
                total = probs if total is None else total + probs
        return (total / len(flips))[0].cpu().numpy()
