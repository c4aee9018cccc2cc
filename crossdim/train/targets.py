"""What the network predicts, decided from the manifest's `dataset` section.

- multi-class (softmax): one channel per label of `dataset.labels` (sorted by raw value, 0 =
  background first); raw label values are remapped to 0..K-1;
- multi-label regions (sigmoid): one channel per entry of `dataset.regions` (e.g. BraTS ET/TC/WT),
  channel r = label value in regions[r].

`TargetSpec` travels to the workers and into every checkpoint's dataset.json.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from crossdim.data.formats.base import DataError

if TYPE_CHECKING:  # pragma: no cover
    import torch


class TargetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["multiclass", "regions"]
    channel_names: list[str]  # one per output channel (multiclass: background first)
    label_values: list[int] = []  # multiclass: the raw label value of each channel
    regions: dict[str, list[int]] = {}  # regions: raw label values per channel name

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def region_values(self) -> list[list[int]]:
        """Raw label values of each region, in channel order. `regions` is a dict whose key order
        does not survive a JSON round trip with sorted keys (dataset.json), so channel order is
        always taken from `channel_names`."""
        return [self.regions[name] for name in self.channel_names]

    @property
    def metric_names(self) -> list[str]:
        """Classes scored in validation: every region, or every non-background class."""
        return list(self.channel_names) if self.kind == "regions" else list(self.channel_names[1:])


def target_spec(dataset: dict[str, Any]) -> TargetSpec:
    """Manifest `dataset` section -> TargetSpec (DataError naming the field when unusable)."""
    regions = dataset.get("regions") or {}
    if regions:
        if not all(isinstance(v, list) and v for v in regions.values()):
            raise DataError("manifest dataset.regions: every region needs a non-empty list of label values")
        return TargetSpec(kind="regions", channel_names=list(regions),
                          regions={k: [int(x) for x in v] for k, v in regions.items()})
    try:
        labels = {int(k): str(v) for k, v in (dataset.get("labels") or {}).items()}
    except (TypeError, ValueError):
        raise DataError(f"manifest dataset.labels: keys must be integer label values, got {list(dataset['labels'])}") from None
    values = sorted(labels)
    if len(values) < 2 or values[0] != 0:
        raise DataError(f"manifest dataset.labels: need background 0 and at least one class, got {values}")
    return TargetSpec(kind="multiclass", channel_names=[labels[v] for v in values], label_values=values)


def encode_labels(label: np.ndarray, spec: TargetSpec) -> np.ndarray:
    """Raw label array (*S) -> training target: multiclass int64 (1, *S) of channel indices;
    regions float32 (R, *S) of 0/1. Unknown raw values are an error (pure)."""
    if spec.kind == "regions":
        return np.stack([np.isin(label, values) for values in spec.region_values]).astype(np.float32)
    lut = np.full(256, -1, dtype=np.int64)
    lut[spec.label_values] = np.arange(len(spec.label_values))
    out = lut[label.astype(np.uint8)]
    if (out < 0).any():
        bad = sorted(set(np.unique(label[out < 0]).tolist()))
        raise DataError(f"label values {bad} are not in the manifest's labels {spec.label_values}")
    return out[None]


def logits_to_masks(logits: "torch.Tensor", spec: TargetSpec) -> "torch.Tensor":
    """Logits (B, K, *S) -> boolean one-hot masks (B, K, *S) (pure).

    multiclass: argmax one-hot (channel 0 = background kept); regions: sigmoid > 0.5, i.e. logit > 0.
    """
    import torch

    if spec.kind == "regions":
        return logits > 0
    index = logits.argmax(1)
    return torch.stack([index == k for k in range(logits.shape[1])], 1)


def masks_from_labels(label: "torch.Tensor", spec: TargetSpec) -> "torch.Tensor":
    """Raw labels (B, *S) (torch) -> boolean one-hot masks (B, K, *S) matching `logits_to_masks`."""
    import torch

    if spec.kind == "regions":
        chans = [torch.isin(label, torch.tensor(v, device=label.device)) for v in spec.region_values]
    else:
        chans = [label == v for v in spec.label_values]
    return torch.stack(chans, 1)


def masks_to_label_map(masks: np.ndarray, spec: TargetSpec) -> np.ndarray:
    """Boolean masks (K, *S) -> a label map in raw values (*S), uint8 (pure).

    multiclass: the raw value of the one true channel; regions: each region paints the smallest
    raw value it owns, widest region first (BraTS WT -> TC -> ET gives 2 / 1 / 4 of 2021 naming).
    """
    out = np.zeros(masks.shape[1:], dtype=np.uint8)
    if spec.kind == "multiclass":
        for k, value in enumerate(spec.label_values):
            out[masks[k]] = value
        return out
    order = sorted(spec.regions, key=lambda name: -len(spec.regions[name]))
    for name in order:
        owned = set(spec.regions[name])
        narrower = set().union(*[set(spec.regions[n]) for n in order if set(spec.regions[n]) < owned])
        own_values = sorted(owned - narrower) or sorted(owned)
        out[masks[spec.channel_names.index(name)]] = own_values[0]
    return out
