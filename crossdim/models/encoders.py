"""timm `features_only` encoders with a fixed contract: `out_channels`, `reductions`, list-of-maps forward.

Weights come from timm (`pretrained=True`), or from a `.safetensors` / torch state-dict file given
as a local path or `s3://` URI (a full classifier's state dict or a features-only one). The RGB
first conv is then adapted to `in_channels` by `adapt_input_channels`.
"""

from __future__ import annotations

import difflib
import io
import os
import pickle
from typing import Any, Literal, Mapping, Sequence

import timm
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

FirstFeature = Literal["timm", "stem"]
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model")


def adapt_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt an RGB conv kernel (O, 3, *k) to (O, in_channels, *k) (pure).

    1 channel: sum over RGB (a grey image then gives the RGB response of its 3-channel copy).
    N channels: RGB repeated cyclically and scaled by 3/N (N stacked copies of an RGB image give
    the RGB response).
    """
    if weight.ndim < 3 or weight.shape[1] != 3:
        raise ValueError(f"adapt_input_channels needs a conv weight (O, 3, *k), got shape {tuple(weight.shape)}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if in_channels == 3:
        return weight.clone()
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    index = torch.arange(in_channels, device=weight.device) % 3
    return weight.index_select(1, index) * (3.0 / in_channels)


def find_first_conv(module: nn.Module) -> tuple[str, nn.Module]:
    """(name, conv) of the input conv of a timm model, via `pretrained_cfg["first_conv"]`.

    features_only wrappers flatten `stem.0` into `stem_0`; both spellings are tried. Without a
    usable cfg entry the first convolution in module order is returned.
    """
    cfg = getattr(module, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv")
    if isinstance(first, (list, tuple)):
        first = first[0] if first else None
    names = dict(module.named_modules())
    if isinstance(first, str):
        for candidate in (first, first.replace(".", "_", 1)):
            if isinstance(names.get(candidate), nn.modules.conv._ConvNd):
                return candidate, names[candidate]
    for name, sub in names.items():
        if isinstance(sub, nn.modules.conv._ConvNd):
            return name, sub
    raise ValueError(f"no convolution found in {type(module).__name__}")


def _check_timm_name(name: str) -> None:
    if timm.is_model(name):
        return
    part = timm.models.get_arch_name(name).split("_")[0]
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    close += [m for m in timm.list_models(f"*{part}*")[:10] if m not in close]
    hint = f"close matches: {', '.join(close[:8])}" if close else "no close matches"
    raise ValueError(f"unknown timm encoder {name!r}; {hint}; list all with timm.list_models('*pattern*')")


def _stem_first_feature(model: nn.Module, name: str) -> None:
    """Make an EfficientNet-family features model return its stem output (bn1, stride 2) as the
    first feature instead of the first block's, as the seed's Omnia-Net does."""
    from timm.models._features import FeatureInfo
    from timm.models.efficientnet import EfficientNetFeatures

    info = model.feature_info
    ok = isinstance(model, EfficientNetFeatures) and model.feature_hooks is None
    if not ok or info.info[0]["reduction"] != 2 or info.info[0]["stage"] == 0:
        raise ValueError(f"first_feature='stem' needs a timm EfficientNet-family encoder with a stride-2 stem, got {name!r}")
    stem = dict(module="bn1", num_chs=model.conv_stem.out_channels, stage=0, reduction=2, index=0)
    model.feature_info = FeatureInfo([stem, *info.info[1:]], info.out_indices)
    model._stage_out_idx = {f["stage"]: f["index"] for f in model.feature_info.get_dicts()}


class TimmEncoder(nn.Module):
    """A timm classification net as a feature encoder: forward(x) -> feature maps, shallow -> deep.

    `out_channels[i]` / `reductions[i]` are the channels / stride of the i-th map. `first_feature`
    = "stem" takes an EfficientNet's stem output (seed layout: b0 32, 24, 40, 112, 320) instead of
    its first block's (timm layout: 16, 24, ...).
    """

    def __init__(
        self,
        name: str,
        in_channels: int = 3,
        pretrained: bool | str = False,
        out_indices: Sequence[int] | None = None,
        drop_path_rate: float = 0.0,
        first_feature: FirstFeature = "timm",
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        _check_timm_name(name)
        if first_feature not in ("timm", "stem"):
            raise ValueError(f"first_feature must be 'timm' or 'stem', got {first_feature!r}")
        if drop_path_rate:
            timm_kwargs["drop_path_rate"] = drop_path_rate
        if out_indices is not None:
            timm_kwargs["out_indices"] = tuple(out_indices)
        self.name = name
        self.in_channels = in_channels
        self.model = timm.create_model(name, features_only=True, pretrained=pretrained is True, in_chans=3, **timm_kwargs)
        if first_feature == "stem":
            _stem_first_feature(self.model, name)
        if isinstance(pretrained, str):
            load_encoder_weights(self.model, read_state_dict(pretrained), pretrained)
        if in_channels != 3:
            set_input_channels(self.model, in_channels)
        self.out_channels: list[int] = list(self.model.feature_info.channels())
        self.reductions: list[int] = list(self.model.feature_info.reduction())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model(x)


def set_input_channels(model: nn.Module, in_channels: int) -> None:
    """Adapt the first conv of `model` from RGB to `in_channels` in place (weights via adapt_input_channels)."""
    name, conv = find_first_conv(model)
    if conv.groups != 1:
        raise ValueError(f"cannot adapt grouped first conv {name!r} to {in_channels} input channels")
    conv.weight = nn.Parameter(adapt_input_channels(conv.weight.detach(), in_channels))
    conv.in_channels = in_channels


def read_state_dict(source: str) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` or torch state-dict file (local path or s3:// URI)."""
    from crossdim import storage

    suffix = os.path.splitext(source.split("?")[0])[1].lower()
    if suffix != ".safetensors" and suffix not in _TORCH_SUFFIXES:
        raise ValueError(f"pretrained weights {source!r}: expected a .safetensors or {'/'.join(_TORCH_SUFFIXES)} file")
    if storage.is_local(source) and not os.path.isfile(source):
        raise ValueError(f"pretrained weights file not found: {source!r}")
    data = storage.read_bytes(source)
    try:
        if suffix == ".safetensors":
            return load_safetensors(data)
        return _unwrap(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), source)
    except (RuntimeError, OSError, SafetensorError, pickle.UnpicklingError) as exc:
        raise ValueError(f"pretrained weights {source!r} could not be read: {str(exc).splitlines()[0]}") from None


