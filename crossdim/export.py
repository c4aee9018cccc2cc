"""`crossdim export`: a model from the registry (or a checkpoint dir) as TorchScript or ONNX.

    result = export("models:/camus@champion", "onnx", "camus.onnx")   # patch from the model card
    result.max_abs_diff                                                # checked against eager PyTorch

The exported graph takes one window: `(batch, C, *patch)` with the batch dynamic and the spatial
size fixed to the training patch (what sliding-window inference feeds) or `--patch`. After
writing, the file is loaded back (torch.jit.load / onnxruntime) and run on a seeded random input
of two windows; its output must equal the eager model's within `tolerance` (default 1e-4 relative
to the output's scale), else `ExportParityError`. ONNX uses torch's dynamo exporter (needs
onnx + onnxscript; onnxruntime for the check); `onnx_exporter="torchscript"` selects the legacy
tracer-based exporter.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn as nn

Format = Literal["torchscript", "onnx"]
FORMATS: tuple[str, ...] = ("torchscript", "onnx")
CHECK_BATCH = 2


class ExportParityError(ValueError):
    """The exported model's output differs from the eager model's beyond the tolerance."""


@dataclass
class ExportResult:
    path: str
    format: str
    input_shape: list[int]
    max_abs_diff: float
    tolerance: float


# ----------------------------------------------------------------------------- inputs
def example_shape(in_channels: int, patch: Sequence[int], batch: int = 1) -> tuple[int, ...]:
    if len(patch) not in (2, 3) or min(patch) < 1:
        raise ValueError(f"--patch {list(patch)}: needs 2 or 3 positive sizes")
    return (batch, int(in_channels), *[int(p) for p in patch])


def example_input(shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator)


def resolve_patch(card_patch: Sequence[int] | None, patch: Sequence[int] | None, model_dims: int | None) -> list[int]:
    """The window to export: `patch` if given, else the model card's training window (pure)."""
    chosen = list(patch) if patch else list(card_patch or [])
    if not chosen:
        raise ValueError("--patch: the model records no training window (no dataset.json); give --patch, "
                         "e.g. --patch 128 128 128")
    if model_dims is not None and len(chosen) != model_dims:
        raise ValueError(f"--patch {chosen}: the model is {model_dims}D and needs {model_dims} sizes")
    return chosen


def tolerance_for(reference: np.ndarray, relative: float) -> float:
    """Absolute tolerance scaled by the output's magnitude (pure)."""
    return float(relative * max(1.0, float(np.abs(reference).max())))


# ----------------------------------------------------------------------------- writers and runners
def export_torchscript(model: nn.Module, example: torch.Tensor, path: str) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
    torch.jit.save(traced, path)


def run_torchscript(path: str, x: torch.Tensor) -> np.ndarray:
    module = torch.jit.load(path, map_location="cpu").eval()
    with torch.no_grad():
        return module(x).numpy()


def export_onnx(model: nn.Module, example: torch.Tensor, path: str, exporter: str = "dynamo") -> None:
    _require("onnx", "onnxscript")
    kwargs: dict = {"input_names": ["image"], "output_names": ["logits"], "verbose": False}
    if exporter == "dynamo":
        kwargs.update(dynamo=True, external_data=False,  # one self-contained file (models < 2 GB)
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    elif exporter == "torchscript":
        kwargs.update(dynamo=False, dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    else:
        raise ValueError(f"onnx exporter {exporter!r}: use 'dynamo' or 'torchscript'")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), path, **kwargs)


def run_onnx(path: str, x: torch.Tensor) -> np.ndarray:
    _require("onnxruntime")
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"ONNX export needs {', '.join(missing)}: pip install 'crossdim[export]'")


# ----------------------------------------------------------------------------- the command
def export_module(model: nn.Module, fmt: str, output: str, shape: Sequence[int], *, relative_tolerance: float = 1e-4,
                  onnx_exporter: str = "dynamo") -> ExportResult:
    """Export an eager model (CPU, eval) to `output` (local or s3://) and check parity."""
    from crossdim.infer.writers import write_file

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    model = model.to("cpu").eval()
    example = example_input(shape)
    check = example_input((CHECK_BATCH, *shape[1:]), seed=1)
    with torch.no_grad():
        reference = model(check).numpy()
    with tempfile.TemporaryDirectory(prefix="crossdim-export-") as scratch:
        local = os.path.join(scratch, "model.pt" if fmt == "torchscript" else "model.onnx")
        if fmt == "torchscript":
            export_torchscript(model, example, local)
            exported = run_torchscript(local, check)
        else:
            export_onnx(model, example, local, onnx_exporter)
            exported = run_onnx(local, check)
        result = parity(reference, exported, output, fmt, shape, relative_tolerance)
        with open(local, "rb") as f:
            write_file(output, f.read())
    return result


def parity(reference: np.ndarray, exported: np.ndarray, output: str, fmt: str, shape: Sequence[int],
           relative_tolerance: float) -> ExportResult:
    if exported.shape != reference.shape:
        raise ExportParityError(f"{output}: exported output shape {exported.shape} != eager {reference.shape}")
    diff = float(np.abs(exported - reference).max())
    tolerance = tolerance_for(reference, relative_tolerance)
    if not diff <= tolerance:
        raise ExportParityError(f"{output}: {fmt} output differs from eager PyTorch by {diff:.3g} "
                                f"(tolerance {tolerance:.3g})")
    return ExportResult(path=output, format=fmt, input_shape=list(shape), max_abs_diff=diff, tolerance=tolerance)


def export(model_uri: str, fmt: str, output: str, patch: Sequence[int] | None = None, *,
           relative_tolerance: float = 1e-4, onnx_exporter: str = "dynamo") -> ExportResult:
    """Pull `model_uri` and export it; the window comes from its training record unless `patch`."""
    from crossdim.infer.predictor import read_card
    from crossdim.infer.pull import pull
    from crossdim.models.io import load_model

    pulled = pull(model_uri)
    model = load_model(str(pulled.directory))
    card = read_card(pulled.directory) if (pulled.directory / "dataset.json").is_file() else None
    in_channels = card.in_channels if card else int(model.config["in_channels"])
    model_dims = getattr(model, "spatial_dims", None)
    chosen = resolve_patch(card.window.roi_size if card else None, patch, model_dims)
    return export_module(model, fmt, output, example_shape(in_channels, chosen),
                         relative_tolerance=relative_tolerance, onnx_exporter=onnx_exporter)


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="models:/name@alias, models:/name/version, runs:/.., or a dir")
    parser.add_argument("--format", required=True, choices=list(FORMATS))
    parser.add_argument("--output", required=True, help="output file (local or s3://)")
    parser.add_argument("--patch", type=int, nargs="+", default=None,
                        help="window size to export (default: the model's training patch)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="parity tolerance, relative to the output scale")
    parser.add_argument("--onnx-exporter", choices=["dynamo", "torchscript"], default="dynamo")


def main(args: argparse.Namespace) -> int:
    result = export(args.model, args.format, args.output, args.patch, relative_tolerance=args.tolerance,
                    onnx_exporter=args.onnx_exporter)
    print(json.dumps(asdict(result)))
    print(f"exported {result.format} to {result.path}: max abs diff vs eager {result.max_abs_diff:.3g} "
          f"(tolerance {result.tolerance:.3g})")
    return 0
