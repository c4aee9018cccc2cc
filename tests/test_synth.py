"""Synthetic dataset writers: exact layouts, metadata, geometry, determinism, learnable structure."""

from __future__ import annotations

import filecmp
import json
import os

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from crossdim.data import synth
from crossdim.data.formats.io import LPS_TO_RAS


def _tree(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def _class_separation(image: np.ndarray, label: np.ndarray) -> float:
    """Smallest gap between class means over the best channel, in units of the largest class std."""
    classes = np.unique(label)
    worst = np.inf
    for i, a in enumerate(classes):
        for b in classes[i + 1:]:
            gaps = [abs(ch[label == a].mean() - ch[label == b].mean()) /
                    max(ch[label == a].std(), ch[label == b].std(), 1e-6) for ch in image]
            worst = min(worst, max(gaps))
    return float(worst)


def test_write_synthetic_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown format 'nifti'"):
        synth.write_synthetic("nifti", str(tmp_path), 1)
    with pytest.raises(ValueError, match="cases must be >= 1"):
        synth.write_synthetic("msd", str(tmp_path), 0)
    with pytest.raises(ValueError, match="naming must be one of"):
        synth.write_synthetic("brats", str(tmp_path), 1, naming="2022")
    with pytest.raises(ValueError, match="dialect must be one of"):
        synth.write_synthetic("msd", str(tmp_path), 1, dialect="nnunetv1")
    assert os.path.isdir(os.path.join(synth.write_synthetic("brats", str(tmp_path / "n"), 1, naming=2023),
                                      "BraTS-GLI-00000-000"))  # CLI values arrive YAML-typed
    with pytest.raises(TypeError, match="colour"):
        synth.write_synthetic("camus", str(tmp_path), 1, colour=True)


@pytest.mark.parametrize("fmt,opts", [("brats", {}), ("msd", {"dialect": "nnunetv2"}),
                                      ("camus", {"release": "mhd"}), ("chaos", {"modality": "both"})])
def test_deterministic_given_seed(tmp_path, fmt, opts):
    first = synth.write_synthetic(fmt, str(tmp_path / "a"), 1, seed=7, **opts)
    second = synth.write_synthetic(fmt, str(tmp_path / "b"), 1, seed=7, **opts)
    third = synth.write_synthetic(fmt, str(tmp_path / "c"), 1, seed=8, **opts)
    names = _tree(first)
    assert names == _tree(second) and names
    assert all(filecmp.cmp(os.path.join(first, n), os.path.join(second, n), shallow=False) for n in names)
    differing = [n for n in names if os.path.exists(os.path.join(third, n))
                 and not filecmp.cmp(os.path.join(first, n), os.path.join(third, n), shallow=False)]
    assert differing  # another seed gives other data


def test_make_affine_geometry():
    shape, spacing = synth.SHAPE_3D, synth.SPACING_3D
    for oblique in (False, True):
        affine = synth.make_affine(shape, spacing, oblique)
        np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), spacing)
        directions = affine[:3, :3] / np.asarray(spacing)
        np.testing.assert_allclose(directions.T @ directions, np.eye(3), atol=1e-12)
        assert np.linalg.det((LPS_TO_RAS @ affine)[:3, :3]) > 0  # right-handed in LPS, as DICOM needs
        centre = np.r_[(np.asarray(shape) - 1) / 2, 1.0]
        np.testing.assert_allclose((affine @ centre)[:3], synth.WORLD_CENTER)
    oblique = synth.make_affine(shape, spacing, True)
    assert np.abs(oblique[:3, :3] - np.diag(np.diag(oblique[:3, :3]))).max() > 0.1
    flat = synth.make_affine(synth.SHAPE_2D, synth.SPACING_2D, True)
    assert flat[2, 2] == 1.0 and np.all(flat[2, :2] == 0) and np.all(flat[:2, 2] == 0)


