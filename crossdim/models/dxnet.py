"""DX-Net: a 3D U-Net whose encoder is a pretrained 2D timm encoder inflated to 3D.

Layout (seed, MODELS.md): full-resolution stem Conv3d 3x3x3 + BN + SiLU -> the 2D encoder
(`TimmEncoder` on `stem_channels` inputs) inflated with `crossdim.models.inflate` (k x k ->
k x k x k, stride s -> (s, s, s), SE squeezing over D, H, W, BatchNorm2d -> BatchNorm3d) ->
decoder of ConvTranspose3d (k2, s2) / concat skip / 2 x (Conv3d + BN + SiLU) blocks, last skip =
stem output -> Conv3d to classes.

The encoder's 3D parameter names are those of the 2D TimmEncoder, so a DX-Net can start from a
trained 2D Omnia-Net: `DXNet.from_2d_encoder(state)` / `encoder_2d_state=` inflate its encoder
(and stem, when present) weights with the pure `inflate_state_dict`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from crossdim.models.blocks import ActName, ConvNormAct, SegmentationHead, UNetDecoder, UpsampleName
from crossdim.models.encoders import TimmEncoder, read_state_dict
from crossdim.models.inflate import InflateMode, inflate, inflate_state_dict
from crossdim.models.omnianet import pad_to_multiple
from crossdim.models.registry import create_model, register_architecture, register_preset

StateDict = Mapping[str, torch.Tensor]
# Weight sources, not architecture: kept out of `.config` (the checkpoint holds the weights).
_WEIGHT_SOURCE_KEYS = ("encoder_2d_state",)


def split_2d_state(state_2d: StateDict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(encoder state with TimmEncoder.model keys, stem state) of a 2D state dict (pure).

    Accepts a whole Omnia-Net state dict (`stem.*`, `encoder.model.*`; decoder/head ignored), a
    TimmEncoder's (`model.*`) or its timm model's own keys. The stem state is empty unless the
    source is an Omnia-Net with a stem.
    """
    for prefix in ("encoder.model.", "model."):
        encoder = {k[len(prefix) :]: v for k, v in state_2d.items() if k.startswith(prefix)}
        if encoder:
            stem = {k[len("stem.") :]: v for k, v in state_2d.items() if k.startswith("stem.")}
            return encoder, stem if prefix == "encoder.model." else {}
    return dict(state_2d), {}


def _few(keys: list[str], n: int = 5) -> str:
    return f"{keys[:n]}{' ...' if len(keys) > n else ''}"


