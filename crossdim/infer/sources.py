"""Prediction inputs: what a path holds, as lazily loaded cases.

Accepted inputs (`discover(path, spec)`, `spec` = what the model expects):
- one image file: NIfTI (`.nii`, `.nii.gz`; channels on a 4th axis as in MSD) or ITK
  (`.mhd`, `.mha`, `.nrrd`);
- a DICOM series directory (`*.dcm` files directly inside);
- a directory of image files: grouped into cases by the model's channel suffixes (BraTS
  `<case>_t1ce.nii.gz` / `<case>-t1c.nii.gz`, nnU-Net `<case>_0002.nii.gz`); a one-channel model
  takes every file as a case. Label files (`*_seg.*`, `*-seg.*`) are skipped;
- a dataset directory (subfolders, `dataset.json`): listed with the reader of the model's
  training format (`crossdim.data.formats`), else every subfolder is tried as a case folder.

A source is loaded only when predicted (`CaseSource.load()`), so one unreadable case fails alone.
Every problem raises `DataError` naming the file or directory, on one line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from crossdim.data.formats.base import DataError, LoadedCase

NIFTI_ENDINGS = (".nii.gz", ".nii")
ITK_ENDINGS = (".mhd", ".mha", ".nrrd")
IMAGE_ENDINGS = NIFTI_ENDINGS + ITK_ENDINGS
_LABEL_SUFFIX = re.compile(r"[_-](seg|label|labels|mask|gt)$", re.I)


@dataclass
class InputCase:
    """One loaded input: image (C, *spatial) float32 in nibabel axis order, 4x4 RAS affine."""

    id: str
    image: np.ndarray
    affine: np.ndarray
    reference: str  # the file/directory it came from (a NIfTI's header is copied to the output)
    label: np.ndarray | None = None


@dataclass(frozen=True)
class InputSpec:
    """What the model takes: its channels (names in order), the data's spatial dims, its format."""

    channel_names: tuple[str, ...]
    spatial_dims: int
    dataset_format: str | None = None

    @property
    def channels(self) -> int:
        return len(self.channel_names)


@dataclass(frozen=True)
class CaseSource:
    id: str
    description: str  # path(s) shown in errors and reports
    loader: Callable[[], InputCase] = field(compare=False, repr=False)

    def load(self) -> InputCase:
        return self.loader()


def image_stem(name: str) -> str | None:
    """File name without its image ending, or None when it is not an image file (pure)."""
    lowered = name.lower()
    for ending in IMAGE_ENDINGS:
        if lowered.endswith(ending):
            return name[: -len(ending)]
    return None


def discover(path: str, spec: InputSpec) -> list[CaseSource]:
    """The cases an input path holds (at least one; DataError otherwise)."""
    path = os.path.normpath(os.path.expanduser(path))
    if os.path.isfile(path):
        return [file_source(path, spec)]
    if not os.path.isdir(path):
        raise DataError(f"{path}: input does not exist")
    sources = directory_sources(path, spec, spec.dataset_format)
    if not sources:
        raise DataError(f"{path}: no image files, DICOM series or dataset cases found")
    return sources


def directory_sources(path: str, spec: InputSpec, dataset_format: str | None) -> list[CaseSource]:
    names = sorted(os.listdir(path))
    if any(n.lower().endswith(".dcm") for n in names):
        return [dicom_source(path, spec)]
    images = [n for n in names if image_stem(n) is not None and os.path.isfile(os.path.join(path, n))]
    if images and not os.path.isfile(os.path.join(path, "dataset.json")):
        return channel_file_sources(path, images, spec)
    return dataset_sources(path, spec, dataset_format)


# ----------------------------------------------------------------------------- single files
def file_source(path: str, spec: InputSpec) -> CaseSource:
    stem = image_stem(os.path.basename(path))
    if stem is None:
        raise DataError(f"{path}: unsupported input file type (expected {', '.join(IMAGE_ENDINGS)}, "
                        "a DICOM series directory or a dataset directory)")
    case_id = re.sub(r"_\d{4}$", "", stem)
    return CaseSource(case_id, path, lambda: load_file(path, case_id, spec))


def load_file(path: str, case_id: str, spec: InputSpec) -> InputCase:
    from crossdim.data.formats.io import read_image

    volume = read_image(path)
    image = to_channels_first(np.asarray(volume.array), spec, path)
    check_finite(image, path)
    return InputCase(case_id, image, volume.affine, path)


def to_channels_first(array: np.ndarray, spec: InputSpec, path: str) -> np.ndarray:
    """(*spatial[, C]) with channels on the axis after the spatial ones -> (C, *spatial) float32;
    DataError naming the file when the channel count or dimensionality does not fit (pure)."""
    dims = spec.spatial_dims
    while array.ndim > dims + 1 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == dims + 1:
        found = array.shape[-1]
        array = np.moveaxis(array, -1, 0)
    elif array.ndim == dims:
        found = 1
        array = array[None]
    else:
        raise DataError(f"{path}: image shape {array.shape} is not a {dims}D image with channels on axis {dims}")
    if found != spec.channels:
        raise DataError(f"{path}: {found} channel(s), the model expects {spec.channels} "
                        f"({', '.join(spec.channel_names)})")
    return array.astype(np.float32)


