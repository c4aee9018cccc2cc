"""Shared by the inference/evaluation/export tests: stub models with a known answer, checkpoints
written the way training writes them, synthetic volumes with oblique anisotropic geometry, and a
small preprocessed shard dataset written without Ray."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn as nn

from crossdim.data.preprocess import ChannelNorm, PreprocessPlan
from crossdim.data.synth import ellipsoid, make_affine
from crossdim.models.io import save_model
from crossdim.models.registry import create_model, list_architectures, register_architecture
from crossdim.train.checkpoint import write_dataset_info
from crossdim.train.targets import TargetSpec

STUB_ARCH = "test_threshold"


class ThresholdNet(nn.Module):
    """A model with a known answer: class/region k is "channel (k-1) % C above `threshold`".

    Multi-class: logits [0, s*(x_0 - t), s*(x_1 - t), ...]; regions: logit_r = s*(x_{r % C} - t_r).
    Works on any spatial dims (2D windows or 3D patches); one learnable parameter (the sharpness s)
    so it has weights to save and restore."""

    def __init__(self, encoder: str = "none", in_channels: int = 1, num_classes: int = 2,
                 regions: bool = False, thresholds: Sequence[float] = (0.0,), spatial_dims: int = 3,
                 pretrained: bool = False) -> None:
        super().__init__()
        self.in_channels, self.num_classes, self.regions = in_channels, num_classes, regions
        self.spatial_dims = spatial_dims
        self.scale = nn.Parameter(torch.tensor(8.0))
        self.register_buffer("thresholds", torch.tensor(list(thresholds), dtype=torch.float32))

    def _threshold(self, k: int) -> torch.Tensor:
        return self.thresholds[min(k, self.thresholds.numel() - 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"ThresholdNet({self.spatial_dims}D) got input of shape {tuple(x.shape)}")
        if self.regions:
            chans = [self.scale * (x[:, k % self.in_channels] - self._threshold(k)) for k in range(self.num_classes)]
        else:
            chans = [torch.zeros_like(x[:, 0])]
            chans += [self.scale * (x[:, (k - 1) % self.in_channels] - self._threshold(k - 1))
                      for k in range(1, self.num_classes)]
        return torch.stack(chans, 1)


def register_stub() -> None:
    """Make the stub buildable by create_model (also the Ray worker setup hook of the batch test)."""
    if STUB_ARCH not in list_architectures():
        register_architecture(STUB_ARCH)(ThresholdNet)


register_stub()


def stub_model(**kw: Any) -> nn.Module:
    kw.setdefault("encoder", "none")
    kw.setdefault("in_channels", 1)
    kw.setdefault("num_classes", 2)
    return create_model(STUB_ARCH, **kw).eval()


# ----------------------------------------------------------------------------- model cards
def plan(spatial_dims: int = 3, channels: int = 1, target_spacing: list[float] | None = None,
         scheme: str = "zscore_nonzero", crop: bool = True) -> PreprocessPlan:
    return PreprocessPlan(spatial_dims=spatial_dims, orientation="RAS", target_spacing=target_spacing,
                          normalization=[ChannelNorm(scheme=scheme) for _ in range(channels)],
                          crop_foreground=crop, image_dtype="float32")


def multiclass_card(preprocess: PreprocessPlan, labels: dict[int, str], channel_names: Sequence[str],
                    roi: Sequence[int], slice_axis: int | None = None, fmt: str = "msd") -> dict[str, Any]:
    values = sorted(labels)
    target = TargetSpec(kind="multiclass", channel_names=[labels[v] for v in values], label_values=values)
    return _card(preprocess, target, {"labels": {str(k): v for k, v in labels.items()}, "regions": {}},
                 channel_names, roi, slice_axis, fmt, "")


def regions_card(preprocess: PreprocessPlan, convention: str, roi: Sequence[int]) -> dict[str, Any]:
    et = 4 if convention == "brats2021" else 3
    regions = {"ET": [et], "TC": [1, et], "WT": [1, 2, et]}
    names = ["flair", "t1", "t1ce", "t2"] if convention == "brats2021" else ["t2f", "t1n", "t1c", "t2w"]
    labels = {"0": "background", "1": "NCR", "2": "ED", str(et): "ET"}
    target = TargetSpec(kind="regions", channel_names=list(regions), regions=regions)
    return _card(preprocess, target, {"labels": labels, "regions": regions}, names, roi, None, "brats", convention)


def _card(preprocess: PreprocessPlan, target: TargetSpec, labels: dict[str, Any], channel_names: Sequence[str],
          roi: Sequence[int], slice_axis: int | None, fmt: str, convention: str) -> dict[str, Any]:
    dataset = {"format": fmt, "name": "synthetic", "modality": "MR", "channel_names": list(channel_names),
               "spatial_dims": preprocess.spatial_dims, "label_convention": convention, **labels}
    return {
        "dataset": dataset,
        "preprocess": preprocess.model_dump(mode="json"),
        "fingerprint": "f" * 16,
        "target": target.model_dump(mode="json"),
        "window": {"roi_size": list(roi), "overlap": 0.25, "mode": "gaussian", "slice_axis": slice_axis},
        "in_channels": len(channel_names),
        "spatial_dims": preprocess.spatial_dims,
    }


def write_checkpoint(directory: Path, model: nn.Module, card: dict[str, Any]) -> Path:
    """A checkpoint directory the way training writes it: config.json + model.safetensors + dataset.json."""
    save_model(model, str(directory))
    write_dataset_info(str(directory), card)
    return directory


# ----------------------------------------------------------------------------- volumes
def blob_volume(shape: Sequence[int] = (40, 44, 24), spacing: Sequence[float] = (0.9, 1.3, 2.5),
                oblique: bool = True, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image (x, y, z) float32, truth uint8, affine): a bright off-centre ellipsoid inside a
    non-zero "body" box on a zero background (so foreground cropping has work to do)."""
    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    body = np.zeros(shape, bool)
    body[3:-3, 4:-2, 2:-2] = True
    centre = [0.58 * (shape[0] - 1), 0.42 * (shape[1] - 1), 0.55 * (shape[2] - 1)]
    truth = ellipsoid(shape, spacing, centre, [11.0, 12.0, 14.0]) & body
    image = np.where(body, 0.5 + rng.normal(0, 0.05, shape), 0.0) + 2.0 * truth
    return image.astype(np.float32), truth.astype(np.uint8), make_affine(shape, spacing, oblique)


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=2)
    nib.save(image, str(path))
    return path


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


