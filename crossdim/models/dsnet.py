"""DS-Net (Dimensionally-Stacked Network): 3D encoder -> 2D Omnia-Net on depth slices -> 3D decoder.

A random-init 3D encoder (InstanceNorm, SiLU) squeezes the depth axis only, stage by stage, to
exactly `slices` (3) planes; its `in_channels` output channels become batch entries and the 3
planes the RGB channels of a pretrained 2D Omnia-Net; a 3D decoder of depth-strided transposed
convs restores every encoder depth exactly, with skips from the 3D encoder.

Depth rule (`depth_plan`): stage targets are ceil(d / s) for the seed's strides (3, 2, 2, 4),
floored at `slices`, the last stage reaching `slices` exactly; each stage's depth stride and
(asymmetric) depth padding for a kernel of 3 are solved per input, preferring the seed's stride.
D=128 gives the seed's path 128 -> 43 -> 22 -> 11 -> 3 with strides 3, 2, 2, 4 (padding 1).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from crossdim.models.blocks import ActName, ConvNormAct, NormName, SegmentationHead, make_act, make_norm, match_spatial
from crossdim.models.omnianet import OmniaNet
from crossdim.models.registry import register_architecture, register_preset

SEED_DEPTH_STRIDES = (3, 2, 2, 4)
MIN_DEPTH = 16
_KERNEL = 3
_PADDINGS = ((1, 1), (0, 0), (1, 0), (0, 1), (2, 0), (0, 2), (2, 1), (1, 2), (2, 2))


class DepthStage(NamedTuple):
    """One depth-squeezing conv: depth_in -> depth_out with kernel 3, `stride`, pads (lo, hi)."""

    depth_in: int
    depth_out: int
    stride: int
    pad_lo: int
    pad_hi: int


def _conv_out(depth: int, stride: int, pad_lo: int, pad_hi: int) -> int:
    padded = depth + pad_lo + pad_hi
    return (padded - _KERNEL) // stride + 1 if padded >= _KERNEL else 0


def depth_conv_params(depth_in: int, depth_out: int, preferred_stride: int) -> DepthStage:
    """Stride and depth padding of a kernel-3 conv mapping depth_in -> depth_out (pure).

    Paddings from least to most (symmetric 1 first); per padding the preferred stride first,
    then 1..depth_in.
    """
    for pad_lo, pad_hi in _PADDINGS:
        for stride in (preferred_stride, *range(1, depth_in + 1)):
            if _conv_out(depth_in, stride, pad_lo, pad_hi) == depth_out:
                return DepthStage(depth_in, depth_out, stride, pad_lo, pad_hi)
    raise ValueError(f"no kernel-3 depth conv maps depth {depth_in} to {depth_out}")


def depth_plan(depth: int, slices: int = 3, strides: Sequence[int] = SEED_DEPTH_STRIDES) -> list[DepthStage]:
    """The encoder's depth stages for an input of `depth` planes, ending at exactly `slices` (pure)."""
    if depth < max(MIN_DEPTH, slices):
        raise ValueError(f"dsnet needs an input depth >= {max(MIN_DEPTH, slices)}, got {depth}")
    stages: list[DepthStage] = []
    current = depth
    for i, stride in enumerate(strides):
        last = i == len(strides) - 1
        target = slices if last else max(slices, math.ceil(current / stride))
        stages.append(depth_conv_params(current, target, stride))
        current = target
    return stages


def depth_path(depth: int, slices: int = 3) -> list[int]:
    """Depth sizes along the encoder, e.g. [128, 43, 22, 11, 3] (pure)."""
    plan = depth_plan(depth, slices)
    return [plan[0].depth_in] + [s.depth_out for s in plan]


class DepthDown(nn.Module):
    """Kernel-3 Conv3d striding along depth only (per-input stride/padding) -> norm -> act."""

    def __init__(self, in_ch: int, out_ch: int, norm: NormName, act: ActName | None) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, _KERNEL, padding=(0, 1, 1), bias=False)
        self.norm = make_norm(norm, 3, out_ch)
        self.act = make_act(act) if act else nn.Identity()

    def forward(self, x_BCDHW: torch.Tensor, stage: DepthStage) -> torch.Tensor:
        x = F.pad(x_BCDHW, (0, 0, 0, 0, stage.pad_lo, stage.pad_hi))
        x = F.conv3d(x, self.conv.weight, None, stride=(stage.stride, 1, 1), padding=(0, 1, 1))
        return self.act(self.norm(x))