@pytest.mark.parametrize("naming", ["2021", "2023"])
def test_brats_layout_and_structure(tmp_path, naming):
    root = synth.write_synthetic("brats", str(tmp_path / "b"), 2, seed=1, naming=naming)
    if naming == "2021":
        case, suffixes, labels = "BraTS2021_00001", ["flair", "seg", "t1", "t1ce", "t2"], [0, 1, 2, 4]
        expected = [f"{case}/{case}_{s}.nii.gz" for s in suffixes]
    else:
        case, suffixes, labels = "BraTS-GLI-00001-000", ["seg", "t1c", "t1n", "t2f", "t2w"], [0, 1, 2, 3]
        expected = [f"{case}/{case}-{s}.nii.gz" for s in suffixes]
    assert [n for n in _tree(root) if n.startswith(case)] == expected
    label_image = nib.load(os.path.join(root, expected[1 if naming == "2021" else 0]))
    label = np.asarray(label_image.dataobj)
    assert label.shape == synth.SHAPE_3D and sorted(np.unique(label).tolist()) == labels
    np.testing.assert_allclose(np.linalg.norm(label_image.affine[:3, :3], axis=0), synth.SPACING_3D, rtol=1e-6)
    et = {"2021": 4, "2023": 3}[naming]
    boxes = [_bbox(mask) for mask in (label > 0, np.isin(label, [1, et]), label == 1)]  # WT, TC, core
    for outer, inner in zip(boxes, boxes[1:]):  # nested blobs: each box strictly inside the previous
        assert np.all(outer[0] < inner[0]) and np.all(inner[1] < outer[1])


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    where = np.argwhere(mask)
    assert where.size, "empty region"
    return where.min(axis=0), where.max(axis=0)


def test_brats_head_on_zero_background_and_learnable():
    case = synth.brats_case(synth.case_rng(0, 0))
    image = np.stack([case.channels[s] for s in synth.BRATS_SEQUENCES])
    nonzero = (image != 0).any(axis=0)
    assert nonzero.mean() < 0.7  # a crop to the non-zero box removes background
    assert np.all(image[:, ~nonzero] == 0) and np.all(image[:, nonzero] > 0)
    corners = [(0, 0, 0), (-1, -1, -1), (0, -1, 0)]
    assert all(not nonzero[c] for c in corners)
    tissue = np.where(case.label > 0, case.label, np.where(nonzero, 9, 0))
    assert _class_separation(image, tissue) > 3.0


def test_msd_dataset_json_per_dialect(tmp_path):
    msd = synth.write_synthetic("msd", str(tmp_path / "m"), 2, dialect="msd", channels=2)
    meta = json.load(open(os.path.join(msd, "dataset.json")))
    assert meta["modality"] == {"0": "T2", "1": "ADC"} and meta["tensorImageSize"] == "4D"
    assert meta["labels"] == {"0": "background", "1": "organ", "2": "lesion"} and meta["numTraining"] == 2
    assert meta["training"][1] == {"image": "./imagesTr/organ_001.nii.gz", "label": "./labelsTr/organ_001.nii.gz"}
    assert nib.load(os.path.join(msd, "imagesTr", "organ_001.nii.gz")).shape == (*synth.SHAPE_3D, 2)
    v2 = synth.write_synthetic("msd", str(tmp_path / "n"), 2, dialect="nnunetv2")
    meta = json.load(open(os.path.join(v2, "dataset.json")))
    assert meta["channel_names"] == {"0": "CT"} and meta["file_ending"] == ".nii.gz"
    assert meta["labels"] == {"background": 0, "organ": 1, "lesion": 2} and meta["numTraining"] == 2
    assert "modality" not in meta and "training" not in meta
    assert _tree(v2) == ["dataset.json", "imagesTr/organ_000_0000.nii.gz", "imagesTr/organ_001_0000.nii.gz",
                         "labelsTr/organ_000.nii.gz", "labelsTr/organ_001.nii.gz"]
    ct = np.asarray(nib.load(os.path.join(v2, "imagesTr", "organ_000_0000.nii.gz")).dataobj)
    assert ct.dtype == np.int16 and ct.min() == -1000


def test_msd_case_is_learnable():
    for channels in (1, 2):
        case = synth.msd_case(synth.case_rng(0, 0), channels)
        image = np.stack(list(case.channels.values())).astype(float)
        assert sorted(np.unique(case.label).tolist()) == [0, 1, 2]
        body = image[0] != image[0].min() if channels == 1 else image[0] != 0
        tissue = np.where(case.label > 0, case.label, np.where(body, 9, 0))
        assert _class_separation(image, tissue) > 2.0


