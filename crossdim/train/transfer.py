"""Cross-dimensional transfer as configuration (`init.pretrained`), usable without Ray.

`init.pretrained` is one of:
- False: random initialisation;
- True: timm's pretrained weights for the encoder (passed to `create_model(pretrained=True)`);
- a weights file / URI (`.safetensors`, `.pt`, `.pth`, `.bin`): encoder weights, passed to
  `create_model(pretrained=<file>)` (the model builders load them strictly);
- a crossdim checkpoint: a directory (local or s3://) with config.json + model.safetensors,
  `runs:/<id>/model` or `models:/name@alias` (an MLflow pyfunc logged by crossdim.tracking).
  A DX-Net target gets the source's 2D encoder (+ stem) inflated with `init.inflate_mode`
  (`inflate_into_dxnet`: DX-Net's `split_2d_state` + the pure `inflate_state_dict`); other
  targets take its stem and encoder weights by name (`transfer_state`):
  * same shape -> copied (a 2D model into a 2D model, a DS-Net's inner Omnia-Net: keys under
    `net2d.` take the source's keys without that prefix where shapes allow);
  * a 2D conv kernel (O, I, kh, kw) into a 3D one (O, I, d, kh, kw) -> inflated with
    `crossdim.models.inflate.inflate_weight(w, d, init.inflate_mode)` (DX-Net from Omnia-Net);
  * anything else (decoder, head, shapes that do not fit) is left as initialised and listed.
  Nothing transferred at all is an error.

The 2D -> 3D workflow: train Omnia-Net on slices (configs with `model.arch: omnianet`), then a
DX-Net config with `init.pretrained: <that run's checkpoint dir or runs:/<id>/model>`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Iterator, Literal, Mapping

import torch
import torch.nn as nn

from crossdim.config import InitConfig

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
REGISTRY_SCHEMES = ("runs:/", "models:/")
TRANSFER_PREFIXES = ("stem.", "encoder.")  # parts of a source model that are transferred
NESTED_PREFIXES = ("net2d.",)  # a target's sub-network that holds a whole 2D model (DS-Net)

log = logging.getLogger(__name__)

SourceKind = Literal["none", "timm", "weights", "checkpoint"]


@dataclass
class TransferReport:
    source: str
    copied: list[str] = field(default_factory=list)
    inflated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # target keys under a transfer prefix left as they were

    @property
    def transferred(self) -> int:
        """Weights moved (BatchNorm step counters do not count)."""
        return sum(not k.endswith("num_batches_tracked") for k in self.copied + self.inflated)


def source_kind(pretrained: bool | str) -> SourceKind:
    if pretrained is False or pretrained == "":
        return "none"
    if pretrained is True:
        return "timm"
    ref = str(pretrained)
    if ref.split("?")[0].lower().endswith(WEIGHT_SUFFIXES):
        return "weights"
    return "checkpoint"


def model_pretrained_arg(init: InitConfig) -> bool | str:
    """What `create_model(pretrained=...)` gets: timm weights or a weights file; else False."""
    kind = source_kind(init.pretrained)
    return init.pretrained if kind in ("timm", "weights") else False


def check_source(init: InitConfig, tracking_uri: str | None = None) -> None:
    """Pre-flight: the source exists (one-line ValueError otherwise); downloads nothing big."""
    from crossdim import storage

    kind, ref = source_kind(init.pretrained), str(init.pretrained)
    if kind in ("none", "timm"):
        return
    if ref.startswith(REGISTRY_SCHEMES):
        _check_registry_ref(ref, tracking_uri)
        return
    probe = ref if kind == "weights" else storage.join(ref, "config.json")
    if not storage.exists(probe):
        what = "weights file" if kind == "weights" else "crossdim checkpoint (no config.json)"
        raise ValueError(f"init.pretrained: {ref} is not a {what}")


def _check_registry_ref(ref: str, tracking_uri: str | None) -> None:
    from crossdim.infer.registry import resolve

    with _env("MLFLOW_TRACKING_URI", tracking_uri):
        try:
            resolve(ref)
        except ValueError as exc:
            raise ValueError(f"init.pretrained: {exc}") from None


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """Set an environment variable for a block (no-op for None), then restore it."""
    saved = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


# ----------------------------------------------------------------------------- loading a source
def find_checkpoint_dir(root: str) -> str:
    """The directory holding config.json + model.safetensors at or below `root` (a local dir)."""
    for path, _dirs, files in sorted(os.walk(root)):
        if "config.json" in files and "model.safetensors" in files:
            return path
    raise ValueError(f"init.pretrained: no crossdim checkpoint (config.json + model.safetensors) under {root}")


def load_source_model(ref: str, tracking_uri: str | None = None) -> nn.Module:
    """The 2D (or any crossdim) model a transfer starts from."""
    from crossdim.models import load_model

    if not ref.startswith(REGISTRY_SCHEMES):
        return load_model(ref)
    import mlflow.artifacts

    from crossdim.tracking import using_tracking_uri

    # MLflow 3 resolves runs:/<id>/model (a logged model) through the global tracking URI
    with tempfile.TemporaryDirectory(prefix="crossdim-init-") as tmp, \
            using_tracking_uri(tracking_uri):
        root = mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=tmp, tracking_uri=tracking_uri)
        return load_model(find_checkpoint_dir(root))


# ----------------------------------------------------------------------------- pure weight transfer
def source_key(target_key: str, source: Mapping[str, torch.Tensor]) -> str | None:
    """The source key a target key takes its value from, if any (pure)."""
    candidates = [target_key] + [target_key[len(p):] for p in NESTED_PREFIXES if target_key.startswith(p)]
    for key in candidates:
        if key.startswith(TRANSFER_PREFIXES) and key in source:
            return key
    return None


def fit_tensor(src: torch.Tensor, dst: torch.Tensor, mode: str) -> tuple[torch.Tensor | None, str]:
    """`src` reshaped for `dst`: ("copied" | "inflated" | "skipped") (pure)."""
    from crossdim.models.inflate import inflate_weight

    if src.shape == dst.shape:
        return src.to(dst.dtype).clone(), "copied"
    if src.ndim == 4 and dst.ndim == 5 and tuple(src.shape) == tuple(dst.shape[:2]) + tuple(dst.shape[3:]):
        return inflate_weight(src, int(dst.shape[2]), mode).to(dst.dtype), "inflated"  # type: ignore[arg-type]
    return None, "skipped"


def transfer_state(target: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor], mode: str = "repeat",
                   name: str = "") -> tuple[dict[str, torch.Tensor], TransferReport]:
    """A new target state dict with the source's stem/encoder tensors copied or inflated (pure)."""
    out = {k: v for k, v in target.items()}
    report = TransferReport(source=name)
    for key, dst in target.items():
        skey = source_key(key, source)
        if skey is None:
            if key.split(".", 1)[0] in {p.rstrip(".") for p in TRANSFER_PREFIXES}:
                report.skipped.append(key)
            continue
        value, how = fit_tensor(source[skey], dst, mode)
        if value is None:
            report.skipped.append(key)
            continue
        out[key] = value
        getattr(report, how).append(key)
    return out, report