def _unwrap(obj: Any, source: str) -> dict[str, torch.Tensor]:
    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"pretrained weights {source!r}: not a state dict of tensors")
    return dict(obj)


def match_state_dict(
    source: Mapping[str, torch.Tensor], target_keys: Sequence[str]
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Map a classifier's or features-only state dict onto a features model's keys (pure).

    Returns (mapped, missing target keys, unexpected source keys). Source keys of modules the
    features model does not have at all (the classifier head, stages cut by out_indices) are
    dropped silently; other unmatched keys are unexpected.
    """
    targets = set(target_keys)
    roots = {k.split(".")[0] for k in targets}
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in source.items():
        flat = key.replace(".", "_", 1)  # timm flattens nn.Sequential children: stem.0 -> stem_0
        name = key if key in targets else flat if flat in targets else None
        if name is not None:
            mapped[name] = value
        elif key.split(".")[0] in roots or flat.split(".")[0] in roots:
            unexpected.append(key)
    missing = sorted(targets - set(mapped))
    return mapped, missing, unexpected


def _short_list(keys: Sequence[str], n: int = 6) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_encoder_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Strictly load `state_dict` (classifier or features-only) into a timm features model."""
    mapped, missing, unexpected = match_state_dict(state_dict, list(model.state_dict()))
    if missing or unexpected:
        raise ValueError(
            f"pretrained weights {source!r} do not fit {type(model).__name__}: "
            f"missing keys [{_short_list(missing)}]; unexpected keys [{_short_list(unexpected)}]"
        )
    try:
        model.load_state_dict(mapped, strict=True)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise ValueError(f"pretrained weights {source!r} do not fit: {detail}") from None