class DepthUp(nn.Module):
    """Transposed kernel-3 Conv3d along depth inverting a DepthStage's geometry -> norm -> act."""

    def __init__(self, in_ch: int, out_ch: int, norm: NormName, act: ActName) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose3d(in_ch, out_ch, _KERNEL, padding=(0, 1, 1), bias=False)
        self.norm = make_norm(norm, 3, out_ch)
        self.act = make_act(act)

    def forward(self, x_BCDHW: torch.Tensor, stage: DepthStage) -> torch.Tensor:
        y = F.conv_transpose3d(x_BCDHW, self.conv.weight, None, stride=(stage.stride, 1, 1), padding=(0, 1, 1))
        y = y[:, :, stage.pad_lo :]
        y = match_spatial(y, (stage.depth_in, *y.shape[3:]))
        return self.act(self.norm(y))


@register_architecture("dsnet")
class DSNet(nn.Module):
    """3D segmentation net: (B, in_channels, D, H, W) -> logits (B, num_classes, D, H, W), D >= 16."""

    spatial_dims = 3

    def __init__(
        self,
        encoder: str,
        in_channels: int,
        num_classes: int,
        pretrained: bool | str = False,
        encoder_3d_channels: Sequence[int] = (16, 32, 48, 96),
        slices: int = 3,
        norm: NormName = "instance",
        act: ActName = "silu",
        omnianet_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        chs = [int(c) for c in encoder_3d_channels]
        if len(chs) != len(SEED_DEPTH_STRIDES):
            raise ValueError(f"encoder_3d_channels needs {len(SEED_DEPTH_STRIDES)} entries, got {chs}")
        if in_channels < 1 or num_classes < 1 or slices < 1:
            raise ValueError(f"dsnet needs in_channels, num_classes, slices >= 1; got {in_channels}, {num_classes}, {slices}")
        self.in_channels, self.num_classes, self.slices = in_channels, num_classes, slices
        self.stem = ConvNormAct(3, in_channels, chs[0], norm=norm, act=act)
        outs = [*chs[1:], in_channels]
        self.down = nn.ModuleList(
            DepthDown(cin, cout, norm, act if i < len(outs) - 1 else None)
            for i, (cin, cout) in enumerate(zip(chs, outs))
        )
        net2d_kwargs = {"stem_channels": 0, "upsample": "transpose", **(omnianet_kwargs or {})}
        self.net2d = OmniaNet(encoder, in_channels=slices, num_classes=slices, pretrained=pretrained, **net2d_kwargs)
        ups_in = [in_channels, *chs[:0:-1]]  # in_channels, 96, 48, 32
        self.up = nn.ModuleList(DepthUp(cin, cout, norm, act) for cin, cout in zip(ups_in, reversed(chs)))
        self.fuse = nn.ModuleList(ConvNormAct(3, 2 * c, c, norm=norm, act=act) for c in reversed(chs))
        self.head = SegmentationHead(3, chs[0], num_classes)

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"dsnet expects input (B, C, D, H, W) with C={self.in_channels}, got shape {tuple(x.shape)}")
        if x.shape[2] < max(MIN_DEPTH, self.slices):
            raise ValueError(f"dsnet needs an input depth >= {max(MIN_DEPTH, self.slices)}, got shape {tuple(x.shape)}")

    def forward(self, x_BCDHW: torch.Tensor) -> torch.Tensor:
        self.check_input(x_BCDHW)
        plan = depth_plan(x_BCDHW.shape[2], self.slices)
        skips = [self.stem(x_BCDHW)]
        for down, stage in zip(self.down, plan):
            skips.append(down(skips[-1], stage))
        h_BCSHW = skips.pop()
        b, c, s, height, width = h_BCSHW.shape
        y = self.net2d(h_BCSHW.reshape(b * c, s, height, width)).reshape(b, c, s, height, width)
        for up, fuse, stage, skip in zip(self.up, self.fuse, reversed(plan), reversed(skips)):
            y = fuse(torch.cat([up(y, stage), skip], dim=1))
        return self.head(y)


# Paper configuration (MODELS.md): the 2D net's encoder uses the seed's Omnia-Net skip layout (stem
# output first). `pretrained` stays False so the preset builds offline; paper runs pass True.
register_preset(
    "dsnet_brats",
    arch="dsnet",
    encoder="efficientnet_b0",
    in_channels=4,
    num_classes=3,
    omnianet_kwargs={"encoder_kwargs": {"first_feature": "stem"}},
)
