"""Argument parsing for the config-driven stages (synth, train, tune): parse -> config -> one call."""

from __future__ import annotations

import argparse
import json


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field by its dotted name, e.g. --set optim.lr=3e-4 (repeatable)")


class synth:  # noqa: N801 - a stage namespace: add_arguments/main
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--format", required=True, choices=["msd", "brats", "camus", "chaos"])
        parser.add_argument("--out", required=True, help="output directory")
        parser.add_argument("--cases", type=int, default=4)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                            help="format option, e.g. naming=2023 (brats), dialect=nnunetv2 (msd), release=nifti (camus)")

    @staticmethod
    def main(args: argparse.Namespace) -> int:
        from crossdim.config import parse_override
        from crossdim.data.synth import write_synthetic

        if args.cases < 1:
            raise ValueError(f"--cases must be >= 1, got {args.cases}")
        opts = dict(parse_override(o) for o in args.opt)
        root = write_synthetic(args.format, args.out, args.cases, seed=args.seed, **opts)
        print(f"wrote {args.cases} synthetic {args.format} case(s) to {root}")
        return 0


class train:  # noqa: N801
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        _add_config_arguments(parser)

    @staticmethod
    def main(args: argparse.Namespace) -> int:
        from crossdim.config import TrainConfig, load_config

        config = load_config(TrainConfig, args.config, args.overrides)
        from crossdim.train import run

        result = run(config)
        print(json.dumps(_summary(result), indent=2, default=str))
        return 0


class tune:  # noqa: N801
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        _add_config_arguments(parser)

    @staticmethod
    def main(args: argparse.Namespace) -> int:
        from crossdim.config import TuneConfig, load_config

        config = load_config(TuneConfig, args.config, args.overrides)
        from crossdim.tune import run

        result = run(config)
        print(json.dumps(_summary(result), indent=2, default=str))
        return 0


def _summary(result) -> dict:
    if hasattr(result, "model_dump"):
        return result.model_dump()
    if hasattr(result, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(result)
    return result if isinstance(result, dict) else {"result": str(result)}
