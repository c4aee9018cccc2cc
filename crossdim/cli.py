"""`crossdim <stage>`: one command, one library call per stage.

Each stage module exposes `add_arguments(parser)` and `main(args) -> int`; modules are imported only
when their stage runs, so `crossdim --help` is instant. `python -m pipelines.<stage>` calls the
same functions with the same arguments.

Every stage exits non-zero with a one-line reason on bad input (CROSSDIM_DEBUG=1 shows the
traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

# stage -> (module with add_arguments/main, one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "synth": ("crossdim.stages:synth", "write a synthetic dataset in a real layout (msd, brats, camus, chaos)"),
    "preprocess": ("crossdim.data.job", "preprocess a dataset into checksummed Parquet shards (Ray Data)"),
    "train": ("crossdim.stages:train", "train a model on Ray Train, tracked in MLflow"),
    "tune": ("crossdim.stages:tune", "sweep architectures x encoders x hyperparameters with Ray Tune"),
    "predict": ("crossdim.inference", "predict segmentations with a model from the registry or a checkpoint"),
    "evaluate": ("crossdim.evaluate", "evaluate a model on a preprocessed dataset split"),
    "models": ("crossdim.registry_cli", "list registered models, promote a version to an alias"),
    "export": ("crossdim.export", "export a model to TorchScript or ONNX (checked for parity)"),
    "doctor": ("crossdim.doctor", "check Ray, MLflow, S3 and credentials reachability"),
    "demo": ("crossdim.demo", "the main job end to end on embedded defaults"),
}


def _quiet_environment() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crossdim", description="Cross-dimensional transfer learning for medical image segmentation.")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    for name, (module_name, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == stage:  # import only the module of the stage being run
            _module(name).add_arguments(p)
    return parser


def _module(stage: str):
    module_name, _, attr = STAGES[stage][0].partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr) if attr else module
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise SystemExit(f"crossdim {stage}: this stage is not available in this build ({module_name} missing)")
        raise


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_environment()
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = argv[0] if argv and argv[0] in STAGES else None
    parser = build_parser(stage)
    args = parser.parse_args(argv)
    if args.stage is None:
        parser.print_help()
        return 2
    return run_stage(args.stage, args)


def run_stage(stage: str, args: argparse.Namespace) -> int:
    try:
        return int(_module(stage).main(args) or 0)
    except KeyboardInterrupt:
        print(f"crossdim {stage}: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - the one place that turns errors into one line
        if os.environ.get("CROSSDIM_DEBUG"):
            raise
        print(f"crossdim {stage}: error: {one_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, (ValueError, OSError, KeyError)) else 1


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    known = ("Error" in name and name not in ("RuntimeError", "Exception")) or isinstance(exc, (ValueError, OSError))
    return text if (known and text) else f"{name}: {text}".rstrip(": ")


def pipeline_main(stage: str) -> None:
    """Entry for `python -m pipelines.<stage> ...` (same arguments as `crossdim <stage>`)."""
    sys.exit(main([stage, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
