"""Image decoding and validation shared by the layout readers.

Conventions every reader returns (see `base.LoadedCase`):
- array axis order is nibabel's voxel order: (i, j, k) = (x, y, z) for 3D and (x, y) for 2D.
  ITK arrays (numpy (z, y, x)) and DICOM pixel arrays ((row, column) = (y, x)) are transposed.
- affines are 4x4 voxel -> RAS world in mm. ITK and DICOM store LPS: their x and y world
  axes are negated (`LPS_TO_RAS`). A 2D image gets a 4x4 affine whose k axis is the unit z axis.
- every problem with the input raises `DataError("<file>: <what is wrong>")` on one line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from crossdim.data.formats.base import Case, DataError, LoadedCase

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
AFFINE_TOL_MM = 1e-3  # max world distance (mm) between grid corners of two "same grid" images
NIFTI_ENDINGS = (".nii.gz", ".nii")
ITK_ENDINGS = (".mhd", ".mha", ".nrrd", ".nhdr")
_MET_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_FLOAT": 4, "MET_DOUBLE": 8, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8,
}


@dataclass(frozen=True)
class Volume:
    """One decoded image file: array in (x, y[, z][, c]) order and its RAS affine."""

    array: np.ndarray
    affine: np.ndarray
    path: str


def one_line(exc: BaseException) -> str:
    """An exception as a single short line (library messages can span many lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[-1] if lines else ""
    return f"{type(exc).__name__}: {reason}"[:300]


def natural_key(text: str) -> list[object]:
    """Sort key that orders embedded numbers numerically ("img2" < "img10")."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def require_dir(path: str, what: str = "dataset root") -> None:
    if not os.path.isdir(path):
        raise DataError(f"{path}: {what} does not exist or is not a directory")


def require_file(path: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"{path}: file is missing")


def strip_ending(name: str, endings: Sequence[str]) -> str | None:
    """`name` without the first matching ending, None if it has none of them."""
    for ending in endings:
        if name.endswith(ending):
            return name[: -len(ending)]
    return None


def first_existing(candidates: Sequence[str]) -> str:
    """The first candidate path that exists, else the first one (so a later load names it)."""
    return next((path for path in candidates if os.path.exists(path)), candidates[0])


def labelled_or_none(label_paths: Sequence[str]) -> list[str | None]:
    """Dataset-wide label rule: if no label file exists at all the dataset is unlabelled (None
    for every case); otherwise every case keeps its expected label path, and a case whose label
    is missing fails in `load_case` (DataError naming that path) instead of silently training
    without labels."""
    if any(os.path.exists(path) for path in label_paths):
        return list(label_paths)
    return [None] * len(label_paths)


# --- geometry ---------------------------------------------------------------------------------


def itk_to_ras_affine(
    direction: Sequence[float], spacing: Sequence[float], origin: Sequence[float]
) -> np.ndarray:
    """ITK geometry (LPS direction cosines row-major, spacing, origin; 2D or 3D) -> 4x4 RAS affine."""
    dims = len(spacing)
    if len(direction) != dims * dims or len(origin) != dims or dims not in (2, 3):
        raise ValueError(f"direction/spacing/origin sizes {len(direction)}/{dims}/{len(origin)} "
                         "do not describe a 2D or 3D image")
    lps = np.eye(4)
    lps[:dims, :dims] = np.asarray(direction, float).reshape(dims, dims) * np.asarray(spacing, float)
    lps[:dims, 3] = origin
    return LPS_TO_RAS @ lps


def ras_affine_to_itk(affine: np.ndarray, dims: int) -> tuple[tuple[float, ...], ...]:
    """Inverse of `itk_to_ras_affine`: (direction, spacing, origin) for a `dims`-D ITK image.

    A 2D affine must not mix the k axis into x/y (ITK 2D images live in the x-y plane)."""
    lps = LPS_TO_RAS @ np.asarray(affine, float)
    block = lps[:dims, :dims]
    if dims == 2 and (np.abs(lps[:2, 2]).max() > 1e-9 or np.abs(lps[2, :2]).max() > 1e-9):
        raise ValueError("2D affine mixes the third axis into the image plane")
    spacing = np.linalg.norm(block, axis=0)
    direction = block / spacing
    return (tuple(direction.ravel()), tuple(spacing), tuple(lps[:dims, 3]))


def grid_corners_world(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """World coordinates (N, 3) of the 2**d corner voxels of a grid of `shape` (d = 2 or 3)."""
    extents = [(0, n - 1) for n in shape] + [(0,)] * (3 - len(shape))
    corners = np.array(np.meshgrid(*extents, indexing="ij")).reshape(3, -1)
    homogeneous = np.vstack([corners, np.ones(corners.shape[1])])
    return (affine @ homogeneous)[:3].T


def grid_distance_mm(shape: Sequence[int], affine_a: np.ndarray, affine_b: np.ndarray) -> float:
    """Largest world distance (mm) between the same corner voxel under two affines."""
    a = grid_corners_world(shape, affine_a)
    b = grid_corners_world(shape, affine_b)
    return float(np.linalg.norm(a - b, axis=1).max())


# --- decoding ----------------------------------------------------------------------------------


def read_image(path: str) -> Volume:
    """Decode a NIfTI (nibabel) or MetaImage/NRRD (SimpleITK) file."""
    if strip_ending(path, NIFTI_ENDINGS) is not None:
        return read_nifti(path)
    if strip_ending(path.lower(), ITK_ENDINGS) is not None:
        return read_itk(path)
    raise DataError(f"{path}: unsupported image file type (expected {NIFTI_ENDINGS + ITK_ENDINGS})")


def read_nifti(path: str) -> Volume:
    require_file(path)
    try:
        image = nib.load(path)
        array = np.asanyarray(image.dataobj)  # decodes all voxels: truncated files fail here
    except Exception as exc:  # nibabel/gzip/zlib raise many types for corrupt files
        raise DataError(f"{path}: unreadable NIfTI ({one_line(exc)})") from exc
    return Volume(array, np.asarray(image.affine, dtype=np.float64), path)


def read_itk(path: str) -> Volume:
    require_file(path)
    if path.lower().endswith(".mhd"):
        check_mhd_data_file(path)
    try:
        image = sitk.ReadImage(path)
        array = sitk.GetArrayFromImage(image)
    except RuntimeError as exc:
        raise DataError(f"{path}: unreadable image ({one_line(exc)})") from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{path}: multi-component pixels are not supported")
    dims = image.GetDimension()
    if dims not in (2, 3):
        raise DataError(f"{path}: {dims}D images are not supported")
    affine = itk_to_ras_affine(image.GetDirection(), image.GetSpacing(), image.GetOrigin())
    return Volume(np.transpose(array), affine, path)  # ITK (z, y, x) -> (x, y, z)


def _mhd_header(path: str) -> dict[str, str]:
    header: dict[str, str] = {}
    with open(path, "rb") as handle:
        for raw in handle:
            key, _, value = raw.decode("latin-1").partition("=")
            header[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
    return header


def check_mhd_data_file(path: str) -> None:
    """Name a missing or truncated .raw next to a .mhd (ITK's own message names neither)."""
    header = _mhd_header(path)
    data_name = header.get("ElementDataFile", "")
    if data_name in ("", "LOCAL") or data_name.startswith("LIST") or "%" in data_name:
        return
    data_path = os.path.join(os.path.dirname(path), data_name)
    require_file(data_path)
    if header.get("CompressedData", "False").lower() == "true":
        return
    item_bytes = _MET_BYTES.get(header.get("ElementType", ""))
    try:
        dims = [int(v) for v in header.get("DimSize", "").split()]
        channels = int(header.get("ElementNumberOfChannels", "1"))
    except ValueError as exc:
        raise DataError(f"{path}: bad DimSize/ElementNumberOfChannels in MetaImage header") from exc
    expected = item_bytes * int(np.prod(dims)) * channels if item_bytes and dims else 0
    if expected and os.path.getsize(data_path) < expected:
        raise DataError(f"{data_path}: truncated ({os.path.getsize(data_path)} of {expected} bytes)")


# --- validation and assembly -------------------------------------------------------------------


def to_spatial(volume: Volume, spatial_dims: int) -> Volume:
    """Drop trailing singleton axes beyond `spatial_dims` ((x, y, 1) -> (x, y)); else DataError."""
    array = volume.array
    while array.ndim > spatial_dims and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != spatial_dims:
        raise DataError(f"{volume.path}: expected a {spatial_dims}D image, got shape {volume.array.shape}")
    return Volume(array, volume.affine, volume.path)


def split_channels(volume: Volume, spatial_dims: int, channels: int) -> list[Volume]:
    """A file holding `channels` channels on its last axis (MSD 4D NIfTI) -> one Volume each."""
    if channels == 1:
        return [to_spatial(volume, spatial_dims)]
    array = volume.array
    if array.ndim != spatial_dims + 1 or array.shape[-1] != channels:
        raise DataError(f"{volume.path}: expected {channels} channels on the last axis, got shape {array.shape}")
    return [Volume(array[..., c], volume.affine, volume.path) for c in range(channels)]


def check_finite(volume: Volume) -> None:
    if np.issubdtype(volume.array.dtype, np.floating) and not np.isfinite(volume.array).all():
        bad = int((~np.isfinite(volume.array)).sum())
        raise DataError(f"{volume.path}: {bad} NaN/Inf voxels")


def check_same_grid(reference: Volume, other: Volume, what: str) -> None:
    """`other` must have `reference`'s shape and affine (corners within AFFINE_TOL_MM)."""
    if other.array.shape != reference.array.shape:
        raise DataError(f"{other.path}: {what} shape {other.array.shape} differs from "
                        f"{reference.array.shape} of {reference.path}")
    distance = grid_distance_mm(reference.array.shape, reference.affine, other.affine)
    if distance > AFFINE_TOL_MM:
        raise DataError(f"{other.path}: {what} affine differs from {reference.path} "
                        f"by {distance:.4g} mm (tolerance {AFFINE_TOL_MM} mm)")


def to_label(volume: Volume, allowed: Iterable[int]) -> np.ndarray:
    """Validated uint8 label array: finite, integer-valued, values within `allowed`."""
    check_finite(volume)
    values = np.unique(volume.array)
    if not np.array_equal(values, np.round(values)):
        raise DataError(f"{volume.path}: label has non-integer values")
    unexpected = sorted(set(values.astype(np.int64).tolist()) - set(allowed))
    if unexpected:
        raise DataError(f"{volume.path}: label values {unexpected[:10]} outside the declared set {sorted(allowed)}")
    return volume.array.astype(np.uint8)


def assemble_case(
    case: Case, channels: Sequence[Volume], label: Volume | None, allowed_labels: Iterable[int]
) -> LoadedCase:
    """Check channels against each other and the label, then stack into a LoadedCase."""
    reference = channels[0]
    for volume in channels:
        check_same_grid(reference, volume, "channel")
        check_finite(volume)
    label_array = None
    if label is not None:
        check_same_grid(reference, label, "label")
        label_array = to_label(label, allowed_labels)
    image = np.stack([np.asarray(v.array, dtype=np.float32) for v in channels])
    sources = tuple(dict.fromkeys([v.path for v in channels] + ([label.path] if label else [])))
    return LoadedCase(id=case.id, image=image, label=label_array, affine=reference.affine,
                      source_files=sources)


def load_files_case(case: Case, allowed_labels: Iterable[int], spatial_dims: int) -> LoadedCase:
    """load_case for layouts where each channel and the label are separate image files.

    A path repeated k times in `case.images` is one file holding k channels on its last axis."""
    channels: list[Volume] = []
    index = 0
    while index < len(case.images):
        path = case.images[index]
        count = 1
        while index + count < len(case.images) and case.images[index + count] == path:
            count += 1
        channels.extend(split_channels(read_image(path), spatial_dims, count))
        index += count
    label = to_spatial(read_image(case.label), spatial_dims) if case.label else None
    return assemble_case(case, channels, label, allowed_labels)
