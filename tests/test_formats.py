"""Layout readers (msd, brats, camus, chaos) against synthetic datasets written in the real layouts."""

from __future__ import annotations

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from crossdim.data import synth
from crossdim.data.formats import get_format
from crossdim.data.formats.base import DataError
from crossdim.data.formats.chaos import ct_mask_to_label, dicom_affine, mr_grey_to_label
from crossdim.data.formats.io import (
    grid_corners_world, grid_distance_mm, itk_to_ras_affine, ras_affine_to_itk,
)
from crossdim.data.formats.msd import modality_of, nnunet_labels

SEED = 3


def _write(tmp_path, fmt: str, cases: int = 2, **opts) -> str:
    return synth.write_synthetic(fmt, str(tmp_path / f"{fmt}_{'_'.join(map(str, opts.values()))}"),
                                 cases, seed=SEED, **opts)


def _load(fmt: str, root: str, index: int = 0, **read_kw):
    reader = get_format(fmt)
    info = reader.read_dataset(root, **read_kw)
    return info, reader.load_case(info.cases[index], info)


def _assert_world_corners(affine: np.ndarray, shape, expected_affine: np.ndarray) -> None:
    """Voxel (0,0,0) and the far corner land where the writer intended (within 1e-3 mm)."""
    for voxel in (np.zeros(len(shape)), np.asarray(shape) - 1):
        homogeneous = np.r_[voxel, np.zeros(3 - len(shape)), 1.0]
        np.testing.assert_allclose((affine @ homogeneous)[:3], (expected_affine @ homogeneous)[:3], atol=1e-3)


# --- pure helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
def test_itk_affine_round_trip(dims):
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.normal(size=(dims, dims)))
    spacing, origin = rng.uniform(0.3, 3.0, dims), rng.uniform(-50, 50, dims)
    affine = itk_to_ras_affine(tuple(rotation.ravel()), tuple(spacing), tuple(origin))
    direction, spacing2, origin2 = ras_affine_to_itk(affine, dims)
    np.testing.assert_allclose(np.reshape(direction, (dims, dims)), rotation, atol=1e-12)
    np.testing.assert_allclose(spacing2, spacing)
    np.testing.assert_allclose(origin2, origin)
    # LPS -> RAS: x and y world axes negated, z kept
    assert affine[0, 3] == pytest.approx(-origin[0]) and affine[1, 3] == pytest.approx(-origin[1])


def test_grid_distance_measures_corner_shift():
    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    shifted = affine.copy()
    shifted[:3, 3] += [0.0, 0.0, 0.5]
    assert grid_distance_mm((4, 5, 6), affine, affine) == 0.0
    assert grid_distance_mm((4, 5, 6), affine, shifted) == pytest.approx(0.5)
    assert grid_corners_world((4, 5), affine).shape == (4, 3)


def test_dicom_affine_maps_column_row_slice():
    row, col = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    affine = dicom_affine(row, col, (0.8, 0.7), np.array([10.0, 20.0, 30.0]), 2.5)
    # voxel (x=column 1, y=row 1, z=1) in LPS is (10.7, 20.8, 32.5) -> RAS (-10.7, -20.8, 32.5)
    np.testing.assert_allclose(affine @ [1, 1, 1, 1], [-10.7, -20.8, 32.5, 1.0])