@pytest.mark.parametrize("release", ["mhd", "nifti"])
def test_camus_layout(tmp_path, release):
    root = synth.write_synthetic("camus", str(tmp_path / "c"), 2, release=release)
    stems = [f"patient0002/patient0002_{v}_{p}" for v in ("2CH", "4CH") for p in ("ED", "ES")]
    endings = [".mhd", ".raw"] if release == "mhd" else [".nii.gz"]
    expected = sorted(f"{s}{gt}{e}" for s in stems for gt in ("", "_gt") for e in endings)
    assert [n for n in _tree(root) if n.startswith("patient0002")] == expected
    if release == "mhd":
        header = open(os.path.join(root, stems[0] + ".mhd")).read()
        assert "NDims = 2" in header and "ElementType = MET_UCHAR" in header and "DimSize = 64 64" in header


def test_camus_cases_have_cardiac_structure():
    cases = synth.camus_patient(0, 0)
    for (view, phase), case in cases.items():
        label, image = case.label, case.channels["US"].astype(float)
        assert label.shape == synth.SHAPE_2D and sorted(np.unique(label).tolist()) == [0, 1, 2, 3]
        assert image[label == 2].mean() > 3 * image[label == 1].mean()  # bright wall, dark blood
    for view in synth.CAMUS_VIEWS:  # the cavity shrinks at end-systole
        assert (cases[(view, "ES")].label == 1).sum() < 0.8 * (cases[(view, "ED")].label == 1).sum()


def test_chaos_dicom_series_and_masks(tmp_path):
    root = synth.write_synthetic("chaos", str(tmp_path / "h"), 1, modality="both", ct_rescale=(0.5, -1024.0))
    ct_dir = os.path.join(root, "Train_Sets", "CT", "1", "DICOM_anon")
    names = sorted(os.listdir(ct_dir))
    slices = [pydicom.dcmread(os.path.join(ct_dir, n)) for n in names]
    assert len(slices) == synth.CHAOS_CT_SHAPE[2]
    z = [float(s.ImagePositionPatient[2]) for s in slices]
    assert z != sorted(z) and z != sorted(z, reverse=True)  # names do not sort in slice order
    by_position = sorted(slices, key=lambda s: float(s.ImagePositionPatient[2]))
    assert [int(s.InstanceNumber) for s in by_position] == list(range(len(slices), 0, -1))  # head first
    first = slices[0]
    assert first.Modality == "CT" and float(first.RescaleSlope) == 0.5 and float(first.RescaleIntercept) == -1024
    assert [float(v) for v in first.PixelSpacing] == [0.8, 0.75] and float(first.SliceThickness) == 3.0
    assert (first.Rows, first.Columns) == (40, 48) and len(first.ImageOrientationPatient) == 6
    assert len({s.SeriesInstanceUID for s in slices}) == 1 and len({s.SOPInstanceUID for s in slices}) == len(slices)
    ground = os.path.join(root, "Train_Sets", "CT", "1", "Ground")
    assert sorted(os.listdir(ground))[:2] == ["liver_GT_000.png", "liver_GT_001.png"]
    assert set(np.unique(np.asarray(Image.open(os.path.join(ground, "liver_GT_005.png"))))) <= {0, 255}
    mr = os.path.join(root, "Train_Sets", "MR", "1")
    for sub in ("T2SPIR/DICOM_anon", "T2SPIR/Ground", "T1DUAL/DICOM_anon/InPhase",
                "T1DUAL/DICOM_anon/OutPhase", "T1DUAL/Ground"):
        assert os.listdir(os.path.join(mr, sub)), sub
    grey = np.concatenate([np.asarray(Image.open(os.path.join(mr, "T2SPIR/Ground", n))).ravel()
                           for n in os.listdir(os.path.join(mr, "T2SPIR/Ground"))])
    assert set(np.unique(grey).tolist()) == {0, 63, 126, 189, 252}
    echo = {d: float(pydicom.dcmread(os.path.join(mr, "T1DUAL/DICOM_anon", d, os.listdir(
        os.path.join(mr, "T1DUAL/DICOM_anon", d))[0])).EchoTime) for d in ("InPhase", "OutPhase")}
    assert echo["InPhase"] > echo["OutPhase"]


def test_chaos_mr_sequences_are_learnable():
    for series in ("T2SPIR", "T1DUAL_InPhase", "T1DUAL_OutPhase"):
        case = synth.chaos_series_case(0, 0, series)
        image = case.channels[series][None].astype(float)
        body = image[0] > 0
        tissue = np.where(case.label > 0, case.label, np.where(body, 9, 0))
        # kidneys share intensity; they are told apart by side (x), so merge them here
        tissue = np.where(tissue == 3, 2, tissue)
        assert _class_separation(image, tissue) > 2.0, series
