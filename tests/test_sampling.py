"""Patch / slice sampling: shapes, padding, the foreground ratio, 2D slices of 3D cases, augmentation."""

import numpy as np
import pytest

from crossdim.config import AugmentConfig
from crossdim.data.sampling import (
    ArrayCase,
    PatchSampler,
    SampleSpec,
    centered_start,
    crop_or_pad,
    foreground_locations,
    full_patch,
    random_start,
)


def volume(shape=(40, 36, 20), channels=2, blob=((18, 20), (10, 12), (4, 6)), value=3):
    image = np.random.default_rng(0).normal(size=(channels, *shape)).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[tuple(slice(a, b) for a, b in blob)] = value
    return ArrayCase(image, label, "case")


def test_crop_or_pad_crops_and_pads_with_the_given_value():
    a = np.arange(2 * 4 * 5).reshape(2, 4, 5).astype(np.float32)
    out = crop_or_pad(a, (1, 2), (6, 2), value=-1)
    assert out.shape == (2, 6, 2)
    np.testing.assert_array_equal(out[:, :3], a[:, 1:4, 2:4])
    assert (out[:, 3:] == -1).all()


def test_starts_stay_inside_and_centre_on_the_point():
    rng = np.random.default_rng(1)
    for _ in range(200):
        s = random_start((40, 36, 20), (32, 32, 16), rng)
        assert all(0 <= st <= n - p for st, n, p in zip(s, (40, 36, 20), (32, 32, 16)))
        centre = tuple(int(rng.integers(0, n)) for n in (40, 36, 20))
        c = centered_start((40, 36, 20), (32, 32, 16), centre, rng)
        assert all(st <= x < st + p for st, x, p in zip(c, centre, (32, 32, 16)))
        assert all(0 <= st <= n - p for st, n, p in zip(c, (40, 36, 20), (32, 32, 16)))


def test_3d_patch_shapes_and_smaller_cases_are_padded():
    sampler = PatchSampler([volume(), volume(shape=(24, 36, 20))], SampleSpec((32, 32, 16)), seed=0)
    images, labels = sampler.batch(6)
    assert images.shape == (6, 2, 32, 32, 16) and images.dtype == np.float32
    assert labels.shape == (6, 32, 32, 16) and labels.dtype == np.uint8


@pytest.mark.parametrize("augment", [None, AugmentConfig()])
def test_float16_cases_give_the_float32_samples_of_their_values(augment):
    """Cases held in float16 (as training workers hold them) sample exactly like their float32 values."""
    half = volume()
    half = ArrayCase(half.image.astype(np.float16), half.label, half.id)
    wide = ArrayCase(half.image.astype(np.float32), half.label, half.id)
    spec = SampleSpec((32, 32, 16))
    got = PatchSampler([half], spec, seed=3, augment=augment).batch(4)
    want = PatchSampler([wide], spec, seed=3, augment=augment).batch(4)
    assert got[0].dtype == np.float32
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("ratio", [0.0, 0.33, 1.0])
def test_foreground_ratio_is_respected(ratio):
    # A 2x2x2 blob in a 64x64x48 volume: a random 16^3 patch holds it with probability
    # q ~ 0.05, a forced one always; so the share with foreground is ratio + (1 - ratio) * q.
    case = volume(shape=(64, 64, 48), channels=1, blob=((30, 32), (30, 32), (20, 22)))
    spec = SampleSpec((16, 16, 16), foreground_ratio=ratio)
    sampler = PatchSampler([case], spec, seed=3)
    n = 600
    share = np.mean([(sampler.sample()[1] > 0).any() for _ in range(n)])
    baseline = PatchSampler([case], SampleSpec((16, 16, 16), 0.0), seed=11)
    q = np.mean([(baseline.sample()[1] > 0).any() for _ in range(n)])
    expected = ratio + (1 - ratio) * q
    assert q < 0.15  # the blob is rare in random patches, so the forcing is what we measure
    assert abs(share - expected) < 0.07, (share, expected, q)


def test_forced_samples_always_hold_foreground():
    empty = ArrayCase(np.zeros((2, 40, 36, 20), np.float32), np.zeros((40, 36, 20), np.uint8))
    sampler = PatchSampler([volume(), empty], SampleSpec((16, 16, 16)), seed=0)
    assert all((sampler.sample(force_foreground=True)[1] > 0).any() for _ in range(50))


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_2d_slices_from_3d_along_the_axis(axis):
    case = volume(shape=(40, 36, 20))
    spec = SampleSpec((32, 24), foreground_ratio=1.0, slice_axis=axis)
    assert full_patch(spec, 3)[axis % 3] == 1
    sampler = PatchSampler([case], spec, seed=0)
    image, label = sampler.sample()
    assert image.shape == (2, 32, 24) and label.shape == (32, 24)
    assert (label == 3).any()  # forced: the slice crosses the blob
    # the slice is an actual slice of the volume: its values appear in one plane along `axis`
    moved = np.moveaxis(case.image[0], axis, 0)
    assert any(np.isin(image[0][label > 0], plane).all() for plane in moved)


def test_2d_images_are_padded_or_cropped_to_the_patch():
    small = ArrayCase(np.ones((1, 20, 50), np.float32), np.ones((20, 50), np.uint8))
    sampler = PatchSampler([small], SampleSpec((32, 32), 0.0), seed=0)
    image, label = sampler.sample()
    assert image.shape == (1, 32, 32)
    assert (image[:, 20:] == 0).all() and (label[20:] == 0).all() and (image[:, :20] == 1).all()


def test_bad_specs_are_rejected():
    with pytest.raises(ValueError, match="patch_size"):
        SampleSpec((32,))
    with pytest.raises(ValueError, match="slice_axis"):
        PatchSampler([volume()], SampleSpec((16, 16)), seed=0).sample()


def test_augmentation_keeps_shapes_and_label_values_and_is_seeded():
    case = volume()
    aug = AugmentConfig(flip_prob=0.5, rotate_prob=1.0, scale_intensity_prob=1.0, noise_prob=1.0)
    a = PatchSampler([case], SampleSpec((24, 24, 16), 1.0), seed=5, augment=aug)
    b = PatchSampler([case], SampleSpec((24, 24, 16), 1.0), seed=5, augment=aug)
    plain = PatchSampler([case], SampleSpec((24, 24, 16), 1.0), seed=5)
    (xa, ya), (xb, yb), (xp, _yp) = a.batch(3), b.batch(3), plain.batch(3)
    assert xa.shape == (3, 2, 24, 24, 16) and ya.shape == (3, 24, 24, 16)
    assert set(np.unique(ya)) <= {0, 3}  # nearest-neighbour labels: no new values
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
    assert not np.allclose(xa, xp)  # noise/scale/rotation changed the image
    a.reseed(5)
    np.testing.assert_array_equal(a.batch(3)[0], xa)


def test_foreground_locations_are_flat_int32_indices_of_the_labelled_voxels():
    label = volume().label
    flat = foreground_locations(label)
    assert flat.dtype == np.int32
    np.testing.assert_array_equal(np.stack(np.unravel_index(flat, label.shape), 1), np.argwhere(label > 0))