def _load_strict(module: nn.Module, state: StateDict, what: str) -> None:
    missing = sorted(set(module.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(module.state_dict()))
    if missing or unexpected:
        raise ValueError(
            f"encoder_2d_state does not fit the DX-Net {what}: missing keys {_few(missing)}; "
            f"unexpected keys {_few(unexpected)}"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise ValueError(f"encoder_2d_state does not fit the DX-Net {what}: {detail}") from None


@register_architecture("dxnet")
class DXNet(nn.Module):
    """3D segmentation net: (B, in_channels, D, H, W) -> logits (B, num_classes, D, H, W), any D, H, W.

    `encoder_2d_state`: a 2D state dict (or a .safetensors/.pt file with one) to start from, see
    `split_2d_state`; it is inflated with `inflate_mode` and loaded strictly.
    """

    spatial_dims = 3

    def __init__(
        self,
        encoder: str,
        in_channels: int,
        num_classes: int,
        pretrained: bool | str = False,
        stem_channels: int = 16,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        inflate_mode: InflateMode = "repeat",
        act: ActName = "silu",
        upsample: UpsampleName = "transpose",
        drop_path_rate: float = 0.0,
        encoder_2d_state: StateDict | str | None = None,
        encoder_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1 or stem_channels < 0:
            raise ValueError(
                f"dxnet needs in_channels >= 1, num_classes >= 1, stem_channels >= 0; "
                f"got {in_channels}, {num_classes}, {stem_channels}"
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.inflate_mode: InflateMode = inflate_mode
        self.stem = ConvNormAct(3, in_channels, stem_channels, act=act) if stem_channels else nn.Identity()
        encoder_2d = TimmEncoder(
            encoder,
            in_channels=stem_channels or in_channels,
            pretrained=pretrained,
            drop_path_rate=drop_path_rate,
            **(encoder_kwargs or {}),
        )
        self.encoder_channels: list[int] = list(encoder_2d.out_channels)
        self.reductions: list[int] = list(encoder_2d.reductions)
        self.encoder = inflate(encoder_2d.model, inflate_mode)
        self.decoder = UNetDecoder(
            3,
            self.encoder_channels,
            decoder_channels,
            skip_channels=stem_channels,
            upsample=upsample,
            act=act,
            encoder_reductions=self.reductions,
        )
        self.head = SegmentationHead(3, self.decoder.out_channels, num_classes)
        self.size_multiple = max(self.reductions)
        self.has_stem = stem_channels > 0
        if encoder_2d_state is not None:
            self.load_2d_state(encoder_2d_state)

    # `create_model` records its kwargs as `.config`; weight sources are dropped from it so the
    # config stays JSON (config.json) and a rebuilt model takes its weights from the checkpoint.
    @property
    def config(self) -> dict[str, Any]:
        if "_config" not in self.__dict__:
            raise AttributeError("config: this DXNet was not built by crossdim.models.create_model")
        return self.__dict__["_config"]

    @config.setter
    def config(self, value: dict[str, Any]) -> None:
        self.__dict__["_config"] = {k: v for k, v in value.items() if k not in _WEIGHT_SOURCE_KEYS}

    @classmethod
    def from_2d_encoder(cls, state_2d: StateDict | str, **config: Any) -> "DXNet":
        """A DX-Net (built by create_model, so it carries `.config`) started from 2D weights."""
        model = create_model("dxnet", **config)
        if not isinstance(model, cls):
            raise ValueError(f"from_2d_encoder: config builds a {type(model).__name__}, not a DXNet")
        model.load_2d_state(state_2d)
        return model

    def load_2d_state(self, state_2d: StateDict | str) -> None:
        """Inflate a 2D Omnia-Net / TimmEncoder state (see `split_2d_state`) into encoder (+ stem)."""
        source = read_state_dict(state_2d) if isinstance(state_2d, str) else state_2d
        encoder_2d, stem_2d = split_2d_state(source)
        _load_strict(self.encoder, inflate_state_dict(encoder_2d, self.inflate_mode), "encoder")
        if stem_2d and self.has_stem:
            _load_strict(self.stem, inflate_state_dict(stem_2d, self.inflate_mode), "stem")

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"dxnet expects input (B, C, D, H, W) with C={self.in_channels}, got shape {tuple(x.shape)}"
            )

    def forward(self, x_BCDHW: torch.Tensor) -> torch.Tensor:
        self.check_input(x_BCDHW)
        depth, height, width = x_BCDHW.shape[2:]
        x = pad_to_multiple(x_BCDHW, self.size_multiple)
        stem = self.stem(x)
        features = self.encoder(stem)
        y = self.decoder(features, stem if self.has_stem else None)
        return self.head(y)[:, :, :depth, :height, :width]


# Paper configuration (MODELS.md): BraTS, 4 MRI channels in, 3 regions (WT, TC, ET) out, the
# seed's EfficientNet-b0 skip widths (stem output first: 32, 24, 40, 112, 320). `pretrained`
# stays False so the preset builds offline; paper runs pass pretrained=True or a weights file.
register_preset(
    "dxnet_brats",
    arch="dxnet",
    encoder="efficientnet_b0",
    in_channels=4,
    num_classes=3,
    stem_channels=16,
    encoder_kwargs={"first_feature": "stem"},
)
