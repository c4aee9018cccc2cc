"""2D -> 3D inflation: pure weight functions and the torch.fx converter (all in eval mode)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from crossdim.models.inflate import (
    Conv3dSame,
    InflationError,
    center_index,
    inflate,
    inflate_state_dict,
    inflate_weight,
)

# (D, H, W): H != W != D so that a swapped axis shows; D >= the largest reduction (32).
DHW = (32, 48, 40)

# One or two members of every family get the exact `center`-mode check; the larger members a
# conversion + shape check (efficientnet_b0 is covered by tests/test_dxnet.py's preset).
FAMILIES = [
    "test_efficientnet",
    "tf_efficientnet_b0",
    "test_resnet",
    "resnet18",
    "test_convnext",
    "convnext_atto",
    "regnety_002",
    "mobilenetv3_large_100",
]
HEAVY = ["efficientnet_b1", "efficientnet_b4", "resnet50", "resnext50_32x4d", "convnext_tiny"]


def _features_only(name: str) -> nn.Module:
    return timm.create_model(name, features_only=True, pretrained=False).eval()


@torch.no_grad()
def _randomize(model: nn.Module) -> nn.Module:
    """Non-trivial norms (running stats, affine) and layer scales, so equality checks mean something."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0.0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
            module.weight.uniform_(0.5, 1.5)
            module.bias.normal_(0.0, 0.2)
    for name, param in model.named_parameters():
        if name.endswith("gamma"):  # ConvNeXt layer scale starts at 1e-6
            param.uniform_(0.5, 1.5)
    return model


def _depth_constant(x_bchw: torch.Tensor, depth: int) -> torch.Tensor:
    return x_bchw.unsqueeze(2).expand(-1, -1, depth, -1, -1).contiguous()


def _assert_slices_equal(f3_bcdhw: torch.Tensor, f2_bchw: torch.Tensor, rel: float = 1e-4) -> None:
    assert f3_bcdhw.ndim == 5 and f3_bcdhw.shape[:2] == f2_bchw.shape[:2]
    assert f3_bcdhw.shape[3:] == f2_bchw.shape[2:]
    scale = max(1.0, f2_bchw.abs().max().item())
    expected = f2_bchw.unsqueeze(2).expand_as(f3_bcdhw)
    torch.testing.assert_close(f3_bcdhw, expected, atol=rel * scale, rtol=rel)


# ---- pure weight functions ---------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 7])
def test_inflate_weight_repeat_sums_to_the_2d_kernel(depth: int) -> None:
    w2d = torch.randn(6, 4, 3, 5)
    w3d = inflate_weight(w2d, depth, "repeat")
    assert w3d.shape == (6, 4, depth, 3, 5)
    torch.testing.assert_close(w3d.sum(dim=2), w2d)
    for d in range(depth):  # every slice is the same kernel / depth
        torch.testing.assert_close(w3d[:, :, d], w2d / depth)


@pytest.mark.parametrize("depth, centre", [(1, 0), (3, 1), (5, 2), (2, 0), (4, 1)])
def test_inflate_weight_center_puts_the_kernel_in_one_slice(depth: int, centre: int) -> None:
    w2d = torch.randn(5, 3, 3, 3)
    w3d = inflate_weight(w2d, depth, "center")
    assert center_index(depth) == centre
    assert torch.equal(w3d[:, :, centre], w2d)
    others = [d for d in range(depth) if d != centre]
    assert torch.count_nonzero(w3d[:, :, others]) == 0


@pytest.mark.parametrize(
    "w2d, depth, mode, match",
    [
        (torch.randn(4, 3, 3), 3, "repeat", "4D conv weight"),
        (torch.randn(4, 3, 3, 3, 3), 3, "repeat", "4D conv weight"),
        (torch.randn(4, 3, 3, 3), 0, "repeat", "depth must be a positive int"),
        (torch.randn(4, 3, 3, 3), 2.0, "center", "depth must be a positive int"),
        (torch.randn(4, 3, 3, 3), 3, "mean", "mode must be one of"),
    ],
)
def test_inflate_weight_rejects_what_it_does_not_handle(w2d, depth, mode, match) -> None:
    with pytest.raises(ValueError, match=match):
        inflate_weight(w2d, depth, mode)


def test_inflate_state_dict_inflates_kernels_and_clones_the_rest() -> None:
    state = {"conv.weight": torch.randn(8, 4, 3, 3), "pw.weight": torch.randn(8, 8, 1, 1), "bn.bias": torch.randn(8)}
    out = inflate_state_dict(state, "center")
    assert out["conv.weight"].shape == (8, 4, 3, 3, 3)
    assert out["pw.weight"].shape == (8, 8, 1, 1, 1)
    assert torch.equal(out["bn.bias"], state["bn.bias"])
    assert out["bn.bias"].data_ptr() != state["bn.bias"].data_ptr()
    assert inflate_state_dict(state, "repeat", depth=5)["conv.weight"].shape == (8, 4, 5, 3, 3)
    assert inflate_state_dict(state, "repeat", depth=5)["pw.weight"].shape == (8, 8, 1, 1, 1)
    with pytest.raises(ValueError, match="'bad'"):
        inflate_state_dict({"bad": 3}, "repeat")  # type: ignore[dict-item]