def transfer_weights(model: nn.Module, source: nn.Module, mode: str = "repeat", name: str = "") -> TransferReport:
    """Load the transferable part of `source` into `model` in place."""
    state, report = transfer_state(model.state_dict(), source.state_dict(), mode, name)
    if report.transferred == 0:
        raise ValueError(f"init.pretrained: no stem/encoder weight of {name or 'the source'} fits "
                         f"{type(model).__name__} (different encoder?)")
    model.load_state_dict(state, strict=True)
    if report.skipped:
        log.warning("init.pretrained %s: %d stem/encoder tensors did not fit and keep their initial values "
                    "(first: %s)", name, len(report.skipped), ", ".join(report.skipped[:3]))
    return report


def inflate_into_dxnet(model: nn.Module, source: Mapping[str, torch.Tensor], mode: str,
                       name: str = "") -> TransferReport:
    """A DX-Net's encoder (+ stem) from a 2D Omnia-Net state: DX-Net's own key split, then
    `inflate_state_dict(..., mode)` (pure), loaded strictly."""
    from crossdim.models.dxnet import split_2d_state
    from crossdim.models.inflate import inflate_state_dict

    encoder_2d, stem_2d = split_2d_state(source)
    report = TransferReport(source=name)
    parts = [("encoder", model.encoder, encoder_2d)]
    if stem_2d and getattr(model, "has_stem", False):
        parts.append(("stem", model.stem, stem_2d))
    for prefix, module, state in parts:
        inflated = inflate_state_dict(state, mode)  # type: ignore[arg-type]
        try:
            module.load_state_dict(inflated, strict=True)
        except RuntimeError as exc:
            detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
            raise ValueError(f"init.pretrained {name}: its 2D {prefix} does not fit this DX-Net ({detail[:300]})") from None
        for key, value in state.items():
            (report.inflated if value.ndim == 4 else report.copied).append(f"{prefix}.{key}")
    return report


def initialize_model(model: nn.Module, init: InitConfig, tracking_uri: str | None = None) -> TransferReport | None:
    """Apply a crossdim-checkpoint source to a freshly built model (other kinds act in create_model).

    DX-Net targets inflate the source's encoder and stem (`inflate_into_dxnet`); every other
    target takes what fits by name (`transfer_weights`).
    """
    if source_kind(init.pretrained) != "checkpoint":
        return None
    ref = str(init.pretrained)
    source = load_source_model(ref, tracking_uri)
    if getattr(source, "spatial_dims", 2) == 2 and hasattr(model, "load_2d_state"):
        report = inflate_into_dxnet(model, source.state_dict(), init.inflate_mode, ref)
    else:
        report = transfer_weights(model, source, init.inflate_mode, ref)
    log.info("init.pretrained %s: %d tensors copied, %d inflated", ref, len(report.copied), len(report.inflated))
    return report
