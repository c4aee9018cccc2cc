"""One name-keyed registry of architectures and presets, and the factory `create_model`."""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch.nn as nn

_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}
_PRESETS: dict[str, dict[str, Any]] = {}


def register_architecture(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class/function decorator: make `name` buildable through `create_model`."""

    def deco(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is already registered")
        _ARCHITECTURES[name] = builder
        return builder

    return deco


def register_preset(name: str, **config: Any) -> None:
    """A named configuration of a registered architecture (must include `arch`)."""
    if "arch" not in config:
        raise ValueError(f"preset {name!r} must name its 'arch'")
    _PRESETS[name] = config


def list_architectures() -> list[str]:
    _ensure_loaded()
    return sorted(_ARCHITECTURES)


def list_presets() -> list[str]:
    _ensure_loaded()
    return sorted(_PRESETS)


def get_preset(name: str) -> dict[str, Any]:
    _ensure_loaded()
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(_PRESETS))}")
    return copy.deepcopy(_PRESETS[name])


def create_model(arch: str, **kwargs: Any) -> nn.Module:
    """Build a crossdim model.

    `arch` is an architecture (`omnianet`, `dsnet`, `dxnet`) or a preset name
    (`omnianet_b0_camus`, ...). Keyword arguments override the preset's values. The returned
    module carries `.config` (the full kwargs incl. `arch`, enough to rebuild it) and
    `.spatial_dims` (2 or 3).
    """
    _ensure_loaded()
    if arch in _PRESETS:
        cfg = get_preset(arch)
        cfg.update(kwargs)
        arch = cfg.pop("arch")
        kwargs = cfg
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {arch!r}; valid architectures: {', '.join(sorted(_ARCHITECTURES))}"
            f"; presets: {', '.join(sorted(_PRESETS))}"
        )
    for required in ("encoder", "in_channels", "num_classes"):
        if required not in kwargs:
            raise ValueError(f"create_model({arch!r}) needs the keyword argument {required!r}")
    model = _ARCHITECTURES[arch](**kwargs)
    model.config = {"arch": arch, **copy.deepcopy(_jsonable(kwargs))}
    return model


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


def _ensure_loaded() -> None:
    # Importing the architecture modules registers them (and their presets).
    from crossdim.models import dsnet, dxnet, omnianet  # noqa: F401