def check_finite(image: np.ndarray, path: str) -> None:
    if not np.isfinite(image).all():
        raise DataError(f"{path}: {int((~np.isfinite(image)).sum())} NaN/Inf voxels")


# ----------------------------------------------------------------------------- DICOM
def dicom_source(path: str, spec: InputSpec) -> CaseSource:
    return CaseSource(os.path.basename(path), path, lambda: load_dicom(path, spec))


def load_dicom(path: str, spec: InputSpec) -> InputCase:
    from crossdim.data.formats.chaos import read_series

    volume, _ = read_series(path)
    image = to_channels_first(np.asarray(volume.array), spec, path)
    check_finite(image, path)
    return InputCase(os.path.basename(path), image, volume.affine, path)


# ----------------------------------------------------------------------------- channel files
def channel_of(stem: str, channel_names: Sequence[str]) -> tuple[str, int] | None:
    """(case id, channel index) of a file stem by the model's channel suffixes (pure).

    `<case>_<name>` / `<case>-<name>` (BraTS, case-insensitive) or `<case>_<XXXX>` (nnU-Net)."""
    lowered = stem.lower()
    by_length = sorted(range(len(channel_names)), key=lambda i: -len(channel_names[i]))
    for index in by_length:
        name = channel_names[index].lower()
        for sep in ("_", "-"):
            if lowered.endswith(sep + name) and len(stem) > len(name) + 1:
                return stem[: -len(name) - 1], index
    match = re.match(r"^(?P<case>.+)_(?P<index>\d{4})$", stem)
    if match and int(match["index"]) < len(channel_names):
        return match["case"], int(match["index"])
    return None


def group_channel_files(directory: str, files: Sequence[str], channel_names: Sequence[str]) -> dict[str, list[str]]:
    """Case id -> one path per channel (DataError naming a case's missing channel) (pure but for paths)."""
    stems = [(f, image_stem(f) or f) for f in files if not _LABEL_SUFFIX.search(image_stem(f) or f)]
    cases: dict[str, list[str | None]] = {}
    for name, stem in stems:
        found = channel_of(stem, channel_names)
        if found is None:
            continue
        case_id, index = found
        cases.setdefault(case_id, [None] * len(channel_names))[index] = os.path.join(directory, name)
    if not cases:
        raise DataError(f"{directory}: {len(stems)} image file(s) but none named for the model's "
                        f"{len(channel_names)} channels ({', '.join(channel_names)})")
    for case_id, paths in cases.items():
        missing = [channel_names[i] for i, p in enumerate(paths) if p is None]
        if missing:
            raise DataError(f"{directory}: case {case_id} has no file for channel(s) {', '.join(missing)} "
                            f"(the model expects {len(channel_names)}: {', '.join(channel_names)})")
    return {k: [p for p in v if p is not None] for k, v in cases.items()}


def channel_file_sources(directory: str, files: Sequence[str], spec: InputSpec) -> list[CaseSource]:
    if spec.channels == 1:
        return [file_source(os.path.join(directory, f), spec) for f in files
                if not _LABEL_SUFFIX.search(image_stem(f) or f)]
    groups = group_channel_files(directory, files, spec.channel_names)
    return [CaseSource(case_id, ", ".join(paths), _channels_loader(case_id, paths, spec))
            for case_id, paths in sorted(groups.items())]


def _channels_loader(case_id: str, paths: list[str], spec: InputSpec) -> Callable[[], InputCase]:
    return lambda: load_channel_files(case_id, paths, spec)


def load_channel_files(case_id: str, paths: Sequence[str], spec: InputSpec) -> InputCase:
    from crossdim.data.formats.io import check_same_grid, read_image, to_spatial

    volumes = [to_spatial(read_image(p), spec.spatial_dims) for p in paths]
    for volume in volumes[1:]:
        check_same_grid(volumes[0], volume, "channel")
    image = np.stack([np.asarray(v.array, dtype=np.float32) for v in volumes])
    check_finite(image, paths[0])
    return InputCase(case_id, image, volumes[0].affine, paths[0])


# ----------------------------------------------------------------------------- datasets
def dataset_sources(path: str, spec: InputSpec, dataset_format: str | None) -> list[CaseSource]:
    if dataset_format:
        listed = reader_sources(path, dataset_format)
        if listed is not None:
            return listed
    sources: list[CaseSource] = []
    for name in sorted(os.listdir(path)):
        sub = os.path.join(path, name)
        if os.path.isdir(sub) and not name.startswith("."):
            sources.extend(directory_sources(sub, spec, None))
    return sources


def reader_sources(path: str, dataset_format: str) -> list[CaseSource] | None:
    """Cases listed by the format's reader, or None when the reader does not recognise `path`."""
    from crossdim.data.formats import get_format

    reader = get_format(dataset_format)
    try:
        info = reader.read_dataset(path)
    except DataError:
        return None
    return [CaseSource(case.id, ", ".join(dict.fromkeys(case.images)), _reader_loader(reader, case, info))
            for case in info.cases]


def _reader_loader(reader, case, info) -> Callable[[], InputCase]:  # noqa: ANN001 - format module objects
    def load() -> InputCase:
        loaded: LoadedCase = reader.load_case(case, info)
        return InputCase(case.id, loaded.image, loaded.affine, case.images[0], loaded.label)

    return load
