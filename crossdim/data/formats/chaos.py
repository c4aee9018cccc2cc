"""CHAOS layout: DICOM series + PNG ground-truth masks, one modality per DatasetInfo.

    Train_Sets/CT/<id>/DICOM_anon/*.dcm,  Train_Sets/CT/<id>/Ground/*.png
    Train_Sets/MR/<id>/T1DUAL/DICOM_anon/{InPhase,OutPhase}/*.dcm, T1DUAL/Ground/*.png
    Train_Sets/MR/<id>/T2SPIR/DICOM_anon/*.dcm, T2SPIR/Ground/*.png

`root` may be the folder holding `Train_Sets`, `Train_Sets` itself, or `Train_Sets/CT` /
`Train_Sets/MR`. CT and MR differ in classes, so a root holding both needs `modality=` (or the
CT/MR sub-folder as root); otherwise DataError.
- CT cases: id "<id>", 1 channel "CT", labels {0 background, 1 liver} (any non-zero grey -> 1).
- MR cases: every series is its own single-channel case so all cases have the same channels:
  "<id>_T2SPIR", "<id>_T1DUAL_InPhase", "<id>_T1DUAL_OutPhase" (the two T1DUAL echoes share
  T1DUAL/Ground). `Case.extra` carries ("patient", id) and ("sequence", ...): split by patient.
  Labels by grey level: liver 55-70 -> 1, right kidney 110-135 -> 2, left kidney 175-200 -> 3,
  spleen 240-255 -> 4; any other non-zero grey is a DataError.
Volumes are (1, x, y, z) with x = DICOM column, y = DICOM row, z ordered by slice position
(ImagePositionPatient projected on the normal of ImageOrientationPatient), NOT by file name.
Pixels are stored value * RescaleSlope + RescaleIntercept. Masks: the Ground PNGs, natural-
sorted by file name, correspond one-to-one to the DICOM slices sorted by InstanceNumber (the
challenge numbers both in acquisition order); each mask is then placed at its slice's position.
Series files need consistent orientation, pixel spacing and size, unique positions and
InstanceNumbers, and uniform slice spacing (1 %); SeriesInstanceUID is not required to match.
If no Ground folder exists at all the dataset is unlabelled (label None).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image

from crossdim.data.formats.base import Case, DataError, DatasetInfo, LoadedCase
from crossdim.data.formats.io import (
    LPS_TO_RAS, Volume, assemble_case, labelled_or_none, natural_key, one_line, require_dir,
)

LABELS = {
    "CT": {0: "background", 1: "liver"},
    "MR": {0: "background", 1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"},
}
MR_GREY_RANGES = ((1, 55, 70), (2, 110, 135), (3, 175, 200), (4, 240, 255))  # label, lo, hi
MR_GREY_LEVELS = {1: 63, 2: 126, 3: 189, 4: 252}  # nominal values written by the challenge
# (case suffix, series dir, ground dir) relative to the patient folder
SERIES = {
    "CT": (("", "DICOM_anon", "Ground"),),
    "MR": (
        ("_T2SPIR", "T2SPIR/DICOM_anon", "T2SPIR/Ground"),
        ("_T1DUAL_InPhase", "T1DUAL/DICOM_anon/InPhase", "T1DUAL/Ground"),
        ("_T1DUAL_OutPhase", "T1DUAL/DICOM_anon/OutPhase", "T1DUAL/Ground"),
    ),
}
SPACING_REL_TOL = 0.01
GEOMETRY_TOL_MM = 1e-2


def read_dataset(root: str, modality: str | None = None) -> DatasetInfo:
    require_dir(root)
    modality, base = resolve_root(root, modality)
    patients = sorted((n for n in _visible(base) if os.path.isdir(os.path.join(base, n))), key=natural_key)
    if not patients:
        raise DataError(f"{base}: no CHAOS patient folders found")
    entries = [
        (f"{patient}{suffix}", os.path.join(base, patient, series), os.path.join(base, patient, ground),
         (("patient", patient), ("sequence", (suffix or "_CT")[1:])))
        for patient in patients for suffix, series, ground in SERIES[modality]
    ]
    labels = labelled_or_none([ground for _, _, ground, _ in entries])
    cases = sorted((Case(id=i, images=(series,), label=label, extra=extra)
                    for (i, series, _, extra), label in zip(entries, labels)), key=lambda c: natural_key(c.id))
    return DatasetInfo(
        format="chaos", name=f"CHAOS_{modality}", modality=modality,  # type: ignore[arg-type]
        channel_names=[modality], labels=dict(LABELS[modality]), spatial_dims=3, cases=cases,
    )


def load_case(case: Case, info: DatasetInfo) -> LoadedCase:
    volume, mask_slots = read_series(case.images[0])
    label = None
    if case.label is not None:
        to_label = ct_mask_to_label if info.modality == "CT" else mr_grey_to_label
        array = read_masks(case.label, volume.array.shape, mask_slots, to_label)
        label = Volume(array, volume.affine, case.label)
    return assemble_case(case, [volume], label, info.labels)


def resolve_root(root: str, modality: str | None) -> tuple[str, str]:
    """(modality, folder holding the patient folders) for any accepted root."""
    if modality is not None and modality not in LABELS:
        raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}")
    name = os.path.basename(os.path.normpath(root))
    if name in LABELS:
        if modality not in (None, name):
            raise DataError(f"{root}: is the {name} folder but modality={modality!r} was asked")
        return name, root
    base = os.path.join(root, "Train_Sets") if os.path.isdir(os.path.join(root, "Train_Sets")) else root
    present = [m for m in LABELS if os.path.isdir(os.path.join(base, m))]
    if modality is not None:
        if modality not in present:
            raise DataError(f"{os.path.join(base, modality)}: CHAOS {modality} folder does not exist")
        return modality, os.path.join(base, modality)
    if len(present) != 1:
        what = "both CT and MR" if present else "no CT or MR folder"
        raise DataError(f"{base}: holds {what}; pass {os.path.join(base, 'CT')} or {os.path.join(base, 'MR')}")
    return present[0], os.path.join(base, present[0])


def _visible(path: str) -> list[str]:
    return [n for n in os.listdir(path) if not n.startswith(".")]


# --- pure label and geometry functions ----------------------------------------------------------


def ct_mask_to_label(grey: np.ndarray, path: str) -> np.ndarray:
    """CT liver masks: any non-zero grey level is liver (1)."""
    return (grey > 0).astype(np.uint8)


def mr_grey_to_label(grey: np.ndarray, path: str) -> np.ndarray:
    """MR organ masks coded by grey level -> labels 1..4 (see MR_GREY_RANGES)."""
    label = np.zeros(grey.shape, dtype=np.uint8)
    for value, low, high in MR_GREY_RANGES:
        label[(grey >= low) & (grey <= high)] = value
    outside = np.unique(grey[(grey > 0) & (label == 0)])
    if outside.size:
        raise DataError(f"{path}: grey levels {outside[:10].tolist()} outside the CHAOS organ ranges "
                        f"{[(lo, hi) for _, lo, hi in MR_GREY_RANGES]}")
    return label


def dicom_affine(
    row_dir: np.ndarray, col_dir: np.ndarray, pixel_spacing: tuple[float, float],
    first_position: np.ndarray, slice_step: float,
) -> np.ndarray:
    """RAS affine of voxel (x=column, y=row, z=slice) from DICOM (LPS) image-plane attributes.

    `pixel_spacing` is DICOM PixelSpacing: (between rows, between columns)."""
    lps = np.eye(4)
    lps[:3, 0] = row_dir * pixel_spacing[1]
    lps[:3, 1] = col_dir * pixel_spacing[0]
    lps[:3, 2] = np.cross(row_dir, col_dir) * slice_step
    lps[:3, 3] = first_position
    return LPS_TO_RAS @ lps


# --- DICOM --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DicomSlice:
    path: str
    pixels: np.ndarray  # float32 (rows, columns), rescaled
    orientation: np.ndarray  # 6 direction cosines (row dir, column dir), LPS
    position: np.ndarray  # ImagePositionPatient, LPS mm
    pixel_spacing: tuple[float, float]
    instance: int


def read_slice(path: str) -> DicomSlice:
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for corrupt/truncated/unsupported files
        raise DataError(f"{path}: unreadable DICOM ({one_line(exc)})") from exc
    for tag in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "InstanceNumber"):
        if tag not in ds or ds[tag].value in (None, ""):
            raise DataError(f"{path}: missing DICOM tag {tag}")
    if pixels.ndim != 2:
        raise DataError(f"{path}: expected one 2D frame, got pixel array shape {pixels.shape}")
    slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
    return DicomSlice(
        path=path, pixels=(pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)),
        orientation=np.asarray(ds.ImageOrientationPatient, dtype=np.float64),
        position=np.asarray(ds.ImagePositionPatient, dtype=np.float64),
        pixel_spacing=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])), instance=int(ds.InstanceNumber),
    )


def _check_consistent(slices: list[DicomSlice]) -> None:
    first = slices[0]
    for item in slices[1:]:
        if item.pixels.shape != first.pixels.shape:
            raise DataError(f"{item.path}: size {item.pixels.shape} differs from {first.pixels.shape} of {first.path}")
        if np.abs(item.orientation - first.orientation).max() > 1e-4:
            raise DataError(f"{item.path}: ImageOrientationPatient differs from {first.path}")
        if np.abs(np.subtract(item.pixel_spacing, first.pixel_spacing)).max() > 1e-4:
            raise DataError(f"{item.path}: PixelSpacing differs from {first.path}")
    instances = [s.instance for s in slices]
    if len(set(instances)) != len(instances):
        raise DataError(f"{os.path.dirname(first.path)}: duplicate InstanceNumber values")


def slice_step(slices: list[DicomSlice], normal: np.ndarray, directory: str) -> float:
    """Uniform distance between consecutive (geometrically sorted) slices; DataError otherwise."""
    offsets = np.array([s.position @ normal for s in slices])
    steps = np.diff(offsets)
    if steps.size == 0:
        raise DataError(f"{directory}: a single slice does not make a volume")
    step = float(np.median(steps))
    if steps.min() <= GEOMETRY_TOL_MM:
        raise DataError(f"{directory}: two slices share the same position")
    if np.abs(steps - step).max() > SPACING_REL_TOL * step:
        raise DataError(f"{directory}: non-uniform slice spacing ({steps.min():.3f}-{steps.max():.3f} mm)")
    drift = [s.position - slices[0].position for s in slices]
    if max(np.linalg.norm(d - (d @ normal) * normal) for d in drift) > GEOMETRY_TOL_MM * 10:
        raise DataError(f"{directory}: slice positions are not along the slice normal (tilted stack)")
    return step


def read_series(directory: str) -> tuple[Volume, list[int]]:
    """A DICOM series folder -> (Volume (x, y, z), z index of each slice in InstanceNumber order)."""
    require_dir(directory, "DICOM series folder")
    files = sorted((n for n in _visible(directory) if n.lower().endswith(".dcm")), key=natural_key)
    if not files:
        raise DataError(f"{directory}: no .dcm files")
    slices = [read_slice(os.path.join(directory, name)) for name in files]
    _check_consistent(slices)
    row_dir, col_dir = slices[0].orientation[:3], slices[0].orientation[3:]
    normal = np.cross(row_dir, col_dir)
    order = np.argsort([s.position @ normal for s in slices], kind="stable")
    ordered = [slices[i] for i in order]
    step = slice_step(ordered, normal, directory)
    array = np.stack([s.pixels.T for s in ordered], axis=-1)
    affine = dicom_affine(row_dir, col_dir, ordered[0].pixel_spacing, ordered[0].position, step)
    z_of_file = np.empty(len(slices), dtype=np.int64)
    z_of_file[order] = np.arange(len(slices))
    by_instance = np.argsort([s.instance for s in slices], kind="stable")
    return Volume(array, affine, directory), [int(z_of_file[i]) for i in by_instance]


# --- PNG masks ----------------------------------------------------------------------------------


def read_png(path: str) -> np.ndarray:
    """Grey levels (rows, columns) of a PNG mask."""
    try:
        with Image.open(path) as image:
            grey = np.asarray(image)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable PNG ({one_line(exc)})") from exc
    if grey.ndim == 3:
        if not (grey[..., :3] == grey[..., :1]).all():
            raise DataError(f"{path}: colour PNG; expected grey-level masks")
        grey = grey[..., 0]
    return grey


def read_masks(
    ground_dir: str, shape: tuple[int, ...], mask_slots: list[int],
    to_label: Callable[[np.ndarray, str], np.ndarray],
) -> np.ndarray:
    """Label volume (x, y, z): the k-th natural-sorted PNG goes to z = mask_slots[k]."""
    require_dir(ground_dir, "Ground mask folder")
    names = sorted((n for n in _visible(ground_dir) if n.lower().endswith(".png")), key=natural_key)
    if len(names) != len(mask_slots):
        raise DataError(f"{ground_dir}: {len(names)} PNG masks for {len(mask_slots)} DICOM slices")
    label = np.zeros(shape, dtype=np.uint8)
    for name, z in zip(names, mask_slots):
        path = os.path.join(ground_dir, name)
        grey = read_png(path)
        if grey.T.shape != shape[:2]:
            raise DataError(f"{path}: mask size {grey.shape} differs from the DICOM slices {shape[1::-1]}")
        label[..., z] = to_label(grey.T, path)
    return label
