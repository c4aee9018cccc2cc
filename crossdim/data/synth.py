"""Synthetic datasets written in the real on-disk layouts (MSD/nnU-Net v2, BraTS, CAMUS, CHAOS).

Small by default (3D ~40x40x24 voxels, anisotropic spacing, non-identity affines, optionally
oblique; CAMUS 64x64), with structures a network can learn (blobs whose intensities differ per
class and channel). Deterministic given `seed`: case i draws from `case_rng(seed, i)`, so the
`*_case` generators below recreate the ground truth a test compares against.

    write_synthetic("brats", "/tmp/brats", cases=3, seed=0, naming="2023") -> dataset root
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from crossdim.data.formats.brats import naming_for
from crossdim.data.formats.chaos import MR_GREY_LEVELS
from crossdim.data.formats.io import LPS_TO_RAS, ras_affine_to_itk

SHAPE_3D = (40, 40, 24)
SPACING_3D = (1.0, 1.2, 2.5)
SHAPE_2D = (64, 64)
SPACING_2D = (0.6, 0.5)
WORLD_CENTER = np.array([12.0, -20.0, 35.0])  # RAS mm at the grid centre
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's prefix for generated UIDs


@dataclass(frozen=True)
class SynthCase:
    """Ground truth of one generated case: channels (name -> (x, y[, z]) array) and label."""

    channels: dict[str, np.ndarray]
    label: np.ndarray


def write_synthetic(fmt: str, out: str, cases: int, seed: int = 0, **opts: object) -> str:
    """Write `cases` synthetic cases of `fmt` under `out`; returns the root `read_dataset` takes."""
    writers: dict[str, Callable[..., str]] = {
        "msd": write_msd, "brats": write_brats, "camus": write_camus, "chaos": write_chaos,
    }
    if fmt not in writers:
        raise ValueError(f"unknown format {fmt!r}; valid formats: {', '.join(writers)}")
    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    os.makedirs(out, exist_ok=True)
    return writers[fmt](out, cases, seed, **opts)


def case_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def _choice(name: str, value: object, valid: Sequence[object]) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {list(valid)}, got {value!r}")


# --- geometry and shapes (pure) -----------------------------------------------------------------


def rotation(oblique: bool) -> np.ndarray:
    """RAS direction cosines: axial LPS-style (x -> left, y -> posterior, z -> superior), tilted
    by 20 deg about z and 12 deg about x when `oblique`. Proper in LPS (DICOM-compatible)."""
    base = np.diag([-1.0, -1.0, 1.0])
    if not oblique:
        return base
    a, b = np.deg2rad(20.0), np.deg2rad(12.0)
    rot_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return base @ rot_z @ rot_x


def make_affine(shape: Sequence[int], spacing: Sequence[float], oblique: bool = False) -> np.ndarray:
    """Voxel -> RAS affine whose grid centre lands on WORLD_CENTER (2D: in-plane rotation only)."""
    affine = np.eye(4)
    if len(shape) == 2:
        angle = np.deg2rad(15.0) if oblique else 0.0
        rot2 = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        affine[:2, :2] = -rot2 * np.asarray(spacing)
    else:
        affine[:3, :3] = rotation(oblique) * np.asarray(spacing)
    centre = (np.asarray(list(shape) + [1] * (3 - len(shape)), float) - 1) / 2
    affine[:3, 3] = WORLD_CENTER - affine[:3, :3] @ centre
    if len(shape) == 2:
        affine[2, 3] = 0.0
    return affine


def ellipsoid(shape: Sequence[int], spacing: Sequence[float], centre: Sequence[float],
              radii_mm: Sequence[float]) -> np.ndarray:
    """Boolean mask of an axis-aligned ellipsoid (centre in voxels, radii in mm)."""
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    distance = sum(((g - c) * s / r) ** 2 for g, c, s, r in zip(grids, centre, spacing, radii_mm))
    return distance <= 1.0


def _bias(rng: np.random.Generator, shape: Sequence[int], strength: float) -> np.ndarray:
    """Smooth multiplicative intensity bias (a random linear ramp), mean 1."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return 1.0 + strength * sum(rng.uniform(-1, 1) * g for g in grids)