# ---- center mode: depth-constant input reproduces the 2D features exactly ------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_center_mode_reproduces_2d_features_on_depth_constant_input(name: str) -> None:
    model_2d = _randomize(_features_only(name))
    model_3d = inflate(model_2d, "center")
    x2 = torch.randn(2, 3, *DHW[1:])
    with torch.no_grad():
        f2, f3 = model_2d(x2), model_3d(_depth_constant(x2, DHW[0]))
    assert isinstance(f3, list) and len(f3) == len(f2)
    for reduction, a, b in zip(model_2d.feature_info.reduction(), f2, f3):
        assert b.shape[2] == DHW[0] // reduction  # isotropic stride: depth reduced like H and W
        _assert_slices_equal(b, a)


@pytest.mark.parametrize("name", HEAVY)
def test_heavy_encoders_convert_with_declared_channels_and_isotropic_reductions(name: str) -> None:
    model_2d = _features_only(name)
    model_3d = inflate(model_2d, "repeat")
    with torch.no_grad():
        feats = model_3d(torch.randn(1, 3, 32, 32, 32))
    info = model_2d.feature_info
    assert [f.shape[1] for f in feats] == info.channels()
    assert [tuple(f.shape[2:]) for f in feats] == [(32 // r,) * 3 for r in info.reduction()]
    assert all(torch.isfinite(f).all() for f in feats)


@pytest.mark.parametrize("name", ["test_efficientnet", "test_convnext"])
def test_full_classifiers_inflate_with_their_pooling_heads(name: str) -> None:
    model_2d = _randomize(timm.create_model(name, pretrained=False, num_classes=5)).eval()
    model_3d = inflate(model_2d, "center")
    x2 = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        logits_2d, logits_3d = model_2d(x2), model_3d(_depth_constant(x2, DHW[0]))
    assert logits_3d.shape == (2, 5)
    torch.testing.assert_close(logits_3d, logits_2d, atol=1e-4, rtol=1e-4)


# ---- repeat mode ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["test_efficientnet", "tf_efficientnet_b0", "test_convnext", "test_resnet"])
def test_repeat_mode_kernels_sum_over_depth_to_the_2d_kernels(name: str) -> None:
    model_2d = _features_only(name)
    model_3d = inflate(model_2d, "repeat")
    convs_2d = {n: m for n, m in model_2d.named_modules() if isinstance(m, nn.Conv2d)}
    convs_3d = {n: m for n, m in model_3d.named_modules() if isinstance(m, nn.Conv3d)}
    assert convs_3d.keys() == convs_2d.keys() and convs_3d
    for key, conv_2d in convs_2d.items():
        w3d = convs_3d[key].weight
        assert w3d.shape[2] == conv_2d.kernel_size[0]  # isotropic k x k x k
        torch.testing.assert_close(w3d.sum(dim=2), conv_2d.weight, atol=1e-6, rtol=1e-5)
    if name.startswith("tf_"):
        assert any(isinstance(m, Conv3dSame) for m in convs_3d.values())


# margin = output slices whose depth receptive field reaches the zero padding: resnet18's stem is
# one 7x7x7 conv (pad 3, stride 2) -> 2; test_resnet's deep stem adds two 3x3x3 convs -> 3.
@pytest.mark.parametrize("name, margin", [("test_resnet", 3), ("resnet18", 2)])
def test_repeat_mode_interior_slices_match_2d_on_a_shallow_stage(name: str, margin: int) -> None:
    model_2d = _randomize(_features_only(name))
    model_3d = inflate(model_2d, "repeat")
    x2 = torch.randn(1, 3, *DHW[1:])
    with torch.no_grad():
        f2 = model_2d(x2)[0]
        f3 = model_3d(_depth_constant(x2, DHW[0]))[0]
    interior = f3[:, :, margin:-margin]
    _assert_slices_equal(interior, f2)
    # the zero-padded border slices do differ: the check above is not vacuous
    assert (f3[:, :, 0] - f2).abs().max() > 1e-3


def test_depth_override_one_gives_slice_wise_2d_convolution() -> None:
    model_2d = _randomize(_features_only("test_resnet"))
    model_3d = inflate(model_2d, "center", depth=1)  # every kernel 1 x k x k, depth stride kept
    x3 = torch.randn(1, 3, 32, 32, 24)  # not depth-constant
    with torch.no_grad():
        f3 = model_3d(x3)[0]  # first feature map: stride 2
        for d in range(f3.shape[2]):
            torch.testing.assert_close(f3[:, :, d], model_2d(x3[:, :, 2 * d])[0], atol=1e-4, rtol=1e-4)


# ---- functional ops and module kinds outside the timm families -----------------------------------


class _OpsNet(nn.Module):
    """Exercises the op rewrites: pad, channels-last permute + Linear, reshape of a parameter,
    chunk/cat/slicing on channels, interpolate, functional pools, and a flatten head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=2, dilation=2, padding_mode="reflect")
        self.dw = nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten(1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.pad(self.conv(x), (1, 1, 1, 1), mode="replicate")
        x = F.max_pool2d(self.dw(x), 3, stride=1, padding=1)
        y = self.fc(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        y = y * self.scale.reshape(1, -1, 1, 1) + x.mean((2, 3), keepdim=True)
        a, b = y.chunk(2, dim=1)
        y = torch.cat([b, a[:, :2], a[:, 2:]], dim=1)
        up = F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False)
        pooled = F.adaptive_avg_pool2d(up, 1)
        return [up, pooled, self.head(self.flat(self.pool(y)))]


def test_functional_ops_are_rewritten_to_their_3d_equivalents() -> None:
    model_2d = _OpsNet().eval()
    model_3d = inflate(model_2d, "center")
    x2 = torch.randn(2, 3, 20, 16)
    with torch.no_grad():
        up2, pooled2, logits2 = model_2d(x2)
        up3, pooled3, logits3 = model_3d(_depth_constant(x2, 12))
    # D: 12 + 2 (replicate pad) -> 7 (dw stride 2) -> 14 (upsample); on a depth-constant input
    # every op keeps depth constant, so every slice equals the 2D result
    assert up3.shape == (2, 8, 14, 22, 18)
    _assert_slices_equal(up3, up2)
    _assert_slices_equal(pooled3, pooled2)
    torch.testing.assert_close(logits3, logits2, atol=1e-5, rtol=1e-4)


class _Rolls(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(x, 1, dims=2)


class _Reshapes(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)


@pytest.mark.parametrize(
    "block, match",
    [
        (_Rolls(), r"cannot inflate call_function torch\.roll at blocks\.0"),
        (_Reshapes(), r"cannot inflate call_function builtins\.getattr at blocks\.0: reads the shape"),
        # a Conv2d subclass with other semantics is not silently converted as a plain conv
        (timm.layers.StdConv2d(3, 4, 3), r"cannot inflate call_method reshape_as at blocks\.0"),
        (nn.PixelShuffle(2), r"cannot inflate call_module PixelShuffle at blocks\.0"),
        (nn.Conv1d(3, 4, 3), r"cannot inflate call_module Conv1d at blocks\.0"),
    ],
)
def test_unsupported_ops_raise_inflation_error_naming_op_and_path(block: nn.Module, match: str) -> None:
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, 3, 1))
    model.add_module("blocks", nn.Sequential(block))
    with pytest.raises(InflationError, match=match) as err:
        inflate(model)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        inflate(nn.Conv2d(1, 1, 3), mode="stretch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="depth must be a positive int"):
        inflate(nn.Conv2d(1, 1, 3), depth=0)
    with pytest.raises(ValueError, match="must be a torch.nn.Module"):
        inflate(torch.zeros(1))  # type: ignore[arg-type]


# ---- ownership, names and the pure path ------------------------------------------------------------


def test_inflated_module_shares_no_storage_with_the_source() -> None:
    model_2d = _features_only("test_convnext")  # has pass-through Linear/LayerNorm params too
    model_3d = inflate(model_2d, "repeat")
    ptrs_2d = {t.untyped_storage().data_ptr() for t in model_2d.state_dict().values()}
    ptrs_3d = {t.untyped_storage().data_ptr() for t in model_3d.state_dict().values()}
    assert ptrs_2d.isdisjoint(ptrs_3d)
    before = {k: v.clone() for k, v in model_2d.state_dict().items()}
    with torch.no_grad():
        for p in model_3d.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in model_2d.state_dict().items())


@pytest.mark.parametrize("mode", ["repeat", "center"])
def test_pure_state_dict_inflation_matches_the_module_converter(mode: str) -> None:
    model_2d = _randomize(_features_only("test_convnext"))
    model_3d = inflate(model_2d, mode)
    state_3d = model_3d.state_dict()
    pure = inflate_state_dict(model_2d.state_dict(), mode)
    assert pure.keys() == state_3d.keys() == model_2d.state_dict().keys()
    for key, value in state_3d.items():
        assert torch.equal(pure[key], value), key
    # ...so a fresh (random) inflation loads the pure weights strictly: names are deterministic
    fresh = inflate(_features_only("test_convnext"), mode)
    fresh.load_state_dict(pure, strict=True)
    x = torch.randn(1, 3, *DHW)
    with torch.no_grad():
        for a, b in zip(fresh(x), model_3d(x)):
            torch.testing.assert_close(a, b)


def test_train_mode_and_backward_work_on_the_graph_module() -> None:
    model_3d = inflate(timm.create_model("test_efficientnet", features_only=True, drop_path_rate=0.2), "repeat")
    assert model_3d.training
    feats = model_3d(torch.randn(2, 3, 16, 32, 32))
    sum(f.mean() for f in feats).backward()
    grads = [p.grad for p in model_3d.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
