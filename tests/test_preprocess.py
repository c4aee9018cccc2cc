"""Preprocessing transforms (MONAI): orientation, spacing, crop, normalisation, and their inversion."""

from __future__ import annotations

import numpy as np
import pytest

from crossdim.data import preprocess as P
from crossdim.data.formats.base import DatasetInfo, LoadedCase

# voxel axes permuted and flipped relative to RAS: i -> -A (1.5 mm), j -> -R (1.0 mm), k -> +S (2.0 mm)
AFFINE_3D = np.array([[0.0, -1.0, 0.0, 10.0], [-1.5, 0.0, 0.0, 20.0], [0.0, 0.0, 2.0, -5.0], [0, 0, 0, 1.0]])
AFFINE_2D = np.array([[0.0, -0.5, 0.0, 3.0], [-0.7, 0.0, 0.0, 4.0], [0.0, 0.0, 1.0, 0.0], [0, 0, 0, 1.0]])


def _info(channels: list[str], modality: str = "MR", spatial_dims: int = 3) -> DatasetInfo:
    return DatasetInfo(format="msd", name="t", modality=modality, channel_names=channels,
                       labels={0: "background", 1: "organ", 2: "lesion"}, spatial_dims=spatial_dims,
                       cases=[], channel_modalities=channels)


