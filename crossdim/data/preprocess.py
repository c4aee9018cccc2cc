"""Per-case preprocessing with MONAI, recorded so that inference can replay and invert it.

Steps, in order (one `PreprocessPlan` drives them; the driver fits the plan on the dataset):

1. orientation to `plan.orientation` (RAS; a 2D image uses its first two codes) - MONAI `Orientation`
   on MetaTensors carrying the reader's affine;
2. resampling to `plan.target_spacing` (mm per array axis after orientation; None keeps each
   case's spacing) - MONAI `Spacing`, bilinear (trilinear in 3D) for images, nearest for labels;
3. crop to the bounding box of voxels that are non-zero in any channel (MONAI `CropForeground`,
   box recorded in the resampled grid; an all-zero image is not cropped). Cropping before
   normalising is equivalent to the reverse order: both schemes only use non-zero/foreground
   voxels, which all lie inside the box;
4. per-channel normalisation: "zscore_nonzero" (MR/US/other: mean/std over the channel's non-zero
   voxels, zeros stay zero) or "ct" (clip to the dataset's foreground percentiles, then subtract the
   dataset's clipped-foreground mean and divide by its std, all fitted in the plan) or "none".

`geometry` (a JSON-able dict) records what `invert_to_original` needs: original shape and affine,
the preprocessed affine and shape, orientation codes, crop box, target spacing, source files.
Inversion is one resampling from the preprocessed grid straight onto the original grid (through
world coordinates), so orientation, crop and spacing are undone together; it is exact when the
case's spacing already equals the target (only permutations, flips and integer shifts remain).
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Sequence
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from crossdim.data.formats.base import DatasetInfo, LoadedCase

Scheme = Literal["zscore_nonzero", "ct", "none"]
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
FOREGROUND_SAMPLES = 10_000  # voxels per channel and case sampled for the CT plan (as nnU-Net)
CT_MODALITY_NAMES = {"ct"}


class ChannelNorm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scheme: Scheme = "zscore_nonzero"
    clip: tuple[float, float] | None = None  # "ct": dataset foreground percentiles
    mean: float | None = None  # "ct": dataset clipped-foreground mean
    std: float | None = None  # "ct": dataset clipped-foreground std


class PreprocessPlan(BaseModel):
    """Everything `preprocess_case` needs; fitted once per dataset and stored in the manifest."""

    model_config = ConfigDict(extra="forbid")

    spatial_dims: Literal[2, 3]
    orientation: str = "RAS"
    target_spacing: list[float] | None = None
    normalization: list[ChannelNorm] = Field(default_factory=list)  # one per channel
    crop_foreground: bool = True
    image_dtype: Literal["float16", "float32"] = "float16"


# ----------------------------------------------------------------------------- pure geometry helpers
def affine_nd(affine: np.ndarray, spatial_dims: int) -> np.ndarray:
    """4x4 affine -> (d+1)x(d+1) (2D keeps the in-plane block and translation)."""
    a = np.asarray(affine, dtype=np.float64)
    keep = list(range(spatial_dims)) + [3]
    return a[np.ix_(keep, keep)]


def voxel_spacing(affine: np.ndarray, spatial_dims: int) -> tuple[float, ...]:
    """Spacing (mm) of each array axis of an affine."""
    block = affine_nd(affine, spatial_dims)[:spatial_dims, :spatial_dims]
    return tuple(float(v) for v in np.linalg.norm(block, axis=0))


def orientation_transform(affine: np.ndarray, spatial_dims: int, axcodes: str) -> np.ndarray:
    """nibabel ornt transform (row i: [new axis of input axis i, flip]) from the affine to `axcodes`."""
    source = nib.orientations.io_orientation(affine_nd(affine, spatial_dims))
    target = nib.orientations.axcodes2ornt(axcodes[:spatial_dims], labels=RAS_LABELS)
    return nib.orientations.ornt_transform(source, target)


def oriented_grid(shape: Sequence[int], affine: np.ndarray, spatial_dims: int,
                  axcodes: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(shape, spacing) of a grid after reorientation to `axcodes` (no resampling)."""
    transform = orientation_transform(affine, spatial_dims, axcodes)
    spacing = voxel_spacing(affine, spatial_dims)
    new_shape, new_spacing = [0] * spatial_dims, [0.0] * spatial_dims
    for axis, (target, _flip) in enumerate(transform):
        new_shape[int(target)] = int(shape[axis])
        new_spacing[int(target)] = spacing[axis]
    return tuple(new_shape), tuple(new_spacing)


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float] | None) -> tuple[int, ...]:
    """Approximate grid size after resampling (for size estimates; MONAI decides the exact one)."""
    if target is None:
        return tuple(int(s) for s in shape)
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


