"""Decoder building blocks, written once for 2D and 3D (`spatial_dims` is a parameter).

Shape legend: `x_BC*` is (batch, channels, *spatial) with 2 or 3 spatial axes.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

NormName = Literal["batch", "instance"]
ActName = Literal["relu", "silu"]
UpsampleName = Literal["nearest", "transpose"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORM = {
    ("batch", 2): nn.BatchNorm2d,
    ("batch", 3): nn.BatchNorm3d,
    ("instance", 2): nn.InstanceNorm2d,
    ("instance", 3): nn.InstanceNorm3d,
}
_ACT = {"relu": nn.ReLU, "silu": nn.SiLU}


def _check_dims(spatial_dims: int) -> int:
    if spatial_dims not in _CONV:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return spatial_dims


def conv_type(spatial_dims: int) -> type[nn.Module]:
    """nn.Conv2d or nn.Conv3d."""
    return _CONV[_check_dims(spatial_dims)]


def conv_transpose_type(spatial_dims: int) -> type[nn.Module]:
    """nn.ConvTranspose2d or nn.ConvTranspose3d."""
    return _CONV_T[_check_dims(spatial_dims)]


def make_norm(norm: str, spatial_dims: int, channels: int) -> nn.Module:
    """BatchNorm or (affine) InstanceNorm for `spatial_dims`."""
    key = (norm, _check_dims(spatial_dims))
    if key not in _NORM:
        raise ValueError(f"norm must be 'batch' or 'instance', got {norm!r}")
    if norm == "instance":
        return _NORM[key](channels, affine=True)
    return _NORM[key](channels)


def make_act(act: str) -> nn.Module:
    """ReLU or SiLU (in place)."""
    if act not in _ACT:
        raise ValueError(f"act must be one of {sorted(_ACT)}, got {act!r}")
    return _ACT[act](inplace=True)


def match_spatial(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Zero-pad or crop the trailing spatial axes of `x` (at their end) to `size`."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if len(size) != x.ndim - 2:
        raise ValueError(f"match_spatial: size {tuple(size)} does not fit tensor of shape {tuple(x.shape)}")
    pads: list[int] = []
    for have, want in zip(reversed(x.shape[2:]), reversed(list(size))):
        pads += [0, int(want) - int(have)]  # negative padding crops
    return F.pad(x, pads)


class ConvNormAct(nn.Sequential):
    """Conv (no bias) -> BatchNorm/InstanceNorm -> ReLU/SiLU, 'same' padding for odd kernels."""

    def __init__(
        self,
        spatial_dims: int,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        norm: NormName = "batch",
        act: ActName = "relu",
    ) -> None:
        conv = conv_type(spatial_dims)(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
        super().__init__(conv, make_norm(norm, spatial_dims, out_ch), make_act(act))


def _upsampler(spatial_dims: int, channels: int, mode: str, scale: int) -> nn.Module:
    if scale == 1:
        return nn.Identity()
    if mode == "nearest":
        return nn.Upsample(scale_factor=scale, mode="nearest")
    if mode == "transpose":
        return conv_transpose_type(spatial_dims)(channels, channels, kernel_size=scale, stride=scale)
    raise ValueError(f"upsample must be 'nearest' or 'transpose', got {mode!r}")


class UpBlock(nn.Module):
    """Upsample x`scale` -> pad/crop to the skip's size -> concat skip -> 2 x ConvNormAct.

    `skip_ch=0` means the block takes no skip (forward(x) only).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_ch: int,
        skip_ch: int,
        out_ch: int,
        upsample: UpsampleName = "nearest",
        act: ActName = "relu",
        norm: NormName = "batch",
        scale: int = 2,
    ) -> None:
        super().__init__()
        self.skip_ch = skip_ch
        self.up = _upsampler(spatial_dims, in_ch, upsample, scale)
        self.conv1 = ConvNormAct(spatial_dims, in_ch + skip_ch, out_ch, norm=norm, act=act)
        self.conv2 = ConvNormAct(spatial_dims, out_ch, out_ch, norm=norm, act=act)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        if (skip is None) != (self.skip_ch == 0):
            raise ValueError(f"UpBlock built with skip_ch={self.skip_ch} got skip={'None' if skip is None else 'a tensor'}")
        if skip is not None:
            x = torch.cat([match_spatial(x, skip.shape[2:]), skip], dim=1)
        return self.conv2(self.conv1(x))