def test_mr_grey_levels_map_with_tolerance_ranges():
    grey = np.array([[0, 55, 63, 70, 110, 126, 135], [175, 189, 200, 240, 252, 255, 0]], dtype=np.uint8)
    expected = np.array([[0, 1, 1, 1, 2, 2, 2], [3, 3, 3, 4, 4, 4, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(mr_grey_to_label(grey, "m.png"), expected)
    for outside in (54, 90, 140, 220):
        with pytest.raises(DataError, match=rf"m\.png: grey levels \[{outside}\]"):
            mr_grey_to_label(np.array([[0, outside]], dtype=np.uint8), "m.png")
    np.testing.assert_array_equal(ct_mask_to_label(np.array([0, 1, 255]), "c.png"), [0, 1, 1])


def test_nnunet_region_labels_and_modality_names():
    labels, regions = nnunet_labels({"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3],
                                     "enhancing tumor": 3}, "d.json")
    assert labels == {0: "background", 1: "label_1", 2: "label_2", 3: "enhancing tumor"}
    assert regions == {"whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
    assert nnunet_labels({"background": 0, "liver": 1}, "d.json") == ({0: "background", 1: "liver"}, {})
    with pytest.raises(DataError, match="d.json: label 'x'"):
        nnunet_labels({"x": "one"}, "d.json")
    assert modality_of(["CT"]) == "CT" and modality_of(["T2", "ADC"]) == "MR"
    assert modality_of(["CT", "T2"]) == "other" and modality_of(["PET"]) == "other"


# --- each format, each variant: listing, arrays, ground truth, geometry -------------------------


@pytest.mark.parametrize("naming,oblique", [("2021", False), ("2023", True)])
def test_brats_round_trip(tmp_path, naming, oblique):
    root = _write(tmp_path, "brats", 3, naming=naming, oblique=oblique)
    info, loaded = _load("brats", root, index=1)
    if naming == "2021":
        assert [c.id for c in info.cases] == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]
        assert info.channel_names == ["flair", "t1", "t1ce", "t2"] and sorted(info.labels) == [0, 1, 2, 4]
        assert info.regions == {"ET": [4], "TC": [1, 4], "WT": [1, 2, 4]}
    else:
        assert info.cases[0].id == "BraTS-GLI-00000-000"
        assert info.channel_names == ["t2f", "t1n", "t1c", "t2w"] and sorted(info.labels) == [0, 1, 2, 3]
        assert info.regions == {"ET": [3], "TC": [1, 3], "WT": [1, 2, 3]}
    assert info.label_convention == f"brats{naming}" and info.modality == "MR" and info.spatial_dims == 3
    assert info.channel_modalities == ["FLAIR", "T1", "T1CE", "T2"]
    truth = synth.brats_case(synth.case_rng(SEED, 1))
    assert loaded.image.shape == (4, *synth.SHAPE_3D) and loaded.image.dtype == np.float32
    assert loaded.label.dtype == np.uint8
    for channel, sequence in enumerate(synth.BRATS_SEQUENCES):  # same physical order in both namings
        np.testing.assert_array_equal(loaded.image[channel], truth.channels[sequence])
    np.testing.assert_array_equal(loaded.label, synth.brats_label(truth.label, naming))
    _assert_world_corners(loaded.affine, synth.SHAPE_3D, synth.make_affine(synth.SHAPE_3D, synth.SPACING_3D, oblique))


@pytest.mark.parametrize("dialect,channels", [("msd", 1), ("msd", 2), ("nnunetv2", 1), ("nnunetv2", 2)])
def test_msd_round_trip(tmp_path, dialect, channels):
    root = _write(tmp_path, "msd", 2, dialect=dialect, channels=channels, oblique=True)
    info, loaded = _load("msd", root, index=1)
    assert [c.id for c in info.cases] == ["organ_000", "organ_001"]
    assert info.labels == {0: "background", 1: "organ", 2: "lesion"} and info.regions == {}
    assert info.channel_names == (["CT"] if channels == 1 else ["T2", "ADC"])
    assert info.modality == ("CT" if channels == 1 else "MR")
    assert len(info.cases[0].images) == channels
    truth = synth.msd_case(synth.case_rng(SEED, 1), channels)
    assert loaded.image.shape == (channels, *synth.SHAPE_3D) and loaded.image.dtype == np.float32
    np.testing.assert_array_equal(loaded.image, np.stack(list(truth.channels.values())).astype(np.float32))
    np.testing.assert_array_equal(loaded.label, truth.label)
    _assert_world_corners(loaded.affine, synth.SHAPE_3D, synth.make_affine(synth.SHAPE_3D, synth.SPACING_3D, True))


@pytest.mark.parametrize("release,oblique", [("mhd", False), ("nifti", True)])
def test_camus_round_trip(tmp_path, release, oblique):
    root = _write(tmp_path, "camus", 2, release=release, oblique=oblique)
    info, loaded = _load("camus", root, index=6)
    ids = [c.id for c in info.cases]
    assert len(ids) == 8 and ids[:4] == ["patient0001_2CH_ED", "patient0001_2CH_ES",
                                         "patient0001_4CH_ED", "patient0001_4CH_ES"]
    assert info.spatial_dims == 2 and info.modality == "US" and sorted(info.labels) == [0, 1, 2, 3]
    assert dict(info.cases[6].extra)["release"] == release and ids[6] == "patient0002_4CH_ED"
    truth = synth.camus_patient(SEED, 1)[("4CH", "ED")]
    assert loaded.image.shape == (1, *synth.SHAPE_2D) and loaded.label.shape == synth.SHAPE_2D
    np.testing.assert_array_equal(loaded.image[0], truth.channels["US"])
    np.testing.assert_array_equal(loaded.label, truth.label)
    _assert_world_corners(loaded.affine, synth.SHAPE_2D, synth.make_affine(synth.SHAPE_2D, synth.SPACING_2D, oblique))


def test_camus_mhd_and_nifti_releases_agree(tmp_path):
    """ITK-loaded (LPS, (y, x) arrays) and nibabel-loaded data end up identical."""
    mhd = _load("camus", _write(tmp_path, "camus", 1, release="mhd", oblique=True), index=3)[1]
    nifti = _load("camus", _write(tmp_path, "camus", 1, release="nifti", oblique=True), index=3)[1]
    np.testing.assert_array_equal(mhd.image, nifti.image)
    np.testing.assert_array_equal(mhd.label, nifti.label)
    np.testing.assert_allclose(mhd.affine, nifti.affine, atol=1e-5)
    assert mhd.source_files[0].endswith(".mhd") and nifti.source_files[0].endswith(".nii.gz")


@pytest.mark.parametrize("oblique", [False, True])
def test_chaos_mr_round_trip(tmp_path, oblique):
    root = _write(tmp_path, "chaos", 2, modality="MR", oblique=oblique)
    info = get_format("chaos").read_dataset(root)
    assert [c.id for c in info.cases] == ["1_T1DUAL_InPhase", "1_T1DUAL_OutPhase", "1_T2SPIR",
                                          "2_T1DUAL_InPhase", "2_T1DUAL_OutPhase", "2_T2SPIR"]
    assert info.modality == "MR" and info.channel_names == ["MR"] and sorted(info.labels) == [0, 1, 2, 3, 4]
    assert dict(info.cases[5].extra) == {"patient": "2", "sequence": "T2SPIR"}
    loaded = {c.id: get_format("chaos").load_case(c, info) for c in info.cases[3:]}
    for series in ("T2SPIR", "T1DUAL_InPhase", "T1DUAL_OutPhase"):
        truth = synth.chaos_series_case(SEED, 1, series)
        case = loaded[f"2_{series}"]
        shape, spacing = synth.CHAOS_MR_GEOMETRY[series.split("_")[0]]
        assert case.image.shape == (1, *shape) and case.label.shape == shape
        np.testing.assert_array_equal(case.image[0], truth.channels[series])
        np.testing.assert_array_equal(case.label, truth.label)
        assert set(np.unique(case.label)) == {0, 1, 2, 3, 4}
        _assert_world_corners(case.affine, shape, synth.make_affine(shape, spacing, oblique))
    np.testing.assert_array_equal(loaded["2_T1DUAL_InPhase"].label, loaded["2_T1DUAL_OutPhase"].label)


def test_chaos_ct_slice_order_from_geometry_not_file_names(tmp_path):
    """CT InstanceNumber runs against the geometric order and file names are random: the volume
    must come out in geometric order and each mask on the slice its InstanceNumber names."""
    root = _write(tmp_path, "chaos", 1, modality="CT", ct_rescale=(0.5, -1024.0))
    series_dir = os.path.join(root, "Train_Sets", "CT", "1", "DICOM_anon")
    names = sorted(os.listdir(series_dir))
    for old, new in zip(names, reversed(names)):  # shuffle names once more: swap via temp names
        os.rename(os.path.join(series_dir, old), os.path.join(series_dir, f"tmp_{new}"))
    for name in os.listdir(series_dir):
        os.rename(os.path.join(series_dir, name), os.path.join(series_dir, name.removeprefix("tmp_")))
    info, loaded = _load("chaos", root)
    assert [c.id for c in info.cases] == ["1"] and info.modality == "CT"
    assert info.labels == {0: "background", 1: "liver"}
    truth = synth.chaos_series_case(SEED, 0, "CT")
    assert not np.array_equal(truth.label, truth.label[..., ::-1])  # a z flip would be detected
    np.testing.assert_array_equal(loaded.image[0], truth.channels["CT"])  # HU via slope 0.5
    np.testing.assert_array_equal(loaded.label, truth.label)
    _assert_world_corners(loaded.affine, synth.CHAOS_CT_SHAPE,
                          synth.make_affine(synth.CHAOS_CT_SHAPE, synth.CHAOS_CT_SPACING))


def test_chaos_root_resolution(tmp_path):
    root = _write(tmp_path, "chaos", 1, modality="both")
    reader = get_format("chaos")
    with pytest.raises(DataError, match="holds both CT and MR"):
        reader.read_dataset(root)
    assert reader.read_dataset(root, modality="CT").modality == "CT"
    with pytest.raises(DataError, match="Train_Sets: holds both CT and MR"):
        reader.read_dataset(os.path.join(root, "Train_Sets"))
    with pytest.raises(DataError, match="is the MR folder but modality='CT'"):
        reader.read_dataset(os.path.join(root, "Train_Sets", "MR"), modality="CT")
    assert reader.read_dataset(os.path.join(root, "Train_Sets", "MR")).modality == "MR"
    assert [c.id for c in reader.read_dataset(os.path.join(root, "Train_Sets", "CT")).cases] == ["1"]


def test_unlabelled_datasets_give_label_none(tmp_path):
    root = _write(tmp_path, "brats", 2)
    for case in os.listdir(root):
        os.remove(os.path.join(root, case, f"{case}_seg.nii.gz"))
    info, loaded = _load("brats", root)
    assert all(c.label is None for c in info.cases) and loaded.label is None
    assert loaded.image.shape == (4, *synth.SHAPE_3D)


def test_read_dataset_is_sorted_and_deterministic(tmp_path):
    root = _write(tmp_path, "msd", 3, dialect="nnunetv2")
    reader = get_format("msd")
    assert reader.read_dataset(root).cases == reader.read_dataset(root).cases
    open(os.path.join(root, "imagesTr", "._organ_000_0000.nii.gz"), "wb").close()  # macOS junk
    assert [c.id for c in reader.read_dataset(root).cases] == ["organ_000", "organ_001", "organ_002"]


# --- bad input: one-line DataError naming the file ----------------------------------------------


def _one_line_error(excinfo, needle: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message and needle in message, message


def test_missing_root_empty_dir_and_missing_dataset_json(tmp_path):
    for fmt in ("msd", "brats", "camus", "chaos"):
        with pytest.raises(DataError) as excinfo:
            get_format(fmt).read_dataset(str(tmp_path / "nope"))
        _one_line_error(excinfo, str(tmp_path / "nope"))
        empty = tmp_path / f"empty_{fmt}"
        empty.mkdir()
        with pytest.raises(DataError) as excinfo:
            get_format(fmt).read_dataset(str(empty))
        _one_line_error(excinfo, str(empty))
    root = _write(tmp_path, "msd", 1)
    os.remove(os.path.join(root, "dataset.json"))
    with pytest.raises(DataError, match="dataset.json: file is missing"):
        get_format("msd").read_dataset(root)


def test_dataset_json_errors_name_the_field(tmp_path):
    root = _write(tmp_path, "msd", 2)
    path = os.path.join(root, "dataset.json")
    meta = json.load(open(path))
    meta["numTraining"] = 5
    json.dump(meta, open(path, "w"))
    with pytest.raises(DataError, match="dataset.json: numTraining is 5 but 2"):
        get_format("msd").read_dataset(root)
    del meta["labels"]
    json.dump(meta, open(path, "w"))
    with pytest.raises(DataError, match="dataset.json: field 'labels' is missing"):
        get_format("msd").read_dataset(root)
    open(path, "w").write("{not json")
    with pytest.raises(DataError, match="dataset.json: unreadable JSON"):
        get_format("msd").read_dataset(root)


def test_truncated_nifti(tmp_path):
    root = _write(tmp_path, "brats", 1)
    path = os.path.join(root, "BraTS2021_00000", "BraTS2021_00000_t1ce.nii.gz")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(DataError) as excinfo:
        _load("brats", root)
    _one_line_error(excinfo, f"{path}: unreadable NIfTI")


def test_missing_modality_is_listed_then_fails_at_load(tmp_path):
    root = _write(tmp_path, "brats", 2, naming="2023")
    missing = os.path.join(root, "BraTS-GLI-00001-000", "BraTS-GLI-00001-000-t1c.nii.gz")
    os.remove(missing)
    info = get_format("brats").read_dataset(root)
    assert len(info.cases) == 2 and missing in info.cases[1].images
    get_format("brats").load_case(info.cases[0], info)  # the other case is fine
    with pytest.raises(DataError, match=f"{missing}: file is missing"):
        get_format("brats").load_case(info.cases[1], info)


def test_missing_nnunet_channel_and_label(tmp_path):
    root = _write(tmp_path, "msd", 2, dialect="nnunetv2", channels=2)
    channel = os.path.join(root, "imagesTr", "organ_001_0001.nii.gz")
    label = os.path.join(root, "labelsTr", "organ_000.nii.gz")
    os.remove(channel)
    os.remove(label)
    info = get_format("msd").read_dataset(root)
    assert [c.id for c in info.cases] == ["organ_000", "organ_001"]
    with pytest.raises(DataError, match=f"{label}: file is missing"):
        get_format("msd").load_case(info.cases[0], info)
    with pytest.raises(DataError, match=f"{channel}: file is missing"):
        get_format("msd").load_case(info.cases[1], info)


def _replace_nifti(path: str, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    image = nib.load(path)
    nib.save(nib.Nifti1Image(array, image.affine if affine is None else affine), path)


def test_label_shape_mismatch(tmp_path):
    root = _write(tmp_path, "msd", 1)
    label = os.path.join(root, "labelsTr", "organ_000.nii.gz")
    _replace_nifti(label, np.zeros((40, 40, 23), dtype=np.uint8))
    with pytest.raises(DataError, match=rf"{label}: label shape \(40, 40, 23\) differs"):
        _load("msd", root)


def test_channel_affine_mismatch(tmp_path):
    root = _write(tmp_path, "brats", 1)
    path = os.path.join(root, "BraTS2021_00000", "BraTS2021_00000_t2.nii.gz")
    image = nib.load(path)
    shifted = image.affine.copy()
    shifted[:3, 3] += [0.0, 0.0, 0.01]
    _replace_nifti(path, np.asarray(image.dataobj), shifted)
    with pytest.raises(DataError, match=f"{path}: channel affine differs .* by 0.01 mm"):
        _load("brats", root)


def test_nan_voxels(tmp_path):
    root = _write(tmp_path, "msd", 1, channels=2)
    path = os.path.join(root, "imagesTr", "organ_000.nii.gz")
    data = np.asarray(nib.load(path).dataobj).copy()
    data[3, 4, 5, 1] = np.nan
    _replace_nifti(path, data)
    with pytest.raises(DataError, match=f"{path}: 1 NaN/Inf voxels"):
        _load("msd", root)


def test_label_value_outside_declared_set(tmp_path):
    root = _write(tmp_path, "brats", 1)
    path = os.path.join(root, "BraTS2021_00000", "BraTS2021_00000_seg.nii.gz")
    label = np.asarray(nib.load(path).dataobj).copy()
    label[label == 4] = 3  # a 2023 value inside a 2021-named dataset
    _replace_nifti(path, label)
    with pytest.raises(DataError, match=rf"{path}: label values \[3\] outside the declared set \[0, 1, 2, 4\]"):
        _load("brats", root)


def test_msd_4d_channel_count_mismatch(tmp_path):
    root = _write(tmp_path, "msd", 1, channels=2)
    path = os.path.join(root, "imagesTr", "organ_000.nii.gz")
    _replace_nifti(path, np.zeros((40, 40, 24, 3), dtype=np.float32))
    with pytest.raises(DataError, match=rf"{path}: expected 2 channels on the last axis, got shape \(40, 40, 24, 3\)"):
        _load("msd", root)


def test_camus_truncated_or_missing_raw(tmp_path):
    root = _write(tmp_path, "camus", 1, release="mhd")
    raw = os.path.join(root, "patient0001", "patient0001_2CH_ES.raw")
    data = open(raw, "rb").read()
    open(raw, "wb").write(data[:100])
    with pytest.raises(DataError, match=f"{raw}: truncated \\(100 of {len(data)} bytes\\)"):
        _load("camus", root, index=1)
    os.remove(raw)
    with pytest.raises(DataError, match=f"{raw}: file is missing"):
        _load("camus", root, index=1)
    gt = os.path.join(root, "patient0001", "patient0001_4CH_ED_gt.mhd")
    os.remove(gt)
    info = get_format("camus").read_dataset(root)
    with pytest.raises(DataError, match=f"{gt}: file is missing"):
        get_format("camus").load_case(info.cases[2], info)


def test_camus_both_releases_rejected(tmp_path):
    root = _write(tmp_path, "camus", 1, release="mhd")
    nifti = _write(tmp_path, "camus", 1, release="nifti")
    shutil.copy(os.path.join(nifti, "patient0001", "patient0001_2CH_ED.nii.gz"), os.path.join(root, "patient0001"))
    with pytest.raises(DataError, match="both the MetaImage"):
        get_format("camus").read_dataset(root)


def test_chaos_bad_masks_and_dicom(tmp_path):
    root = _write(tmp_path, "chaos", 2, modality="MR")
    patient = os.path.join(root, "Train_Sets", "MR", "1")
    ground = os.path.join(patient, "T2SPIR", "Ground")
    first = os.path.join(ground, sorted(os.listdir(ground))[0])
    grey = np.asarray(Image.open(first)).copy()
    grey[0, 0] = 90
    Image.fromarray(grey).save(first)
    info = get_format("chaos").read_dataset(root)
    cases = {c.id: c for c in info.cases}
    with pytest.raises(DataError, match=rf"{first}: grey levels \[90\] outside"):
        get_format("chaos").load_case(cases["1_T2SPIR"], info)
    os.remove(first)
    with pytest.raises(DataError, match=f"{ground}: 9 PNG masks for 10 DICOM slices"):
        get_format("chaos").load_case(cases["1_T2SPIR"], info)
    series = os.path.join(patient, "T1DUAL", "DICOM_anon", "InPhase")
    victim = os.path.join(series, sorted(os.listdir(series))[0])
    with open(victim, "r+b") as handle:
        handle.truncate(os.path.getsize(victim) - 100)  # cut into the pixel data
    with pytest.raises(DataError) as excinfo:
        get_format("chaos").load_case(cases["1_T1DUAL_InPhase"], info)
    _one_line_error(excinfo, f"{victim}: unreadable DICOM")
    shutil.rmtree(os.path.join(root, "Train_Sets", "MR", "2", "T2SPIR", "Ground"))
    info = get_format("chaos").read_dataset(root)  # still listed: labelled dataset, one Ground missing
    case = {c.id: c for c in info.cases}["2_T2SPIR"]
    with pytest.raises(DataError, match="2/T2SPIR/Ground: Ground mask folder does not exist"):
        get_format("chaos").load_case(case, info)


def test_chaos_rejects_non_uniform_slice_spacing(tmp_path):
    import pydicom

    root = _write(tmp_path, "chaos", 1, modality="CT")
    series = os.path.join(root, "Train_Sets", "CT", "1", "DICOM_anon")
    files = [os.path.join(series, n) for n in os.listdir(series)]
    top = max(files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    ds = pydicom.dcmread(top)
    ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 1.0]
    ds.save_as(top)
    with pytest.raises(DataError, match=f"{series}: non-uniform slice spacing"):
        _load("chaos", root)