# ----------------------------------------------------------------------------- plan fitting
def channel_schemes(info: DatasetInfo, mode: str) -> list[Scheme]:
    """Normalisation scheme per channel: "auto" -> "ct" for CT channels, "zscore_nonzero" otherwise."""
    channels = len(info.channel_names)
    if mode != "auto":
        return [mode] * channels  # type: ignore[list-item]
    names = info.channel_modalities if len(info.channel_modalities) == channels else [info.modality] * channels
    return ["ct" if n.strip().lower() in CT_MODALITY_NAMES else "zscore_nonzero" for n in names]


def foreground_mask(loaded: LoadedCase) -> np.ndarray:
    """Foreground voxels: label > 0 when labelled (and not empty), else non-zero in any channel."""
    if loaded.label is not None and loaded.label.any():
        return loaded.label > 0
    return (loaded.image != 0).any(axis=0)


def foreground_sample(loaded: LoadedCase, count: int = FOREGROUND_SAMPLES) -> list[np.ndarray]:
    """Up to `count` foreground intensities per channel, sampled reproducibly (seeded by case id)."""
    mask = foreground_mask(loaded)
    rng = np.random.default_rng(zlib.crc32(loaded.id.encode()))
    out = []
    for channel in loaded.image:
        values = channel[mask]
        if values.size > count:
            values = values[np.sort(rng.choice(values.size, count, replace=False))]
        out.append(values.astype(np.float64))
    return out


def case_fingerprint(loaded: LoadedCase, info: DatasetInfo, axcodes: str = "RAS") -> dict[str, Any]:
    """What plan fitting needs from one case (JSON-able): oriented shape/spacing, foreground sample."""
    shape, spacing = oriented_grid(loaded.image.shape[1:], loaded.affine, info.spatial_dims, axcodes)
    return {
        "id": loaded.id,
        "shape": list(shape),
        "spacing": list(spacing),
        "channels": int(loaded.image.shape[0]),
        "foreground": [v.tolist() for v in foreground_sample(loaded)],
    }


def fit_plan(info: DatasetInfo, fingerprints: Sequence[dict[str, Any]], *,
             target_spacing: str | Sequence[float] | None = "median", orientation: str = "RAS",
             normalization: str = "auto", ct_percentiles: tuple[float, float] = (0.5, 99.5),
             crop_foreground: bool = True, image_dtype: str = "float16") -> PreprocessPlan:
    """Fit a plan on case fingerprints: median spacing (nnU-Net) and CT foreground statistics."""
    if not fingerprints:
        raise ValueError(f"{info.name}: no readable case to fit the preprocessing plan on")
    schemes = channel_schemes(info, normalization)
    norms = [_fit_channel(scheme, [np.asarray(f["foreground"][c]) for f in fingerprints], ct_percentiles)
             for c, scheme in enumerate(schemes)]
    return PreprocessPlan(
        spatial_dims=info.spatial_dims, orientation=orientation,
        target_spacing=_resolve_spacing(target_spacing, fingerprints, info.spatial_dims),
        normalization=norms, crop_foreground=crop_foreground, image_dtype=image_dtype,
    )


def _resolve_spacing(target: str | Sequence[float] | None, fingerprints: Sequence[dict[str, Any]],
                     spatial_dims: int) -> list[float] | None:
    if target is None:
        return None
    if isinstance(target, str):
        if target != "median":
            raise ValueError(f"target_spacing: {target!r} must be 'median', a list of mm, or null")
        return [float(v) for v in np.median(np.array([f["spacing"] for f in fingerprints]), axis=0)]
    values = [float(v) for v in target]
    if len(values) != spatial_dims or min(values) <= 0:
        raise ValueError(f"target_spacing: {values} must be {spatial_dims} positive values for {spatial_dims}D data")
    return values