def _level_scale(coarse: int, fine: int) -> int:
    if fine <= 0 or coarse % fine != 0:
        raise ValueError(f"encoder reductions must divide each other, got {fine} then {coarse}")
    return coarse // fine


def decoder_plan(
    encoder_channels: Sequence[int], encoder_reductions: Sequence[int], skip_channels: int = 0
) -> list[tuple[int, int]]:
    """(skip channels, upsample scale) per decoder block, deepest first (pure).

    One block per encoder level transition, then x2 blocks down to reduction 1; the last of
    those takes the full-resolution skip (`skip_channels`, e.g. a stem output) when given.
    """
    if len(encoder_channels) != len(encoder_reductions) or not encoder_channels:
        raise ValueError(
            f"encoder_channels {list(encoder_channels)} and encoder_reductions {list(encoder_reductions)}"
            " must be non-empty and of equal length"
        )
    plan = [
        (encoder_channels[i], _level_scale(encoder_reductions[i + 1], encoder_reductions[i]))
        for i in range(len(encoder_channels) - 2, -1, -1)
    ]
    finest = int(encoder_reductions[0])
    n_extra = int(round(math.log2(finest))) if finest >= 1 else -1
    if finest < 1 or 2**n_extra != finest:
        raise ValueError(f"the finest encoder reduction must be a power of two, got {finest}")
    if skip_channels and n_extra == 0:
        raise ValueError("skip_channels > 0 needs an encoder whose finest reduction is > 1")
    plan += [(skip_channels if k == n_extra - 1 else 0, 2) for k in range(n_extra)]
    return plan


class UNetDecoder(nn.Module):
    """U-Net decoder sized from an encoder's `out_channels` and `reductions`.

    forward(features, skip=None): `features` shallow -> deep (as a TimmEncoder returns them),
    `skip` the full-resolution map of `skip_channels` channels (stem output) or None; returns
    the decoder map at reduction 1 with `decoder_channels[-1]` channels.
    """

    def __init__(
        self,
        spatial_dims: int,
        encoder_channels: Sequence[int],
        decoder_channels: Sequence[int],
        skip_channels: int = 0,
        upsample: UpsampleName = "nearest",
        act: ActName = "relu",
        *,
        encoder_reductions: Sequence[int],
        norm: NormName = "batch",
    ) -> None:
        super().__init__()
        plan = decoder_plan(encoder_channels, encoder_reductions, skip_channels)
        if len(decoder_channels) != len(plan):
            raise ValueError(
                f"decoder_channels has {len(decoder_channels)} entries ({list(decoder_channels)}) but an encoder"
                f" with reductions {list(encoder_reductions)} needs {len(plan)} decoder blocks"
            )
        self.num_levels = len(encoder_channels)
        self.out_channels = int(decoder_channels[-1])
        in_chs = [int(encoder_channels[-1])] + [int(c) for c in decoder_channels[:-1]]
        self.blocks = nn.ModuleList(
            UpBlock(spatial_dims, cin, skip, cout, upsample=upsample, act=act, norm=norm, scale=scale)
            for cin, (skip, scale), cout in zip(in_chs, plan, decoder_channels)
        )

    def forward(self, features: Sequence[torch.Tensor], skip: torch.Tensor | None = None) -> torch.Tensor:
        if len(features) != self.num_levels:
            raise ValueError(f"UNetDecoder expects {self.num_levels} feature maps, got {len(features)}")
        skips: list[torch.Tensor | None] = list(reversed(features[:-1]))
        skips += [None] * (len(self.blocks) - len(skips))
        if skip is not None:
            skips[-1] = skip
        x = features[-1]
        for block, s in zip(self.blocks, skips):
            x = block(x, s)
        return x


class SegmentationHead(nn.Sequential):
    """Final conv (with bias) to `num_classes` logits."""

    def __init__(self, spatial_dims: int, in_ch: int, num_classes: int, kernel_size: int = 3) -> None:
        super().__init__(conv_type(spatial_dims)(in_ch, num_classes, kernel_size, padding=kernel_size // 2))