def _case(shape: tuple[int, ...], affine: np.ndarray, channels: int = 2, seed: int = 0,
          background: float = 0.0) -> LoadedCase:
    """Noise in a body box (zero border), an organ (1) holding a lesion (2)."""
    rng = np.random.default_rng(seed)
    image = np.full((channels, *shape), background, dtype=np.float32)
    body = tuple(slice(2, n - 3) for n in shape)
    image[(slice(None), *body)] = rng.normal(100.0, 20.0, size=(channels, *[n - 5 for n in shape]))
    label = np.zeros(shape, np.uint8)
    label[tuple(slice(n // 4, n // 2 + 2) for n in shape)] = 1
    label[tuple(slice(n // 4 + 1, n // 4 + 3) for n in shape)] = 2
    return LoadedCase(id=f"case{seed}", image=image, label=label, affine=affine, source_files=("img.nii.gz",))


def _plan(case: LoadedCase, info: DatasetInfo, **kw) -> P.PreprocessPlan:
    return P.fit_plan(info, [P.case_fingerprint(case, info)], **kw)


def _world_centroid(label: np.ndarray, affine: np.ndarray, value: int) -> np.ndarray:
    idx = np.argwhere(label == value).mean(axis=0)
    idx = np.concatenate([idx, np.zeros(3 - idx.size), [1.0]])
    return (affine @ idx)[:3]


def test_oriented_grid_permutes_and_flips_axes():
    shape, spacing = P.oriented_grid((20, 24, 16), AFFINE_3D, 3, "RAS")
    assert shape == (24, 20, 16) and spacing == pytest.approx((1.0, 1.5, 2.0))
    shape2, spacing2 = P.oriented_grid((20, 24), AFFINE_2D, 2, "RAS")
    assert shape2 == (24, 20) and spacing2 == pytest.approx((0.5, 0.7))


@pytest.mark.parametrize("shape,affine", [((20, 24, 16), AFFINE_3D), ((30, 26), AFFINE_2D)], ids=["3d", "2d"])
def test_own_spacing_round_trip_is_exact(shape, affine):
    sd = len(shape)
    info = _info(["T2", "ADC"], spatial_dims=sd)
    case = _case(shape, affine)
    plan = _plan(case, info)  # median spacing of one case = its own spacing
    image, label, spacing, out_affine, geometry = P.preprocess_case(case, info, plan)
    assert spacing == pytest.approx(P.oriented_grid(shape, affine, sd, "RAS")[1])
    assert P.voxel_spacing(out_affine, sd) == pytest.approx(spacing)
    # reoriented to RAS: every axis direction is positive
    assert np.all(np.diag(out_affine)[:sd] > 0)
    # the zero border is cropped away: the box is the body (3 voxels smaller per axis)
    assert image.shape[1:] == label.shape == tuple(n - 5 for n in geometry["resampled_shape"])
    assert image.dtype == np.float32 and label.dtype == np.uint8
    # world positions are kept
    for value in (1, 2):
        np.testing.assert_allclose(_world_centroid(label, out_affine, value),
                                   _world_centroid(case.label, affine, value), atol=1e-6)
    np.testing.assert_array_equal(P.invert_to_original(label, geometry), case.label)


def test_zscore_over_nonzero_voxels_per_channel():
    info = _info(["T2", "ADC"])
    case = _case((20, 24, 16), AFFINE_3D)
    case.image[1] *= 7.0
    image, *_ = P.preprocess_case(case, info, _plan(case, info, crop_foreground=False))
    for channel in image:
        body = channel[channel != 0]
        assert abs(body.mean()) < 1e-4 and body.std() == pytest.approx(1.0, abs=1e-3)
    assert (image == 0).sum() == (case.image == 0).sum()  # background stays 0


def test_resampling_to_another_spacing_then_inverting_is_close():
    info = _info(["T2", "ADC"])
    case = _case((24, 28, 20), AFFINE_3D, seed=1)
    plan = _plan(case, info, target_spacing=[1.25, 1.25, 1.5])
    image, label, spacing, out_affine, geometry = P.preprocess_case(case, info, plan)
    assert spacing == pytest.approx((1.25, 1.25, 1.5), abs=1e-5)
    oriented_shape, oriented_spacing = P.oriented_grid(case.label.shape, AFFINE_3D, 3, "RAS")
    expected = P.resampled_shape(oriented_shape, oriented_spacing, [1.25, 1.25, 1.5])
    assert all(abs(a - b) <= 1 for a, b in zip(geometry["resampled_shape"], expected))
    back = P.invert_to_original(label, geometry)
    assert back.shape == case.label.shape and back.dtype == np.uint8
    organ, organ_back = case.label > 0, back > 0
    dice = 2 * (organ & organ_back).sum() / (organ.sum() + organ_back.sum())
    assert dice > 0.9 and (back == case.label).mean() > 0.97
    np.testing.assert_allclose(_world_centroid(label, out_affine, 1), _world_centroid(case.label, AFFINE_3D, 1),
                               atol=1.0)


def test_linear_inversion_of_probabilities():
    info = _info(["T2", "ADC"])
    case = _case((20, 24, 16), AFFINE_3D, seed=2)
    _, label, _, _, geometry = P.preprocess_case(case, info, _plan(case, info))
    probs = np.stack([(label == 0), (label > 0)]).astype(np.float32)
    back = P.invert_to_original(probs, geometry)
    assert back.shape == (2, *case.label.shape) and back.dtype == np.float32
    np.testing.assert_allclose(back[1], (case.label > 0).astype(np.float32), atol=1e-5)
    # outside the crop box there is no prediction: zeros in every channel
    assert back[:, :2].max() < 1e-6


def test_ct_plan_clips_to_dataset_percentiles_then_standardises():
    info = _info(["CT"], modality="CT")
    cases = [_case((20, 24, 16), AFFINE_3D, channels=1, seed=s, background=-1000.0) for s in range(3)]
    plan = P.fit_plan(info, [P.case_fingerprint(c, info) for c in cases])
    norm = plan.normalization[0]
    assert norm.scheme == "ct"
    foreground = np.concatenate([c.image[0][c.label > 0] for c in cases])
    assert norm.clip == pytest.approx(tuple(np.percentile(foreground, [0.5, 99.5])), rel=1e-6)
    clipped = np.clip(foreground, *norm.clip)
    assert norm.mean == pytest.approx(clipped.mean(), rel=1e-6) and norm.std == pytest.approx(clipped.std(), rel=1e-6)
    image, label, *_ = P.preprocess_case(cases[0], info, plan)
    low, high = ((v - norm.mean) / norm.std for v in norm.clip)
    assert image.min() >= low - 1e-4 and image.max() <= high + 1e-4
    assert image.min() == pytest.approx(low, abs=1e-4)  # air (-1000 HU) is clipped, not cropped
    assert image.shape[1:] == label.shape == (24, 20, 16)


def test_auto_schemes_follow_channel_modalities():
    info = _info(["CT", "T2"], modality="other")
    assert P.channel_schemes(info, "auto") == ["ct", "zscore_nonzero"]
    assert P.channel_schemes(info, "none") == ["none", "none"]


def test_inference_replay_matches_training_preprocessing():
    info = _info(["T2", "ADC"])
    case = _case((20, 24, 16), AFFINE_3D, seed=3)
    plan = _plan(case, info, target_spacing=[1.2, 1.2, 1.6])
    image, _, _, affine, geometry = P.preprocess_case(case, info, plan)
    tensor, geometry_inf = P.preprocess_image_for_inference(case.image, case.affine, plan)
    np.testing.assert_allclose(tensor.numpy(), image, atol=1e-6)
    geometry.pop("source_files")
    assert geometry_inf == geometry
    np.testing.assert_allclose(np.asarray(geometry["preprocessed_affine"]), affine)


def test_bad_inputs_raise_named_one_line_errors():
    info = _info(["T2", "ADC"])
    case = _case((20, 24, 16), AFFINE_3D)
    plan = _plan(case, info)
    three = LoadedCase(id="x", image=np.zeros((3, 20, 24, 16), np.float32), label=None, affine=AFFINE_3D,
                       source_files=("x_image.nii.gz",))
    with pytest.raises(ValueError, match=r"x_image.nii.gz: 3 channels, expected 2"):
        P.preprocess_case(three, info, plan)
    with pytest.raises(ValueError, match="target_spacing"):
        _plan(case, info, target_spacing=[1.0, 1.0])
    _, label, _, _, geometry = P.preprocess_case(case, info, plan)
    with pytest.raises(ValueError, match="does not match the preprocessed grid"):
        P.invert_to_original(label[:-1], geometry)
    with pytest.raises(ValueError, match="channels, the plan has 2"):
        P.preprocess_image_for_inference(three.image, AFFINE_3D, plan)