def _fit_channel(scheme: Scheme, samples: Sequence[np.ndarray], percentiles: tuple[float, float]) -> ChannelNorm:
    if scheme != "ct":
        return ChannelNorm(scheme=scheme)
    values = np.concatenate([s for s in samples if s.size] or [np.zeros(1)])
    low, high = (float(v) for v in np.percentile(values, percentiles))
    clipped = np.clip(values, low, high)
    return ChannelNorm(scheme="ct", clip=(low, high), mean=float(clipped.mean()), std=float(max(clipped.std(), 1e-8)))


# ----------------------------------------------------------------------------- transforms
def preprocess_case(loaded: LoadedCase, info: DatasetInfo, plan: PreprocessPlan
                    ) -> tuple[np.ndarray, np.ndarray | None, tuple[float, ...], np.ndarray, dict[str, Any]]:
    """(image float32 (C,*spatial), label uint8 or None, spacing, 4x4 affine, geometry) after the plan."""
    _check_case(loaded, info, plan)
    image, label, geometry = _transform(loaded.image, loaded.label, loaded.affine, plan)
    geometry["source_files"] = list(loaded.source_files)
    label_np = None if label is None else np.rint(label.as_tensor().numpy()[0]).astype(np.uint8)
    affine = np.asarray(image.affine.numpy(), dtype=np.float64)
    spacing = tuple(geometry["preprocessed_spacing"])
    return image.as_tensor().numpy().astype(np.float32), label_np, spacing, affine, geometry


def preprocess_image_for_inference(image: np.ndarray, affine: np.ndarray, plan: PreprocessPlan
                                   ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Replay the plan on a new image (C, *spatial) with its 4x4 affine -> (float32 tensor, geometry)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != plan.spatial_dims + 1:
        raise ValueError(f"image: expected (C, *spatial) with {plan.spatial_dims} spatial dims, got {image.shape}")
    if image.shape[0] != len(plan.normalization):
        raise ValueError(f"image: {image.shape[0]} channels, the plan has {len(plan.normalization)}")
    out, _, geometry = _transform(image, None, affine, plan)
    return out.as_tensor().float(), geometry


def _check_case(loaded: LoadedCase, info: DatasetInfo, plan: PreprocessPlan) -> None:
    where = ", ".join(loaded.source_files[:1]) or loaded.id
    if loaded.image.ndim != plan.spatial_dims + 1:
        raise ValueError(f"{where}: image shape {loaded.image.shape} is not (C, *spatial) {plan.spatial_dims}D")
    if loaded.image.shape[0] != len(plan.normalization):
        raise ValueError(f"{where}: {loaded.image.shape[0]} channels, expected {len(plan.normalization)} "
                         f"({', '.join(info.channel_names)})")
    if loaded.label is not None and loaded.label.shape != loaded.image.shape[1:]:
        raise ValueError(f"{where}: label shape {loaded.label.shape} != image shape {loaded.image.shape[1:]}")


def _transform(image: np.ndarray, label: np.ndarray | None, affine: np.ndarray, plan: PreprocessPlan):
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    sd = plan.spatial_dims
    affine = np.asarray(affine, dtype=np.float64)
    img = MetaTensor(torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32)), affine=torch.as_tensor(affine))
    lab = None if label is None else MetaTensor(torch.as_tensor(label[None].astype(np.float32)),
                                                affine=torch.as_tensor(affine))
    with warnings.catch_warnings():  # MONAI warns that a 2D image might not be channel-first
        warnings.simplefilter("ignore", UserWarning)
        orient = Orientation(axcodes=plan.orientation[:sd], labels=RAS_LABELS)
        img = orient(img)
        lab = None if lab is None else orient(lab)
    if plan.target_spacing is not None:
        img = Spacing(pixdim=plan.target_spacing, mode="bilinear")(img)
        lab = None if lab is None else Spacing(pixdim=plan.target_spacing, mode="nearest")(lab)
    resampled = tuple(int(s) for s in img.shape[1:])
    start, end = foreground_box(img.as_tensor()) if plan.crop_foreground else ((0,) * sd, resampled)
    img, lab = _crop(img, start, end), None if lab is None else _crop(lab, start, end)
    img = normalize(img, plan.normalization)
    geometry = _geometry(image.shape[1:], affine, plan, resampled, start, end, img)
    return img, lab, geometry


