"""Omnia-Net: any pretrained timm 2D classification net as the encoder of a U-Net (2D).

Layout (seed, MODELS.md): full-resolution stem Conv3x3 + BN + ReLU -> timm encoder on the stem
output (its RGB first conv adapted to the stem's channels, not re-initialised) -> decoder of
x2-upsample / concat-skip / 2 x ConvNormAct blocks, last skip = stem output -> Conv3x3 to classes.
`stem_channels=0` drops the stem: the input goes straight into the pretrained encoder.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from crossdim.models.blocks import ActName, ConvNormAct, SegmentationHead, UNetDecoder, UpsampleName
from crossdim.models.encoders import TimmEncoder
from crossdim.models.registry import register_architecture, register_preset


def pad_to_multiple(x_BCHW: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the spatial axes at their end up to a multiple of `multiple` (pure)."""
    pads: list[int] = []
    for size in reversed(x_BCHW.shape[2:]):
        pads += [0, (-int(size)) % multiple]
    return F.pad(x_BCHW, pads) if any(pads) else x_BCHW


@register_architecture("omnianet")
class OmniaNet(nn.Module):
    """2D segmentation net: (B, in_channels, H, W) -> logits (B, num_classes, H, W), any H, W."""

    spatial_dims = 2

    def __init__(
        self,
        encoder: str,
        in_channels: int,
        num_classes: int,
        pretrained: bool | str = False,
        stem_channels: int = 16,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        drop_path_rate: float = 0.0,
        upsample: UpsampleName = "nearest",
        act: ActName = "relu",
        encoder_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1 or stem_channels < 0:
            raise ValueError(
                f"omnianet needs in_channels >= 1, num_classes >= 1, stem_channels >= 0; "
                f"got {in_channels}, {num_classes}, {stem_channels}"
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.stem = ConvNormAct(2, in_channels, stem_channels, act=act) if stem_channels else nn.Identity()
        self.encoder = TimmEncoder(
            encoder,
            in_channels=stem_channels or in_channels,
            pretrained=pretrained,
            drop_path_rate=drop_path_rate,
            **(encoder_kwargs or {}),
        )
        self.decoder = UNetDecoder(
            2,
            self.encoder.out_channels,
            decoder_channels,
            skip_channels=stem_channels,
            upsample=upsample,
            act=act,
            encoder_reductions=self.encoder.reductions,
        )
        self.head = SegmentationHead(2, self.decoder.out_channels, num_classes)
        self.size_multiple = max(self.encoder.reductions)
        self.has_stem = stem_channels > 0

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"omnianet expects input (B, C, H, W) with C={self.in_channels}, got shape {tuple(x.shape)}"
            )

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        self.check_input(x_BCHW)
        height, width = x_BCHW.shape[2:]
        x = pad_to_multiple(x_BCHW, self.size_multiple)
        stem = self.stem(x)
        features = self.encoder(stem)
        y = self.decoder(features, stem if self.has_stem else None)
        return self.head(y)[:, :, :height, :width]


# Paper configurations (MODELS.md). `first_feature="stem"` reproduces the seed's skip widths
# (b0: 32, 24, 40, 112, 320; b4: 48, 32, 56, 160, 448). Presets leave `pretrained` at False so
# they build offline; paper runs pass pretrained=True (timm's ImageNet weights) or a weights file.
register_preset(
    "omnianet_b0_camus",
    arch="omnianet",
    encoder="efficientnet_b0",
    in_channels=1,
    num_classes=4,
    stem_channels=16,
    drop_path_rate=0.4,
    encoder_kwargs={"first_feature": "stem"},
)
register_preset(
    "omnianet_b4_chaos",
    arch="omnianet",
    encoder="efficientnet_b4",
    in_channels=1,
    num_classes=5,
    stem_channels=16,
    drop_path_rate=0.4,
    encoder_kwargs={"first_feature": "stem"},
)
