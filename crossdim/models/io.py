"""Model checkpoints: a directory (local path or s3:// URI) holding `config.json` + `model.safetensors`.

`config.json` = {"format": "crossdim-model", "format_version": 1, "crossdim_version": ...,
"model": <model.config, the create_model kwargs incl. arch>, "extra": {...}}. No pickles: the
model is rebuilt with `create_model(**model)` (pretrained=False) and its weights loaded strictly.
`checksums.json` records the sha256 of the weights as written, so a copy pulled from the registry
or object storage can be verified against what training produced (crossdim.infer.pull).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from crossdim import storage

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKSUMS_FILE = "checksums.json"
FORMAT = "crossdim-model"
FORMAT_VERSION = 1


def _version() -> str:
    from crossdim import __version__

    return __version__


def model_config_document(model: nn.Module, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json content for `model` (built by create_model, so it carries `.config`)."""
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or "arch" not in config:
        raise ValueError(f"save_model needs a model built by crossdim.models.create_model; {type(model).__name__} has no .config")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "crossdim_version": _version(),
        "model": config,
        "extra": dict(extra or {}),
    }


def state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies of every tensor (copies also break shared storage) (pure)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def save_model(model: nn.Module, directory: str, extra: dict[str, Any] | None = None) -> str:
    """Write `model.safetensors`, `checksums.json` and `config.json` into `directory` (local or
    s3://); return it."""
    document = model_config_document(model, extra)
    try:
        text = json.dumps(document, indent=2, sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"save_model: model config or extra is not JSON-serialisable ({exc})") from None
    if storage.is_local(directory):
        storage.makedirs(directory)
    weights = save_safetensors(state_dict_for_saving(model))
    storage.write_bytes(storage.join(directory, WEIGHTS_FILE), weights)
    checksums = {WEIGHTS_FILE: hashlib.sha256(weights).hexdigest()}
    storage.write_text(storage.join(directory, CHECKSUMS_FILE), json.dumps(checksums, indent=2, sort_keys=True))
    storage.write_text(storage.join(directory, CONFIG_FILE), text)  # last: a complete directory has it
    return directory


def read_model_config(directory_or_uri: str) -> dict[str, Any]:
    """The parsed config.json of a checkpoint directory (clear error when missing or malformed)."""
    uri = storage.join(directory_or_uri, CONFIG_FILE)
    if not storage.exists(uri):
        raise ValueError(f"no crossdim model checkpoint at {directory_or_uri!r}: {CONFIG_FILE} is missing")
    try:
        document = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{uri}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT or not isinstance(document.get("model"), dict):
        raise ValueError(f"{uri}: not a crossdim model config (needs format={FORMAT!r} and a 'model' object)")
    if document.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{uri}: format_version {document['format_version']} is newer than this crossdim supports")
    return document


def build_from_config(model_config: dict[str, Any]) -> nn.Module:
    """Rebuild an (untrained) model from a checkpoint's `model` config; never fetches weights."""
    from crossdim.models.registry import create_model

    cfg = dict(model_config)
    arch = cfg.pop("arch")
    cfg["pretrained"] = False
    return create_model(arch, **cfg)


def load_model(directory_or_uri: str, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by `save_model` and load its weights strictly; returned in eval mode."""
    document = read_model_config(directory_or_uri)
    weights_uri = storage.join(directory_or_uri, WEIGHTS_FILE)
    if not storage.exists(weights_uri):
        raise ValueError(f"no crossdim model checkpoint at {directory_or_uri!r}: {WEIGHTS_FILE} is missing")
    model = build_from_config(document["model"])
    try:
        state = load_safetensors(storage.read_bytes(weights_uri))
        model.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, SafetensorError) as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[:3])
        raise ValueError(f"{weights_uri}: weights do not fit the model in {CONFIG_FILE} ({detail[:400]})") from None
    return model.to(map_location).eval()