def _paint(rng: np.random.Generator, masks: dict[int, np.ndarray], values: dict[int, float],
           noise: float, shape: Sequence[int]) -> np.ndarray:
    """Piecewise-constant image (masks painted in order) with Gaussian noise."""
    image = np.zeros(shape)
    for key, mask in masks.items():
        image[mask] = values[key]
    return image + rng.normal(0.0, noise, size=shape)


# --- BraTS --------------------------------------------------------------------------------------

# tissue -> (FLAIR, T1, T1CE, T2) intensity; 5 = skull, 6 = brain
BRATS_INTENSITY = {
    5: (0.30, 0.90, 0.85, 0.35), 6: (0.45, 0.60, 0.60, 0.50), 2: (0.90, 0.45, 0.45, 0.85),
    4: (0.70, 0.50, 1.00, 0.65), 1: (0.55, 0.25, 0.20, 0.95),
}
BRATS_SEQUENCES = ("FLAIR", "T1", "T1CE", "T2")


def brats_case(rng: np.random.Generator, shape: Sequence[int] = SHAPE_3D,
               spacing: Sequence[float] = SPACING_3D) -> SynthCase:
    """Head (skull shell + brain) on a zero background with a nested tumour; 2021 label values
    (2 edema = WT, 4 enhancing ring and 1 necrotic core = TC, 4 = ET)."""
    extent = np.asarray(shape) * np.asarray(spacing)
    centre = (np.asarray(shape) - 1) / 2
    head = ellipsoid(shape, spacing, centre, 0.46 * extent)
    brain = ellipsoid(shape, spacing, centre, 0.40 * extent)
    tumour = centre + rng.uniform(-0.08, 0.08, 3) * np.asarray(shape)
    radius = rng.uniform(0.22, 0.28) * extent.min() * np.array([1.2, 1.0, 1.1])
    masks = {5: head, 6: brain, 2: ellipsoid(shape, spacing, tumour, radius) & brain,
             4: ellipsoid(shape, spacing, tumour, 0.65 * radius) & brain,
             1: ellipsoid(shape, spacing, tumour, 0.35 * radius) & brain}
    label = np.zeros(shape, dtype=np.uint8)
    for value in (2, 4, 1):
        label[masks[value]] = value
    channels = {}
    for index, sequence in enumerate(BRATS_SEQUENCES):
        values = {key: levels[index] for key, levels in BRATS_INTENSITY.items()}
        image = _paint(rng, masks, values, 0.03, shape) * _bias(rng, shape, 0.1) * 1000.0
        channels[sequence] = np.where(head, np.maximum(image, 1.0), 0.0).astype(np.float32)
    return SynthCase(channels, label)


def brats_label(label_2021: np.ndarray, naming: str) -> np.ndarray:
    """2021 label values -> the values of `naming` ("2021": 0,1,2,4; "2023": 0,1,2,3)."""
    return np.where(label_2021 == 4, 3, label_2021).astype(np.uint8) if naming == "2023" else label_2021


def brats_case_id(index: int, naming: str) -> str:
    return f"BraTS2021_{index:05d}" if naming == "2021" else f"BraTS-GLI-{index:05d}-000"


def write_brats(out: str, cases: int, seed: int = 0, *, naming: str | int = "2021",
                shape: Sequence[int] = SHAPE_3D, spacing: Sequence[float] = SPACING_3D,
                oblique: bool = False) -> str:
    naming = str(naming)  # `--opt naming=2023` arrives as an int
    _choice("naming", naming, ("2021", "2023"))
    layout = naming_for(f"brats{naming}")
    affine = make_affine(shape, spacing, oblique)
    for index in range(cases):
        case = brats_case(case_rng(seed, index), shape, spacing)
        case_id = brats_case_id(index, naming)
        folder = os.path.join(out, case_id)
        os.makedirs(folder, exist_ok=True)
        stem = os.path.join(folder, case_id + layout.separator)
        for suffix, sequence in zip(layout.channels, BRATS_SEQUENCES):
            _save_nifti(case.channels[sequence], affine, f"{stem}{suffix}.nii.gz")
        _save_nifti(brats_label(case.label, naming), affine, f"{stem}seg.nii.gz")
    return out


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: str) -> None:
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, path)


