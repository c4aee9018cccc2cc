"""Inference from the MLflow registry (or a checkpoint directory): `crossdim predict`.

    predictor = load_predictor("models:/brats_dxnet@champion")
    prediction = predictor.predict(image_CXYZ, affine)          # labels on the input's own grid
    predict("models:/brats_dxnet@champion", "scan_dir/", "out/")  # files in, NIfTI out

The model carries its preprocessing record, class names and window (dataset.json), so the caller
passes nothing else. Inputs: a NIfTI/MHD file, a DICOM series folder, a folder of channel files,
a whole dataset folder or a preprocessed shard dataset (manifest.json) -> one label map per case,
with the input's shape, affine and orientation. More than one case runs as a batch: in this
process, or on Ray with `--workers N` (failing cases are listed in failures.json, the rest
complete). See crossdim.infer.* for the parts.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from crossdim import storage
from crossdim.config import PredictConfig
from crossdim.infer.batch import (
    BatchSummary, is_single_file, output_uris, run_local, run_local_shards, run_on_ray, write_prediction,
    write_report,
)
from crossdim.infer.predictor import ModelCard, Prediction, Predictor, read_card
from crossdim.infer.pull import PulledModel, pull
from crossdim.infer.sources import CaseSource, InputSpec, discover

__all__ = ["ModelCard", "Prediction", "Predictor", "PulledModel", "load_predictor", "predict", "input_spec",
           "add_arguments", "main"]


def load_predictor(model_uri: str, config: PredictConfig | None = None) -> Predictor:
    """Pull (or reuse from the cache) and verify the model, rebuild it from its checkpoint."""
    from crossdim.models.io import load_model

    pulled = pull(model_uri)
    card = read_card(pulled.directory)
    model = load_model(str(pulled.directory))
    return Predictor(model, card, config, source=pulled)


def input_spec(card: ModelCard) -> InputSpec:
    return InputSpec(channel_names=card.channel_names, spatial_dims=card.spatial_dims,
                     dataset_format=card.dataset_format)


def is_shard_dataset(path: str) -> bool:
    return path.endswith("manifest.json") or storage.exists(storage.join(path, "manifest.json"))


def predict(model_uri: str, input_path: str, output: str, config: PredictConfig | None = None, *,
            workers: int = 0, use_gpu: bool = False, split: str | None = None, fold: int = 0) -> BatchSummary:
    """Predict every case of `input_path` into `output` (a .nii.gz file for one case, else a folder).

    `workers` > 0 runs the cases on that many Ray actors. A single case that fails raises its
    one-line error; in a batch, failures are listed (failures.json) and the rest complete."""
    config = config or PredictConfig(model=model_uri, input=input_path, output=output)
    start = time.perf_counter()
    if not output:
        raise ValueError("--output: empty output path")
    if is_shard_dataset(input_path):
        return _predict_shards(model_uri, input_path, output, config, workers, use_gpu, split, fold, start)
    predictor = load_predictor(model_uri, config)
    sources = discover(input_path, input_spec(predictor.card))
    if len(sources) == 1 and workers == 0:
        return _predict_one(predictor, sources[0], output, start)
    if is_single_file(output):
        raise ValueError(f"--output {output}: {len(sources)} cases need an output folder, not a file name")
    if workers > 0:
        results = run_on_ray(model_uri, config, output, sources=sources, workers=workers, use_gpu=use_gpu)
    else:
        results = run_local(predictor, sources, output)
    return write_report(output, results, time.perf_counter() - start)


def _predict_one(predictor: Predictor, source: CaseSource, output: str, start: float) -> BatchSummary:
    case = source.load()
    prediction = predictor.predict(case.image, case.affine, where=source.description)
    if not is_single_file(output) and storage.is_local(output):
        os.makedirs(output, exist_ok=True)
    result = write_prediction(prediction, case.affine, case.reference,
                              output_uris(output, source.id, is_single_file(output)))
    result.id, result.seconds = source.id, round(time.perf_counter() - start, 3)
    return BatchSummary(output=output, total=1, succeeded=1, failed=0, seconds=result.seconds, results=[result])


def _predict_shards(model_uri: str, uri: str, output: str, config: PredictConfig, workers: int, use_gpu: bool,
                    split: str | None, fold: int, start: float) -> BatchSummary:
    from crossdim.data.shards import dataset_root, iter_cases, read_manifest, select_ids

    if is_single_file(output):
        raise ValueError(f"--output {output}: a shard dataset needs an output folder, not a file name")
    root = dataset_root(uri)
    if workers > 0:
        results = run_on_ray(model_uri, config, output, shard_uri=root, split=split, fold=fold, workers=workers,
                             use_gpu=use_gpu)
    else:
        predictor = load_predictor(model_uri, config)
        total = len(select_ids(read_manifest(root), split, fold))
        results = run_local_shards(predictor, iter_cases(root, split=split, fold=fold), total, output)
    return write_report(output, results, time.perf_counter() - start)


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="models:/name@alias, models:/name/version, runs:/<id>/model, or a checkpoint dir")
    parser.add_argument("--input", required=True,
                        help="a NIfTI/MHD file, a DICOM series folder, a folder of channel files, a dataset "
                             "folder, or a preprocessed shard dataset (folder or URI holding manifest.json)")
    parser.add_argument("--output", required=True, help="a .nii.gz file (one case) or a folder / s3:// URI")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (0..1)")
    parser.add_argument("--blend", choices=["gaussian", "constant"], default="gaussian")
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--tta", action="store_true", help="average over flips of every spatial axis")
    parser.add_argument("--probabilities", action="store_true", help="also write float32 probability maps")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--workers", type=int, default=0, help="Ray actors for a batch (0: in this process)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per Ray actor")
    parser.add_argument("--split", choices=["train", "val"], default=None, help="shard datasets: one split")
    parser.add_argument("--fold", type=int, default=0)


def config_from_args(args: argparse.Namespace) -> PredictConfig:
    from pydantic import ValidationError

    from crossdim.config import ConfigError, format_validation_error

    try:
        return PredictConfig(model=args.model, input=args.input, output=args.output, sw_overlap=args.overlap,
                             sw_mode=args.blend, sw_batch_size=args.sw_batch_size, tta=args.tta,
                             save_probabilities=args.probabilities, device=args.device)
    except ValidationError as exc:
        raise ConfigError(f"predict arguments: {format_validation_error(exc)}") from None


def main(args: argparse.Namespace) -> int:
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    config = config_from_args(args)
    summary = predict(config.model, config.input, config.output, config, workers=args.workers, use_gpu=args.gpu,
                      split=args.split, fold=args.fold)
    print(json.dumps({"output": summary.output, "total": summary.total, "succeeded": summary.succeeded,
                      "failed": summary.failed, "seconds": summary.seconds}))
    return 0 if summary.failed == 0 else 3
