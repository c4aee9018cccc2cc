"""Every architecture over the tiny encoders; Omnia-Net / DS-Net specifics; presets; checkpoints."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from crossdim.models import create_model, list_architectures, list_presets, load_model, save_model
from crossdim.models.blocks import UNetDecoder, decoder_plan, match_spatial
from crossdim.models.dsnet import MIN_DEPTH, depth_path, depth_plan
from crossdim.models.encoders import adapt_input_channels

ENCODERS = ["test_efficientnet", "test_resnet", "test_convnext"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tiny convs gain nothing from 2 intra-op threads; on a shared 2-core machine the
    second thread's spin-waiting made them ~5x slower (measured). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
_MODELS: dict[tuple[str, str, int], torch.nn.Module] = {}


def _model(arch: str, encoder: str, in_channels: int, num_classes: int = 3) -> torch.nn.Module:
    key = (arch, encoder, in_channels)
    if key not in _MODELS:
        _MODELS[key] = create_model(arch, encoder=encoder, in_channels=in_channels, num_classes=num_classes)
    return _MODELS[key]


def _spatial(model: torch.nn.Module, batch: int) -> tuple[int, ...]:
    # odd, small sizes (2D nets pad them to 32 x 32); 3D depth 19 or 21
    return (27, 21) if model.spatial_dims == 2 else (18 + batch, 21, 15)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("in_channels", [1, 4])
@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("arch", list_architectures())
def test_every_architecture_forward_backward(arch: str, encoder: str, in_channels: int, batch: int) -> None:
    # batch 3 in train mode; a single image in eval mode (BatchNorm cannot train on the one value
    # per channel that a 32 x 32 input leaves at stride 32)
    model = _model(arch, encoder, in_channels).train(batch > 1)
    spatial = _spatial(model, batch)
    x = torch.randn(batch, in_channels, *spatial)
    logits = model(x)
    assert logits.shape == (batch, 3, *spatial)
    model.zero_grad(set_to_none=True)
    (logits.float() ** 2).mean().backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in params if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    assert all(torch.isfinite(p.grad).all() for _, p in params)
    assert model.config["arch"] == arch and model.config["encoder"] == encoder


# ---- Omnia-Net ----


def test_omnianet_pads_any_size_and_crops_back() -> None:
    model = create_model("omnianet", encoder="test_convnext", in_channels=2, num_classes=4).eval()
    assert model.size_multiple == 32 and model.spatial_dims == 2
    x = torch.randn(1, 2, 33, 70)
    with torch.no_grad():
        y = model(x)
        y_padded = model(torch.nn.functional.pad(x, (0, 26, 0, 31)))  # the same image at 64 x 96
    assert y.shape == (1, 4, 33, 70)
    torch.testing.assert_close(y, y_padded[:, :, :33, :70])


def test_omnianet_encoder_first_conv_is_adapted_to_the_stem_not_reinitialised(tmp_path) -> None:
    source = timm.create_model("test_efficientnet", num_classes=10)
    path = str(tmp_path / "in1k.safetensors")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    model = create_model("omnianet", encoder="test_efficientnet", in_channels=1, num_classes=2, pretrained=path)
    expected = adapt_input_channels(source.conv_stem.weight.detach(), 16)
    assert model.encoder.model.conv_stem.weight.shape == (expected.shape[0], 16, 3, 3)
    torch.testing.assert_close(model.encoder.model.conv_stem.weight.detach(), expected, rtol=0, atol=0)
    source_state = source.state_dict()
    for key, value in model.encoder.model.state_dict().items():
        if key != "conv_stem.weight":
            assert torch.equal(value, source_state[key]), key


def test_omnianet_without_stem_feeds_the_pretrained_stem_directly() -> None:
    model = create_model("omnianet", encoder="test_convnext", in_channels=3, num_classes=2, stem_channels=0)
    assert isinstance(model.stem, torch.nn.Identity)
    assert model.encoder.model.stem_0.in_channels == 3
    assert [b.skip_ch for b in model.decoder.blocks] == [48, 32, 24, 0, 0]
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 40, 24)).shape == (2, 2, 40, 24)


def test_decoder_plan_follows_encoder_levels() -> None:
    # 5 levels at 2..32 with a stem: 4 level blocks + 1 to full resolution taking the stem
    assert decoder_plan([16, 24, 32, 48, 64], [2, 4, 8, 16, 32], 16) == [(48, 2), (32, 2), (24, 2), (16, 2), (16, 2)]
    # ConvNeXt 4 levels at 4..32: 3 level blocks + 2 blocks to full resolution
    assert decoder_plan([24, 32, 48, 64], [4, 8, 16, 32], 16) == [(48, 2), (32, 2), (24, 2), (0, 2), (16, 2)]
    assert decoder_plan([8, 8], [1, 1], 0) == [(8, 1)]
    with pytest.raises(ValueError, match="power of two"):
        decoder_plan([8, 8], [3, 6])


def test_decoder_channels_must_fit_the_encoder() -> None:
    with pytest.raises(ValueError, match=r"decoder_channels has 4 entries .* needs 5 decoder blocks"):
        create_model("omnianet", encoder="test_efficientnet", in_channels=1, num_classes=2, decoder_channels=[64, 32, 16, 8])
    with pytest.raises(ValueError, match="needs 4 decoder blocks"):
        UNetDecoder(3, [8, 16, 32], [16, 8], encoder_reductions=[4, 8, 16])


def test_3d_decoder_restores_odd_sizes() -> None:
    decoder = UNetDecoder(3, [4, 8], [6, 4], skip_channels=2, upsample="transpose", act="silu", encoder_reductions=[2, 4])
    feats = [torch.randn(2, 4, 5, 6, 7), torch.randn(2, 8, 3, 3, 4)]
    # each upsampled map is padded/cropped to its skip: (6, 6, 8) -> (5, 6, 7), (10, 12, 14) -> (9, 11, 13)
    assert decoder(feats, torch.randn(2, 2, 9, 11, 13)).shape == (2, 4, 9, 11, 13)
    with pytest.raises(ValueError, match="skip_ch=2 got skip=None"):
        decoder(feats)
    cropped = match_spatial(torch.ones(1, 1, 4, 4), (3, 6))
    assert cropped.shape == (1, 1, 3, 6) and cropped.sum() == 12  # 3 rows kept, 2 zero columns added


# ---- DS-Net ----


def test_dsnet_depth_path_reproduces_the_seed_at_128() -> None:
    assert depth_path(128) == [128, 43, 22, 11, 3]
    assert [(s.stride, s.pad_lo, s.pad_hi) for s in depth_plan(128)] == [(3, 1, 1), (2, 1, 1), (2, 1, 1), (4, 1, 1)]


def test_dsnet_depth_path_always_ends_at_three_slices() -> None:
    for depth in range(MIN_DEPTH, 400):
        path = depth_path(depth)
        assert path[-1] == 3 and all(a >= b for a, b in zip(path, path[1:])), (depth, path)
    with pytest.raises(ValueError, match="depth >= 16, got 15"):
        depth_path(15)


def test_dsnet_any_depth_and_batch() -> None:
    model = create_model("dsnet", encoder="test_efficientnet", in_channels=1, num_classes=3).eval()
    assert model.spatial_dims == 3
    with torch.no_grad():
        for depth in (32, 48, 96, 128):
            assert model(torch.randn(3, 1, depth, 24, 16)).shape == (3, 3, depth, 24, 16)
    with pytest.raises(ValueError, match=r"depth >= 16, got shape \(1, 1, 15, 32, 32\)"):
        model(torch.randn(1, 1, 15, 32, 32))


def test_dsnet_batch_items_are_independent() -> None:
    model = create_model("dsnet", encoder="test_resnet", in_channels=2, num_classes=3).eval()
    x = torch.randn(3, 2, 20, 16, 16)
    with torch.no_grad():
        together = model(x)
        alone = model(x[1:2])
    torch.testing.assert_close(together[1:2], alone, rtol=1e-4, atol=1e-5)


# ---- presets ----

# Parameter counts with pretrained=False. Encoder = timm classifier minus its head, plus the
# first conv widened from 3 to 16 input channels: b0 5,288,548 - 1,693,160 (conv_head, bn2,
# classifier) + 32*13*9 = 3,599,132; b4 19,341,616 - 2,599,400 + 48*13*9 = 16,747,832. The rest
# is stem + decoder + head (b0: 2,246,836). The tolerance (0.1%) is below any change of layout
# (one 3x3 conv of the last decoder block alone is 2,304 parameters = 0.04% ... any block width
# change moves the count by far more), but admits timm bumping a BN buffer.
PRESET_PARAMS = {
    "omnianet_b0_camus": 5_845_968,
    "omnianet_b4_chaos": 19_427_965,
    "dsnet_brats": 7_673_706,
}
PRESET_ENCODER_PARAMS = {"omnianet_b0_camus": 3_599_132, "omnianet_b4_chaos": 16_747_832}


@pytest.mark.parametrize("preset", sorted(PRESET_PARAMS))
def test_preset_parameter_counts(preset: str) -> None:
    model = create_model(preset, pretrained=False)
    count = sum(p.numel() for p in model.parameters())
    print(f"{preset}: {count:,} parameters")
    assert count == pytest.approx(PRESET_PARAMS[preset], rel=0.001)
    if preset in PRESET_ENCODER_PARAMS:
        assert sum(p.numel() for p in model.encoder.parameters()) == PRESET_ENCODER_PARAMS[preset]


def test_preset_widths_follow_the_seed() -> None:
    assert set(PRESET_PARAMS) <= set(list_presets())
    b0 = create_model("omnianet_b0_camus")
    assert b0.encoder.out_channels == [32, 24, 40, 112, 320]
    assert (b0.in_channels, b0.num_classes, b0.encoder.model.conv_stem.in_channels) == (1, 4, 16)
    assert [b.conv2[0].out_channels for b in b0.decoder.blocks] == [256, 128, 64, 32, 16]
    assert max(m.drop_prob for m in b0.modules() if hasattr(m, "drop_prob")) > 0.3  # drop_path 0.4 schedule
    b4 = create_model("omnianet_b4_chaos")
    assert b4.encoder.out_channels == [48, 32, 56, 160, 448] and b4.num_classes == 5
    ds = create_model("dsnet_brats")
    assert (ds.in_channels, ds.num_classes) == (4, 3)
    assert ds.net2d.encoder.out_channels == [32, 24, 40, 112, 320]
    assert [d.conv.out_channels for d in ds.down] == [32, 48, 96, 4]


def test_preset_overrides() -> None:
    model = create_model("dsnet_brats", encoder="test_efficientnet")
    assert model.config["encoder"] == "test_efficientnet" and model.config["in_channels"] == 4
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 4, 16, 24, 24)).shape == (1, 3, 16, 24, 24)


# ---- checkpoints ----


@pytest.mark.parametrize("arch", list_architectures())
def test_checkpoint_round_trip(tmp_path, arch: str) -> None:
    model = _model(arch, "test_efficientnet", 1).train()
    shape = (2, 1, 32, 40) if model.spatial_dims == 2 else (2, 1, 20, 24, 24)
    with torch.no_grad():
        model(torch.randn(*shape) * 3 + 1)  # move BN running statistics off their defaults
    model.eval()
    directory = save_model(model, str(tmp_path / "ckpt"), extra={"epoch": 3})
    assert sorted(os.listdir(directory)) == ["checksums.json", "config.json", "model.safetensors"]
    weights = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    checksums = json.loads((tmp_path / "ckpt" / "checksums.json").read_text())
    assert checksums == {"model.safetensors": hashlib.sha256(weights).hexdigest()}
    document = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert document["model"]["arch"] == arch and document["extra"] == {"epoch": 3}
    assert document["crossdim_version"]
    assert set(load_file(os.path.join(directory, "model.safetensors"))) == set(model.state_dict())
    loaded = load_model(directory)
    assert not loaded.training and type(loaded) is type(model)
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_checkpoint_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"no crossdim model checkpoint at .*empty.*config\.json is missing"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="built by crossdim.models.create_model"):
        save_model(torch.nn.Linear(2, 2), str(tmp_path / "linear"))
    model = _model("omnianet", "test_efficientnet", 1)
    directory = save_model(model, str(tmp_path / "ckpt"))
    config_path = tmp_path / "ckpt" / "config.json"
    document = json.loads(config_path.read_text())
    document["model"]["num_classes"] = 7
    config_path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"model\.safetensors: weights do not fit"):
        load_model(directory)
    os.remove(os.path.join(directory, "model.safetensors"))
    with pytest.raises(ValueError, match="model.safetensors is missing"):
        load_model(directory)


# ---- bad input ----


@pytest.mark.parametrize(
    ("arch", "shape", "expected"),
    [
        ("omnianet", (2, 1, 32), r"omnianet expects input \(B, C, H, W\) with C=2, got shape \(2, 1, 32\)"),
        ("omnianet", (2, 3, 32, 32), r"with C=2, got shape \(2, 3, 32, 32\)"),
        ("dsnet", (2, 2, 32, 32), r"dsnet expects input \(B, C, D, H, W\) with C=2, got shape \(2, 2, 32, 32\)"),
        ("dsnet", (1, 1, 16, 8, 8), r"with C=2, got shape \(1, 1, 16, 8, 8\)"),
    ],
)
def test_bad_input_shapes(arch: str, shape: tuple[int, ...], expected: str) -> None:
    model = _model(arch, "test_efficientnet", 2)
    with pytest.raises(ValueError, match=expected):
        model(torch.randn(*shape))


def test_unknown_names_list_the_options() -> None:
    with pytest.raises(ValueError, match=r"unknown architecture 'unet'; valid architectures: .*dsnet.*omnianet"):
        create_model("unet", encoder="test_efficientnet", in_channels=1, num_classes=2)
    with pytest.raises(ValueError, match=r"unknown timm encoder 'resnet_18'.*resnet18"):
        create_model("omnianet", encoder="resnet_18", in_channels=1, num_classes=2)


def test_checkpoint_round_trip_through_s3(moto_s3) -> None:
    model = _model("omnianet", "test_efficientnet", 1).eval()
    uri = save_model(model, moto_s3.uri("runs/1/model"), extra={"note": "s3"})
    assert moto_s3.keys("runs/1/model") == ["runs/1/model/checksums.json", "runs/1/model/config.json",
                                            "runs/1/model/model.safetensors"]
    loaded = load_model(uri)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match=r"no crossdim model checkpoint at 's3://.*/runs/2'"):
        load_model(moto_s3.uri("runs/2"))


def test_pull_verifies_the_weights_against_the_checksum_written_at_save(moto_s3, tmp_path, monkeypatch) -> None:
    from crossdim.infer.pull import ChecksumError, pull

    monkeypatch.setenv("CROSSDIM_CACHE_DIR", str(tmp_path / "cache"))
    model = _model("omnianet", "test_efficientnet", 1).eval()
    uri = save_model(model, moto_s3.uri("runs/1/model"))
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_model(str(pull(uri).directory))(x), model(x))  # intact: verified and cached
    weights = moto_s3.client().get_object(Bucket=moto_s3.bucket, Key="runs/1/model/model.safetensors")["Body"].read()
    corrupt = weights[:-8] + bytes(8)  # same size, still a loadable safetensors file
    moto_s3.client().put_object(Bucket=moto_s3.bucket, Key="runs/2/model/model.safetensors", Body=corrupt)
    for name in ("config.json", "checksums.json"):
        body = moto_s3.client().get_object(Bucket=moto_s3.bucket, Key=f"runs/1/model/{name}")["Body"].read()
        moto_s3.client().put_object(Bucket=moto_s3.bucket, Key=f"runs/2/model/{name}", Body=body)
    with pytest.raises(ChecksumError, match=r"model\.safetensors: sha256 .* does not match the recorded"):
        pull(moto_s3.uri("runs/2/model"))
    local = save_model(model, str(tmp_path / "local"))
    (tmp_path / "local" / "model.safetensors").write_bytes(corrupt)
    with pytest.raises(ChecksumError, match="model.safetensors"):
        pull(local)