def foreground_box(image: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Bounding box [start, end) of voxels non-zero in any channel; the full grid if there are none."""
    from monai.transforms.utils import generate_spatial_bounding_box

    start, end = generate_spatial_bounding_box(image, select_fn=lambda x: x != 0, margin=0, allow_smaller=True)
    spatial = tuple(int(s) for s in image.shape[1:])
    if any(e <= s for s, e in zip(start, end)):
        return (0,) * len(spatial), spatial
    return tuple(int(s) for s in start), tuple(int(e) for e in end)


def _crop(tensor, start: Sequence[int], end: Sequence[int]):
    from monai.transforms import SpatialCrop

    return SpatialCrop(roi_start=list(start), roi_end=list(end))(tensor)


def normalize(image, norms: Sequence[ChannelNorm]):
    """Per-channel normalisation of a (C, *spatial) tensor (MetaTensor metadata is kept)."""
    from monai.transforms import NormalizeIntensity

    channels = []
    for c, norm in enumerate(norms):
        x = image[c : c + 1]
        if norm.scheme == "zscore_nonzero":
            x = NormalizeIntensity(nonzero=True)(x)
        elif norm.scheme == "ct":
            x = NormalizeIntensity(subtrahend=norm.mean, divisor=norm.std)(x.clamp(*norm.clip))
        channels.append(x)
    return torch.cat(channels, dim=0) if len(channels) > 1 else channels[0]


def _geometry(original_shape: Sequence[int], original_affine: np.ndarray, plan: PreprocessPlan,
              resampled: Sequence[int], start: Sequence[int], end: Sequence[int], image) -> dict[str, Any]:
    sd = plan.spatial_dims
    affine = np.asarray(image.affine.numpy(), dtype=np.float64)
    return {
        "spatial_dims": sd,
        "original_shape": [int(s) for s in original_shape],
        "original_affine": original_affine.tolist(),
        "original_spacing": list(voxel_spacing(original_affine, sd)),
        "original_axcodes": "".join(nib.orientations.aff2axcodes(affine_nd(original_affine, sd), labels=RAS_LABELS)),
        "orientation": plan.orientation[:sd],
        "target_spacing": plan.target_spacing,
        "resampled_shape": list(resampled),
        "crop_box": {"start": list(start), "end": list(end)},
        "preprocessed_shape": [int(s) for s in image.shape[1:]],
        "preprocessed_affine": affine.tolist(),
        "preprocessed_spacing": list(voxel_spacing(affine, sd)),
    }


# ----------------------------------------------------------------------------- inversion
def invert_to_original(pred: np.ndarray | torch.Tensor, geometry: dict[str, Any],
                       mode: Literal["nearest", "linear"] | None = None) -> np.ndarray:
    """A prediction on the preprocessed grid ((C,)*spatial) -> the same on the original grid.

    `mode` defaults to "nearest" for integer/bool arrays (label maps) and "linear" for floats
    (probabilities/logits); voxels outside the crop box get 0. The dtype is kept.
    """
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    array = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    sd = int(geometry["spatial_dims"])
    expected = tuple(geometry["preprocessed_shape"])
    has_channels = array.ndim == sd + 1
    if array.shape[has_channels:] != expected or array.ndim not in (sd, sd + 1):
        raise ValueError(f"pred: shape {array.shape} does not match the preprocessed grid {expected}")
    mode = mode or ("nearest" if not np.issubdtype(array.dtype, np.floating) else "linear")
    if mode not in ("nearest", "linear"):
        raise ValueError(f"mode: {mode!r} must be 'nearest' or 'linear'")
    src = MetaTensor(torch.as_tensor(np.ascontiguousarray(array if has_channels else array[None], dtype=np.float32)),
                     affine=torch.as_tensor(np.asarray(geometry["preprocessed_affine"], dtype=np.float64)))
    out = SpatialResample(mode="nearest" if mode == "nearest" else "bilinear", padding_mode="zeros")(
        src, dst_affine=torch.as_tensor(np.asarray(geometry["original_affine"], dtype=np.float64)),
        spatial_size=list(geometry["original_shape"]),
    )
    result = out.as_tensor().numpy()
    result = result if has_channels else result[0]
    if not np.issubdtype(array.dtype, np.floating):
        result = np.rint(result)
    return result.astype(array.dtype)