# ----------------------------------------------------------------------------- shard datasets
def write_shard_dataset(uri: str, cases: Sequence[tuple[str, np.ndarray, np.ndarray | None, np.ndarray]],
                        preprocess: PreprocessPlan, dataset: dict[str, Any]) -> dict[str, Any]:
    """Preprocess raw (id, image (C, *S), label, affine) cases with the real `preprocess_case` and
    write them as one shard + manifest (two folds), as the preprocessing job does."""
    from crossdim.data import shards
    from crossdim.data.formats.base import DatasetInfo, LoadedCase
    from crossdim.data.preprocess import preprocess_case

    info = DatasetInfo(format=dataset.get("format", "msd"), name="synthetic", modality="MR",
                       channel_names=list(dataset["channel_names"]),
                       labels={int(k): v for k, v in dataset["labels"].items()},
                       spatial_dims=preprocess.spatial_dims, cases=[], regions=dict(dataset.get("regions") or {}))
    rows = []
    for case_id, image, label, affine in cases:
        loaded = LoadedCase(id=case_id, image=image, label=label, affine=affine, source_files=(f"{case_id}.nii.gz",))
        img, lab, spacing, aff, geometry = preprocess_case(loaded, info, preprocess)
        rows.append(shards.encode_case(shards.CaseArrays(case_id, img, lab, spacing, aff, geometry), "float32"))
    entry = shards.write_shard(uri, shards.shard_name(0), rows)
    ids = [r["id"] for r in rows]
    manifest = {
        "format_version": shards.FORMAT_VERSION, "fingerprint": "d" * 16,
        "cases": [shards.case_record(r, entry["file"]) for r in rows], "quarantined": [],
        "splits": shards.make_splits(ids, 2, 0), "shards": [entry], "dataset": dataset,
        "preprocess": {"plan": preprocess.model_dump(mode="json")},
    }
    shards.write_manifest(uri, manifest)
    return manifest


def log_and_register(tracking_uri: str, run_id: str, checkpoint: Path, name: str, alias: str) -> str:
    """Log a checkpoint the way training does (crossdim.tracking's pyfunc model), register it, set
    the alias; returns the version."""
    from crossdim.tracking import log_checkpoint_model, register

    model_uri = log_checkpoint_model(tracking_uri, run_id, str(checkpoint))
    return register(tracking_uri, model_uri, name, alias)