# --- MSD / nnU-Net v2 ---------------------------------------------------------------------------

MSD_LABELS = {0: "background", 1: "organ", 2: "lesion"}
MSD_MR_CHANNELS = ("T2", "ADC")
# tissue -> intensity: CT in HU; MR per channel. 3 = body/background tissue
MSD_CT = {3: 0.0, 1: 60.0, 2: 140.0}
MSD_MR = {"T2": {3: 300.0, 1: 650.0, 2: 250.0}, "ADC": {3: 900.0, 1: 1400.0, 2: 600.0}}


def msd_case(rng: np.random.Generator, channels: int = 1, shape: Sequence[int] = SHAPE_3D,
             spacing: Sequence[float] = SPACING_3D) -> SynthCase:
    """Body ellipse with an organ blob (1) holding a lesion (2). 1 channel: CT (int16 HU, air
    -1000); 2 channels: MR-like T2 + ADC (float32, zero outside the body)."""
    extent = np.asarray(shape) * np.asarray(spacing)
    centre = (np.asarray(shape) - 1) / 2
    body = ellipsoid(shape, spacing, centre, extent * np.array([0.45, 0.38, 0.8]))
    organ_c = centre + rng.uniform(-0.1, 0.1, 3) * np.asarray(shape)
    organ_r = extent * rng.uniform(0.15, 0.2) * np.array([1.2, 1.0, 1.5])
    organ = ellipsoid(shape, spacing, organ_c, organ_r) & body
    lesion = ellipsoid(shape, spacing, organ_c + rng.uniform(-1, 1, 3), 0.45 * organ_r) & organ
    label = (organ.astype(np.uint8) + lesion.astype(np.uint8)).astype(np.uint8)
    masks = {3: body, 1: organ, 2: lesion}
    if channels == 1:
        hu = _paint(rng, masks, MSD_CT, 12.0, shape)
        return SynthCase({"CT": np.where(body, np.round(hu), -1000).astype(np.int16)}, label)
    if channels != len(MSD_MR_CHANNELS):
        raise ValueError(f"channels must be 1 (CT) or 2 (T2, ADC), got {channels}")
    return SynthCase({n: np.where(body, _paint(rng, masks, MSD_MR[n], 20.0, shape), 0.0).astype(np.float32)
                      for n in MSD_MR_CHANNELS}, label)


