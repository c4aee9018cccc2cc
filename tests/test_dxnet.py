"""DX-Net: shapes at any size, the BraTS preset, starting from 2D weights, checkpoint round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from crossdim.models import create_model
from crossdim.models.dxnet import DXNet, split_2d_state
from crossdim.models.encoders import TimmEncoder
from crossdim.models.inflate import inflate_state_dict
from crossdim.models.io import load_model, save_model
from tests.test_inflate import _assert_slices_equal, _depth_constant, _randomize

TINY = dict(encoder="test_efficientnet", in_channels=1, num_classes=2, decoder_channels=(32, 16, 16, 8, 8))


def test_forward_backward_at_odd_sizes() -> None:
    model = create_model("dxnet", **TINY).train()
    assert model.spatial_dims == 3 and model.reductions == [2, 4, 8, 16, 32]
    x = torch.randn(2, 1, 21, 29, 35)
    logits = model(x)
    assert logits.shape == (2, 2, 21, 29, 35)
    logits.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, no_grad[:5]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("shape", [(2, 1, 21, 29), (2, 3, 21, 29, 35), (1, 1, 2, 21, 29, 35)])
def test_wrong_rank_or_channels_is_a_one_line_value_error(shape: tuple[int, ...]) -> None:
    model = create_model("dxnet", **TINY).eval()
    with pytest.raises(ValueError, match=r"expects input \(B, C, D, H, W\) with C=1, got shape") as err:
        model(torch.zeros(shape))
    assert str(tuple(shape)) in str(err.value)


def test_preset_dxnet_brats_has_the_seed_widths() -> None:
    model = create_model("dxnet_brats").eval()
    assert model.config["encoder"] == "efficientnet_b0" and model.config["in_channels"] == 4
    assert model.encoder_channels == [32, 24, 40, 112, 320]
    assert model.reductions == [2, 4, 8, 16, 32]
    assert [b.conv2[0].out_channels for b in model.decoder.blocks] == [256, 128, 64, 32, 16]
    assert all(isinstance(b.up, (nn.ConvTranspose3d, nn.Identity)) for b in model.decoder.blocks)
    assert isinstance(model.stem[2], nn.SiLU) and model.stem[0].weight.shape == (16, 4, 3, 3, 3)
    assert model.head[0].out_channels == 3
    kinds = {type(m) for m in model.modules()}
    assert not kinds & {nn.Conv2d, nn.BatchNorm2d}  # everything inflated
    assert model.encoder.get_submodule("conv_stem").weight.shape == (32, 16, 3, 3, 3)
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        features = model.encoder(model.stem(x))
        logits = model(x)
    assert [f.shape[1] for f in features] == model.encoder_channels
    assert [f.shape[2] for f in features] == [32 // r for r in model.reductions]
    assert logits.shape == (1, 3, 32, 32, 32)


def test_from_2d_encoder_in_center_mode_reproduces_the_2d_features() -> None:
    encoder_2d = _randomize(TimmEncoder("test_efficientnet", in_channels=16)).eval()  # "trained"
    model = DXNet.from_2d_encoder(encoder_2d.state_dict(), inflate_mode="center", **TINY).eval()
    x2 = torch.randn(2, 16, 48, 40)
    with torch.no_grad():
        f2 = encoder_2d(x2)
        f3 = model.encoder(_depth_constant(x2, 32))
    assert len(f3) == len(f2) == 5
    for a, b in zip(f2, f3):
        _assert_slices_equal(b, a)


def test_from_omnianet_state_inflates_the_stem_too() -> None:
    omnia = _randomize(create_model("omnianet", **TINY)).eval()
    model = DXNet.from_2d_encoder(omnia.state_dict(), inflate_mode="center", act="relu", **TINY).eval()
    x2 = torch.randn(1, 1, 32, 48)
    with torch.no_grad():
        f2 = omnia.encoder(omnia.stem(x2))
        f3 = model.encoder(model.stem(_depth_constant(x2, 32)))
    for a, b in zip(f2, f3):
        _assert_slices_equal(b, a)


def test_split_2d_state_accepts_the_three_key_layouts() -> None:
    w = torch.zeros(1)
    omnia = {"stem.0.weight": w, "encoder.model.conv_stem.weight": w, "decoder.blocks.0.x": w}
    assert split_2d_state(omnia) == ({"conv_stem.weight": w}, {"0.weight": w})
    assert split_2d_state({"model.conv_stem.weight": w}) == ({"conv_stem.weight": w}, {})
    assert split_2d_state({"conv_stem.weight": w}) == ({"conv_stem.weight": w}, {})


def test_a_2d_state_of_another_encoder_is_rejected_by_name() -> None:
    other = TimmEncoder("test_resnet", in_channels=16).state_dict()
    with pytest.raises(ValueError, match=r"encoder_2d_state does not fit the DX-Net encoder: missing keys \['blocks"):
        DXNet.from_2d_encoder(other, **TINY)


def test_checkpoint_round_trip_from_a_2d_weights_file(tmp_path: Path) -> None:
    encoder_2d = _randomize(TimmEncoder("test_efficientnet", in_channels=16))
    weights = tmp_path / "encoder_2d.safetensors"
    save_file({k: v.contiguous() for k, v in encoder_2d.state_dict().items()}, str(weights))
    model = create_model("dxnet", encoder_2d_state=str(weights), **TINY).eval()
    expected = inflate_state_dict(encoder_2d.model.state_dict(), "repeat")
    assert expected.keys() == model.encoder.state_dict().keys()
    assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in expected.items())

    directory = save_model(model, str(tmp_path / "ckpt"))
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())["model"]
    assert config["arch"] == "dxnet" and "encoder_2d_state" not in config
    loaded = load_model(directory)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(1, 1, 19, 33, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
