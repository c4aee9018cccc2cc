"""TimmEncoder contract, input-channel adaptation and weight-file loading."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from crossdim.models.encoders import (
    TimmEncoder,
    adapt_input_channels,
    find_first_conv,
    match_state_dict,
)

TEST_ENCODERS = ["test_efficientnet", "test_resnet", "test_convnext"]
REAL_ENCODERS = ["efficientnet_b0", "resnet18", "convnext_atto"]


def _features(encoder: TimmEncoder, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return encoder.eval()(x)


@pytest.mark.parametrize("name", TEST_ENCODERS + REAL_ENCODERS)
def test_declared_channels_and_reductions_match_feature_maps(name: str) -> None:
    encoder = TimmEncoder(name)
    feats = _features(encoder, torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == encoder.out_channels
    assert [64 // f.shape[-1] for f in feats] == encoder.reductions
    assert [64 // f.shape[-2] for f in feats] == encoder.reductions
    assert encoder.reductions[-1] == 32


def test_stem_first_feature_gives_the_seed_widths() -> None:
    b0 = TimmEncoder("efficientnet_b0", first_feature="stem")
    assert b0.out_channels == [32, 24, 40, 112, 320]
    assert b0.reductions == [2, 4, 8, 16, 32]
    feats = _features(b0, torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == b0.out_channels
    # the first map is the stem output (bn1 incl. its activation)
    with torch.no_grad():
        stem = b0.model.bn1(b0.model.conv_stem(torch.zeros(1, 3, 64, 64)))
        assert torch.equal(b0(torch.zeros(1, 3, 64, 64))[0], stem)
    assert TimmEncoder("efficientnet_b4", first_feature="stem").out_channels == [48, 32, 56, 160, 448]
    with pytest.raises(ValueError, match="first_feature='stem' needs"):
        TimmEncoder("test_resnet", first_feature="stem")


def test_first_conv_follows_pretrained_cfg() -> None:
    names = {n: find_first_conv(TimmEncoder(n).model)[0] for n in TEST_ENCODERS}
    assert names == {"test_efficientnet": "conv_stem", "test_resnet": "conv1.0", "test_convnext": "stem_0"}


def test_unknown_timm_encoder_lists_close_matches() -> None:
    with pytest.raises(ValueError, match=r"unknown timm encoder 'efficientnet_b99'.*efficientnet_b\d.*timm.list_models"):
        TimmEncoder("efficientnet_b99")


def test_drop_path_rate_reaches_timm() -> None:
    encoder = TimmEncoder("test_convnext", drop_path_rate=0.3)
    rates = [m.drop_prob for m in encoder.modules() if hasattr(m, "drop_prob")]
    assert rates and max(rates) == pytest.approx(0.3)


# ---- adapt_input_channels (pure) ----


def test_adapt_input_channels_shapes_and_values() -> None:
    w = torch.randn(8, 3, 3, 3)
    before = w.clone()
    one = adapt_input_channels(w, 1)
    assert one.shape == (8, 1, 3, 3) and torch.allclose(one[:, 0], w.sum(1))
    three = adapt_input_channels(w, 3)
    assert torch.equal(three, w) and three.data_ptr() != w.data_ptr()
    five = adapt_input_channels(w, 5)
    assert five.shape == (8, 5, 3, 3)
    assert torch.allclose(five[:, 3], w[:, 0] * 3 / 5) and torch.allclose(five[:, 4], w[:, 1] * 3 / 5)
    assert adapt_input_channels(torch.randn(4, 3, 2, 3, 3), 16).shape == (4, 16, 2, 3, 3)  # 3D kernels too
    assert torch.equal(w, before)  # input untouched


@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (8, 1, 3, 3), (3,)])
def test_adapt_input_channels_rejects_non_rgb_weights(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"\(O, 3, \*k\)"):
        adapt_input_channels(torch.randn(*shape), 2)


def test_adapt_input_channels_rejects_zero_channels() -> None:
    with pytest.raises(ValueError, match="in_channels must be >= 1"):
        adapt_input_channels(torch.randn(8, 3, 3, 3), 0)


@pytest.fixture()
def rgb_encoder_file(tmp_path) -> tuple[TimmEncoder, str]:
    """An RGB test_efficientnet encoder with non-trivial BN statistics, saved features-only."""
    rgb = TimmEncoder("test_efficientnet")
    rgb.train()
    with torch.no_grad():
        for _ in range(3):
            rgb(torch.randn(4, 3, 64, 64) * 2 + 0.5)
    path = str(tmp_path / "encoder.safetensors")
    save_file({k: v.contiguous() for k, v in rgb.model.state_dict().items()}, path)
    return rgb.eval(), path


def test_grey_encoder_equals_rgb_encoder_on_grey_copies(rgb_encoder_file) -> None:
    rgb, path = rgb_encoder_file
    grey = TimmEncoder("test_efficientnet", in_channels=1, pretrained=path)
    g = torch.rand(2, 1, 64, 64)
    for a, b in zip(_features(grey, g), _features(rgb, g.repeat(1, 3, 1, 1))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_six_channel_encoder_on_stacked_copies_equals_rgb(rgb_encoder_file) -> None:
    rgb, path = rgb_encoder_file
    six = TimmEncoder("test_efficientnet", in_channels=6, pretrained=path)
    x = torch.randn(2, 3, 64, 64)
    for a, b in zip(_features(six, torch.cat([x, x], 1)), _features(rgb, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert find_first_conv(six.model)[1].in_channels == 6


# ---- weight files ----


def _classifier_with_stats(name: str) -> torch.nn.Module:
    model = timm.create_model(name, pretrained=False, num_classes=7)
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    return model.eval()


@pytest.mark.parametrize(
    ("name", "suffix"),
    [("test_convnext", ".pt"), ("test_resnet", ".safetensors"), ("test_efficientnet", ".pth")],
)
def test_classifier_state_dict_loads_and_matches_timms_own_loader(tmp_path, name: str, suffix: str) -> None:
    source = _classifier_with_stats(name)
    path = str(tmp_path / f"weights{suffix}")
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, path)
    elif suffix == ".pt":
        torch.save({"state_dict": state}, path)  # training-checkpoint style wrapper
    else:
        torch.save(state, path)
    encoder = TimmEncoder(name, pretrained=path)
    # timm's own file loader (loads the classifier, then builds the features wrapper) as reference
    reference = timm.create_model(
        name, features_only=True, pretrained=True, num_classes=7, pretrained_cfg_overlay={"file": path}
    )
    x = torch.randn(2, 3, 64, 64)
    ours = _features(encoder, x)
    assert torch.equal(find_first_conv(encoder.model)[1].weight, find_first_conv(source)[1].weight)
    for a, b in zip(ours, _features(reference, x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the classifier's own trunk gives the deepest map
    if name == "test_convnext":
        with torch.no_grad():
            deepest = source.forward_features(x)
        torch.testing.assert_close(ours[-1], deepest, rtol=1e-6, atol=1e-6)


def test_state_dict_with_wrong_keys_is_a_clear_error(tmp_path) -> None:
    state = dict(_classifier_with_stats("test_efficientnet").state_dict())
    state["conv_stem.weight_renamed"] = state.pop("conv_stem.weight")
    path = str(tmp_path / "bad.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    with pytest.raises(ValueError, match=r"bad\.safetensors.*missing keys \[conv_stem\.weight\].*unexpected keys \[conv_stem\.weight_renamed\]"):
        TimmEncoder("test_efficientnet", pretrained=path)


def test_state_dict_of_another_architecture_is_a_clear_error(tmp_path) -> None:
    path = str(tmp_path / "resnet.pt")
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    with pytest.raises(ValueError, match=r"resnet\.pt.*do not fit"):
        TimmEncoder("test_efficientnet", pretrained=path)


def test_state_dict_with_wrong_shapes_is_a_clear_error(tmp_path) -> None:
    path = str(tmp_path / "wide.pt")
    torch.save(timm.create_model("test_efficientnet", features_only=True, in_chans=4).state_dict(), path)
    with pytest.raises(ValueError, match=r"wide\.pt.*do not fit.*conv_stem"):
        TimmEncoder("test_efficientnet", pretrained=path)


@pytest.mark.parametrize(("filename", "message"), [("missing.pt", "not found"), ("weights.npz", "expected a .safetensors")])
def test_bad_weight_paths_are_clear_errors(tmp_path, filename: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TimmEncoder("test_efficientnet", pretrained=str(tmp_path / filename))


def test_corrupt_weight_file_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"junk\.safetensors.*could not be read"):
        TimmEncoder("test_efficientnet", pretrained=str(path))


def test_match_state_dict_drops_head_keys_only() -> None:
    t = torch.zeros(1)
    mapped, missing, unexpected = match_state_dict(
        {"stem.0.weight": t, "stages.0.x": t, "head.fc.weight": t, "stages.0.y": t},
        ["stem_0.weight", "stages_0.x", "stages_1.z"],
    )
    assert sorted(mapped) == ["stages_0.x", "stem_0.weight"]
    assert missing == ["stages_1.z"]
    assert unexpected == ["stages.0.y"]


def test_weights_from_s3(moto_s3, rgb_encoder_file) -> None:
    rgb, path = rgb_encoder_file
    with open(path, "rb") as f:
        moto_s3.client().put_object(Bucket=moto_s3.bucket, Key="weights/enc.safetensors", Body=f.read())
    encoder = TimmEncoder("test_efficientnet", pretrained=moto_s3.uri("weights/enc.safetensors"))
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(_features(encoder, x), _features(rgb, x), strict=True):
        assert torch.equal(a, b)