def write_msd(out: str, cases: int, seed: int = 0, *, dialect: str = "msd", channels: int = 1,
              shape: Sequence[int] = SHAPE_3D, spacing: Sequence[float] = SPACING_3D,
              oblique: bool = False, name: str = "Organ") -> str:
    _choice("dialect", dialect, ("msd", "nnunetv2"))
    _choice("channels", channels, (1, 2))
    affine = make_affine(shape, spacing, oblique)
    for folder in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
    ids = [f"{name.lower()}_{index:03d}" for index in range(cases)]
    for index, case_id in enumerate(ids):
        case = msd_case(case_rng(seed, index), channels, shape, spacing)
        _write_msd_images(out, case_id, case, affine, dialect)
        _save_nifti(case.label, affine, os.path.join(out, "labelsTr", f"{case_id}.nii.gz"))
    channel_names = ["CT"] if channels == 1 else list(MSD_MR_CHANNELS[:channels])
    meta = msd_dataset_json(name, channel_names, ids) if dialect == "msd" else nnunet_dataset_json(
        name, channel_names, len(ids))
    with open(os.path.join(out, "dataset.json"), "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2)
    return out


def _write_msd_images(out: str, case_id: str, case: SynthCase, affine: np.ndarray, dialect: str) -> None:
    arrays = list(case.channels.values())
    if dialect == "msd":
        data = arrays[0] if len(arrays) == 1 else np.stack(arrays, axis=-1)
        _save_nifti(data, affine, os.path.join(out, "imagesTr", f"{case_id}.nii.gz"))
        return
    for channel, array in enumerate(arrays):
        _save_nifti(array, affine, os.path.join(out, "imagesTr", f"{case_id}_{channel:04d}.nii.gz"))


def msd_dataset_json(name: str, channel_names: list[str], ids: list[str]) -> dict[str, object]:
    return {
        "name": name, "description": "crossdim synthetic dataset", "reference": "synthetic",
        "licence": "CC-BY-SA 4.0", "release": "1.0", "tensorImageSize": "3D" if len(channel_names) == 1 else "4D",
        "modality": {str(i): n for i, n in enumerate(channel_names)},
        "labels": {str(k): v for k, v in MSD_LABELS.items()},
        "numTraining": len(ids), "numTest": 0,
        "training": [{"image": f"./imagesTr/{i}.nii.gz", "label": f"./labelsTr/{i}.nii.gz"} for i in ids],
        "test": [],
    }


def nnunet_dataset_json(name: str, channel_names: list[str], count: int) -> dict[str, object]:
    return {
        "name": name, "channel_names": {str(i): n for i, n in enumerate(channel_names)},
        "labels": {v: k for k, v in MSD_LABELS.items()}, "numTraining": count, "file_ending": ".nii.gz",
    }


# --- CAMUS --------------------------------------------------------------------------------------

CAMUS_VIEWS = ("2CH", "4CH")
CAMUS_PHASES = ("ED", "ES")
CAMUS_INTENSITY = {0: 45.0, 1: 12.0, 2: 140.0, 3: 18.0}  # sector tissue, LV cavity, myocardium, LA


def camus_case(rng: np.random.Generator, view: str, phase: str, shape: Sequence[int] = SHAPE_2D,
               spacing: Sequence[float] = SPACING_2D) -> SynthCase:
    """Apical view (x lateral, y depth from the probe at y=0): ultrasound sector with speckle, LV
    cavity ellipse (1), myocardium ring around it (2), left atrium below (3). ES: smaller cavity."""
    width, depth = shape
    x, y = np.meshgrid(np.arange(width, dtype=float), np.arange(depth, dtype=float), indexing="ij")
    sector = (np.abs(np.arctan2(x - width / 2, y + 1)) < np.deg2rad(38)) & (np.hypot(x - width / 2, y) < 0.97 * depth)
    squeeze = 0.8 if phase == "ES" else 1.0
    shift = (0.06 if view == "4CH" else -0.04) * width + rng.uniform(-2, 2)
    cx, cy = width / 2 + shift, 0.40 * depth + rng.uniform(-2, 2)
    ax, ay = 0.15 * width * squeeze, 0.25 * depth * squeeze
    thickness = 0.06 * width / squeeze
    cavity = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1
    outer = ((x - cx) / (ax + thickness)) ** 2 + ((y - cy) / (ay + thickness)) ** 2 <= 1
    atrium = ((x - cx) / (0.13 * width)) ** 2 + ((y - (cy + ay + thickness + 0.12 * depth)) / (0.11 * depth)) ** 2 <= 1
    label = np.zeros(shape, dtype=np.uint8)
    label[outer & (y <= cy + ay) & sector] = 2
    label[cavity & sector] = 1
    label[atrium & sector & (label == 0)] = 3
    speckle = rng.rayleigh(1.0, size=shape) / np.sqrt(np.pi / 2)
    image = _lut(CAMUS_INTENSITY)[label] * speckle
    return SynthCase({"US": np.where(sector, np.clip(image, 1, 255), 0).astype(np.uint8)}, label)


def camus_patient(seed: int, index: int, shape: Sequence[int] = SHAPE_2D,
                  spacing: Sequence[float] = SPACING_2D) -> dict[tuple[str, str], SynthCase]:
    """The four (view, phase) cases `write_camus` writes for patient `index`."""
    rng = case_rng(seed, index)
    return {(view, phase): camus_case(rng, view, phase, shape, spacing)
            for view in CAMUS_VIEWS for phase in CAMUS_PHASES}


def write_camus(out: str, cases: int, seed: int = 0, *, release: str = "mhd",
                shape: Sequence[int] = SHAPE_2D, spacing: Sequence[float] = SPACING_2D,
                oblique: bool = False) -> str:
    """`cases` patients, each with 2CH/4CH x ED/ES images and `_gt` labels."""
    _choice("release", release, ("mhd", "nifti"))
    affine = make_affine(shape, spacing, oblique)
    save = _save_mhd if release == "mhd" else _save_nifti
    ending = ".mhd" if release == "mhd" else ".nii.gz"
    for index in range(cases):
        patient = f"patient{index + 1:04d}"
        os.makedirs(os.path.join(out, patient), exist_ok=True)
        for (view, phase), case in camus_patient(seed, index, shape, spacing).items():
            stem = os.path.join(out, patient, f"{patient}_{view}_{phase}")
            save(case.channels["US"], affine, stem + ending)
            save(case.label, affine, f"{stem}_gt{ending}")
    return out


def _save_mhd(array: np.ndarray, affine: np.ndarray, path: str) -> None:
    """(x[, y[, z]]) array + RAS affine -> MetaImage (.mhd + .raw) with ITK's LPS geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array)))
    direction, spacing, origin = ras_affine_to_itk(affine, array.ndim)
    image.SetDirection(direction)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, path, useCompression=False)


# --- CHAOS --------------------------------------------------------------------------------------

CHAOS_CT_SHAPE, CHAOS_CT_SPACING = (48, 40, 12), (0.75, 0.8, 3.0)
CHAOS_MR_GEOMETRY = {"T2SPIR": ((44, 40, 10), (1.5, 1.4, 6.0)), "T1DUAL": ((40, 36, 12), (1.6, 1.5, 5.5))}
# organ label -> (centre as a fraction of the grid, radii in mm); x small = patient right
CHAOS_ORGANS = {1: ((0.33, 0.45, 0.7), (14.0, 12.0, 16.0)), 2: ((0.35, 0.72, 0.3), (6.0, 5.0, 9.0)),
                3: ((0.67, 0.72, 0.35), (6.0, 5.0, 9.0)), 4: ((0.7, 0.5, 0.6), (7.0, 6.0, 10.0))}
CHAOS_INTENSITY = {  # tissue -> value; 5 = body
    "CT": {5: 40.0, 1: 110.0},
    "T2SPIR": {5: 300.0, 1: 220.0, 2: 700.0, 3: 700.0, 4: 550.0},
    "T1DUAL_InPhase": {5: 400.0, 1: 620.0, 2: 380.0, 3: 380.0, 4: 450.0},
    "T1DUAL_OutPhase": {5: 350.0, 1: 560.0, 2: 300.0, 3: 300.0, 4: 420.0},
}


def chaos_case(rng: np.random.Generator, series: str, shape: Sequence[int], spacing: Sequence[float],
               organs: Sequence[int]) -> SynthCase:
    """Abdomen cross-section: body ellipse + organ blobs. CT values are integer HU (air -1000);
    MR values are non-negative integers. Organs placed asymmetrically in z (order is testable)."""
    extent = np.asarray(shape) * np.asarray(spacing)
    body = ellipsoid(shape, spacing, (np.asarray(shape) - 1) / 2, extent * np.array([0.47, 0.42, 5.0]))
    masks: dict[int, np.ndarray] = {5: body}
    label = np.zeros(shape, dtype=np.uint8)
    for organ in organs:
        fraction, radii = CHAOS_ORGANS[organ]
        centre = np.asarray(fraction) * (np.asarray(shape) - 1) + rng.uniform(-1, 1, 3)
        masks[organ] = ellipsoid(shape, spacing, centre, radii) & body
        label[masks[organ]] = organ
    image = np.round(_paint(rng, masks, CHAOS_INTENSITY[series], 8.0, shape))
    background = -1000.0 if series == "CT" else 0.0
    return SynthCase({series: np.where(body, np.maximum(image, background), background)}, label)


CHAOS_SERIES = ("CT", "T2SPIR", "T1DUAL_InPhase", "T1DUAL_OutPhase")


def chaos_series_case(seed: int, index: int, series: str) -> SynthCase:
    """The ground truth `write_chaos` writes for patient `index` and `series` (CHAOS_SERIES);
    the OutPhase echo is derived from the InPhase one (same anatomy and label)."""
    _choice("series", series, CHAOS_SERIES)
    rng = np.random.default_rng([seed, index, CHAOS_SERIES.index(series)])
    if series == "T1DUAL_OutPhase":
        in_phase = chaos_series_case(seed, index, "T1DUAL_InPhase")
        body = in_phase.channels["T1DUAL_InPhase"] > 0
        tissue = np.where(in_phase.label > 0, in_phase.label, 5)
        values = _lut(CHAOS_INTENSITY[series])[tissue] + rng.normal(0.0, 8.0, tissue.shape)
        return SynthCase({series: np.where(body, np.maximum(np.round(values), 1.0), 0.0)}, in_phase.label)
    if series == "CT":
        return chaos_case(rng, series, CHAOS_CT_SHAPE, CHAOS_CT_SPACING, (1,))
    shape, spacing = CHAOS_MR_GEOMETRY[series.split("_")[0]]
    return chaos_case(rng, series, shape, spacing, (1, 2, 3, 4))


def _lut(values: dict[int, float]) -> np.ndarray:
    """Lookup table: integer key -> value (0 for absent keys)."""
    table = np.zeros(max(values) + 1)
    for key, value in values.items():
        table[key] = value
    return table


def write_chaos(out: str, cases: int, seed: int = 0, *, modality: str = "MR", oblique: bool = False,
                ct_rescale: tuple[float, float] = (1.0, -1024.0)) -> str:
    """Train_Sets/{CT,MR}/<id>/... DICOM series (random file names; CT InstanceNumber runs
    head-to-feet, i.e. against the geometric order) and Ground PNG masks named in instance order.
    modality "MR" (default), "CT" or "both"; the returned root holds only what was written."""
    _choice("modality", modality, ("CT", "MR", "both"))
    for index in range(cases):
        patient = str(index + 1)
        if modality in ("CT", "both"):
            _write_chaos_ct(out, seed, index, patient, oblique, ct_rescale)
        if modality in ("MR", "both"):
            _write_chaos_mr(out, seed, index, patient, oblique)
    return out


def _write_chaos_ct(out: str, seed: int, index: int, patient: str, oblique: bool,
                    rescale: tuple[float, float]) -> None:
    folder = os.path.join(out, "Train_Sets", "CT", patient)
    case = chaos_series_case(seed, index, "CT")
    affine = make_affine(CHAOS_CT_SHAPE, CHAOS_CT_SPACING, oblique)
    stored = np.round((case.channels["CT"] - rescale[1]) / rescale[0])
    series = DicomSeries("CT", patient, f"{seed}-{index}-CT", rescale, descending=True)
    write_dicom_series(os.path.join(folder, "DICOM_anon"), stored, affine, series, case_rng(seed, 1000 + index))
    write_masks(os.path.join(folder, "Ground"), (case.label > 0).astype(np.uint8) * 255, True,
                lambda k: f"liver_GT_{k:03d}.png")


def _write_chaos_mr(out: str, seed: int, index: int, patient: str, oblique: bool) -> None:
    folder = os.path.join(out, "Train_Sets", "MR", patient)
    rng = case_rng(seed, 2000 + index)
    grey = _lut(MR_GREY_LEVELS).astype(np.uint8)
    for number, (series, sub) in enumerate((("T2SPIR", "T2SPIR/DICOM_anon"),
                                            ("T1DUAL_InPhase", "T1DUAL/DICOM_anon/InPhase"),
                                            ("T1DUAL_OutPhase", "T1DUAL/DICOM_anon/OutPhase"))):
        case = chaos_series_case(seed, index, series)
        shape, spacing = CHAOS_MR_GEOMETRY[series.split("_")[0]]
        meta = DicomSeries("MR", patient, f"{seed}-{index}-{series}", (1.0, 0.0), descending=False,
                           echo_time=2.3 if series.endswith("OutPhase") else 4.6)
        write_dicom_series(os.path.join(folder, sub), case.channels[series], make_affine(shape, spacing, oblique),
                           meta, rng)
        if series != "T1DUAL_OutPhase":
            ground = os.path.join(folder, series.split("_")[0], "Ground")
            write_masks(ground, grey[case.label], False,
                        lambda k, n=number: f"IMG-{n + 2:04d}-{k + 1:05d}.png")


@dataclass(frozen=True)
class DicomSeries:
    modality: str  # "CT" | "MR"
    patient: str
    key: str  # entropy for deterministic UIDs
    rescale: tuple[float, float]  # (slope, intercept)
    descending: bool  # InstanceNumber 1 = the last slice in geometric order
    echo_time: float = 0.0


def write_dicom_series(folder: str, stored: np.ndarray, affine: np.ndarray, series: DicomSeries,
                       rng: np.random.Generator) -> None:
    """(x, y, z) stored pixel values (uint16 range) + RAS affine -> one DICOM file per slice,
    with random file names (they do not sort in slice order)."""
    os.makedirs(folder, exist_ok=True)
    lps = LPS_TO_RAS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_dir, col_dir = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    depth = stored.shape[2]
    names = [f"{v:08x}.dcm" for v in rng.choice(16**7, size=depth, replace=False)]
    series_uid = generate_uid(entropy_srcs=[series.key, "series"])
    for k in range(depth):
        instance = depth - k if series.descending else k + 1
        ds = _dicom_slice(series, series_uid, instance, stored[..., k].T)
        ds.ImagePositionPatient = [round(float(v), 6) for v in lps[:3, 3] + k * lps[:3, 2]]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [round(float(spacing[1]), 6), round(float(spacing[0]), 6)]
        ds.SliceThickness = ds.SpacingBetweenSlices = round(float(spacing[2]), 6)
        ds.save_as(os.path.join(folder, names[k]), enforce_file_format=True)


def _dicom_slice(series: DicomSeries, series_uid: str, instance: int, pixels: np.ndarray) -> pydicom.Dataset:
    sop_class = "1.2.840.10008.5.1.4.1.1.2" if series.modality == "CT" else "1.2.840.10008.5.1.4.1.1.4"
    sop_uid = generate_uid(entropy_srcs=[series.key, str(instance)])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = sop_class, sop_uid, series_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[series.key.split("-")[0], series.patient])
    ds.Modality, ds.PatientID, ds.InstanceNumber = series.modality, series.patient, instance
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if series.modality == "CT":  # MR series carry no rescale tags (the reader defaults to 1, 0)
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = *series.rescale, "HU"
    if series.echo_time:
        ds.EchoTime = series.echo_time
    if pixels.min() < 0 or pixels.max() > 65535:
        raise ValueError(f"stored pixel values {pixels.min()}..{pixels.max()} do not fit uint16")
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    return ds


def write_masks(folder: str, grey: np.ndarray, descending: bool, name: Callable[[int], str]) -> None:
    """(x, y, z) grey masks -> one PNG per slice, the k-th file name for InstanceNumber k + 1."""
    os.makedirs(folder, exist_ok=True)
    depth = grey.shape[2]
    for k in range(depth):
        z = depth - 1 - k if descending else k
        Image.fromarray(np.ascontiguousarray(grey[..., z].T)).save(os.path.join(folder, name(k)))
