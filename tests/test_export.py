"""crossdim export: TorchScript and ONNX files whose outputs equal the eager model's."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from crossdim.export import (
    ExportParityError, add_arguments, example_shape, export, main, parity, resolve_patch,
)
from crossdim.models import create_model
from tests.infer_helpers import multiclass_card, plan, write_checkpoint

LABELS = {0: "background", 1: "a", 2: "b"}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSDIM_CACHE_DIR", str(tmp_path / "cache"))


def _checkpoint(tmp_path, arch: str, dims: int, channels: int = 2):
    torch.manual_seed(0)
    model = create_model(arch, encoder="test_efficientnet", in_channels=channels, num_classes=3).eval()
    card = multiclass_card(plan(spatial_dims=dims, channels=channels), LABELS, [f"c{i}" for i in range(channels)],
                           [32] * dims)
    return write_checkpoint(tmp_path / arch, model, card), model


def _independent_check(path: str, fmt: str, model: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """Load the file with its own runtime, run a batch of 3 (the batch axis is dynamic)."""
    x = torch.randn(3, *shape[1:], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        eager = model(x).numpy()
    if fmt == "torchscript":
        out = torch.jit.load(path).eval()(x).detach().numpy()
    else:
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        out = session.run(None, {"image": x.numpy()})[0]
    assert out.shape == eager.shape
    return float(np.abs(out - eager).max())


@pytest.mark.parametrize(("arch", "dims"), [("omnianet", 2), ("dxnet", 3)])
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_eager(tmp_path, arch, dims, fmt):
    ckpt, model = _checkpoint(tmp_path, arch, dims)
    output = str(tmp_path / f"{arch}.{'pt' if fmt == 'torchscript' else 'onnx'}")
    result = export(str(ckpt), fmt, output)
    assert result.input_shape == [1, 2, *[32] * dims]  # the training window from the model card
    assert result.max_abs_diff <= result.tolerance <= 1e-3
    assert _independent_check(output, fmt, model, tuple(result.input_shape)) <= 1e-4


def test_cli_reports_the_difference_and_takes_a_patch(tmp_path, capsys):
    ckpt, model = _checkpoint(tmp_path, "omnianet", 2, channels=1)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    output = str(tmp_path / "omnia64.pt")
    assert main(parser.parse_args(["--model", str(ckpt), "--format", "torchscript", "--output", output,
                                   "--patch", "64", "48"])) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    printed = json.loads(lines[0])
    assert printed["input_shape"] == [1, 1, 64, 48] and printed["max_abs_diff"] <= printed["tolerance"]
    assert "max abs diff vs eager" in lines[1]
    assert _independent_check(output, "torchscript", model, (1, 1, 64, 48)) <= 1e-4


def test_parity_and_patch_errors_are_one_line(tmp_path):
    reference = np.linspace(-5, 5, 24, dtype=np.float32).reshape(1, 2, 3, 4)
    assert parity(reference, reference + 1e-5, "m.onnx", "onnx", (1, 2, 3, 4), 1e-4).max_abs_diff == pytest.approx(1e-5, rel=0.1)
    with pytest.raises(ExportParityError, match=r"m.onnx: onnx output differs from eager PyTorch by 0.01"):
        parity(reference, reference + 1e-2, "m.onnx", "onnx", (1, 2, 3, 4), 1e-4)
    with pytest.raises(ExportParityError, match="shape"):
        parity(reference, reference[:, :1], "m.pt", "torchscript", (1, 2, 3, 4), 1e-4)
    with pytest.raises(ValueError, match="the model is 3D and needs 3 sizes"):
        resolve_patch([32, 32, 32], [64, 64], 3)
    with pytest.raises(ValueError, match="give --patch"):
        resolve_patch(None, None, 2)
    assert resolve_patch([32, 32], None, 2) == [32, 32] and example_shape(4, [8, 8, 8]) == (1, 4, 8, 8, 8)
    with pytest.raises(ValueError, match="--format 'tflite'"):
        ckpt, _ = _checkpoint(tmp_path, "omnianet", 2)
        export(str(ckpt), "tflite", str(tmp_path / "x"))
