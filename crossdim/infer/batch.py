"""Many cases: in this process, or on Ray (Ray Data `map_batches` with an actor class that holds the
model, one case per call, CPU or GPU actors). A case that fails (unreadable scan, wrong channel
count, ...) is recorded and skipped; the others complete. The output folder receives one
`<case>.nii.gz` per case (+ `<case>_probabilities.nii.gz`), `summary.json` and, when any case
failed, `failures.json` [{"id", "source", "error"}].

Inputs are raw cases (`CaseSource`, see crossdim.infer.sources) or rows of a preprocessed shard
dataset (`crossdim.data.shards`): those are already on the preprocessed grid and are inverted
onto their original grid with the geometry recorded in the row.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from crossdim import storage
from crossdim.config import PredictConfig
from crossdim.infer.predictor import Prediction, Predictor
from crossdim.infer.sources import CaseSource
from crossdim.infer.writers import LABEL_SUFFIX, PROBABILITY_SUFFIX, write_labels, write_probabilities

SUMMARY_FILE = "summary.json"
FAILURES_FILE = "failures.json"


@dataclass
class CaseResult:
    id: str
    source: str
    status: str  # "ok" | "failed"
    output: str = ""
    probabilities: str = ""
    error: str = ""
    seconds: float = 0.0


@dataclass
class BatchSummary:
    output: str
    total: int
    succeeded: int
    failed: int
    seconds: float
    results: list[CaseResult] = field(default_factory=list)

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if r.status != "ok"]


# ----------------------------------------------------------------------------- one case
def is_single_file(output: str) -> bool:
    return output.endswith((".nii.gz", ".nii"))


def output_uris(output: str, case_id: str, single: bool) -> tuple[str, str]:
    """(label map URI, probability map URI) of a case (pure)."""
    if single:
        stem = output[: -len(".nii.gz")] if output.endswith(".nii.gz") else output[: -len(".nii")]
        return output, stem + PROBABILITY_SUFFIX
    return storage.join(output, case_id + LABEL_SUFFIX), storage.join(output, case_id + PROBABILITY_SUFFIX)


def write_prediction(prediction: Prediction, affine: np.ndarray, reference: str, uris: tuple[str, str]) -> CaseResult:
    label_uri, prob_uri = uris
    write_labels(label_uri, prediction.labels, affine, reference)
    if prediction.probabilities is None:
        prob_uri = ""
    else:
        write_probabilities(prob_uri, prediction.probabilities, affine, reference)
    return CaseResult(id="", source=reference, status="ok", output=label_uri, probabilities=prob_uri)


def guarded(case_id: str, source: str, work: Callable[[], CaseResult]) -> CaseResult:
    """Run one case; any failure becomes a 'failed' result with a one-line reason (the batch goes on)."""
    start = time.perf_counter()
    try:
        result = work()
        result.id, result.source = case_id, source
    except Exception as exc:  # noqa: BLE001 - one bad case must not stop the others
        result = CaseResult(id=case_id, source=source, status="failed", error=one_line(exc))
    result.seconds = round(time.perf_counter() - start, 3)
    return result


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:400]
    return text if text and isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {text}".rstrip(": ")


def run_source(predictor: Predictor, source: CaseSource, output: str, single: bool = False) -> CaseResult:
    def work() -> CaseResult:
        case = source.load()
        prediction = predictor.predict(case.image, case.affine, where=source.description)
        return write_prediction(prediction, case.affine, case.reference, output_uris(output, source.id, single))

    return guarded(source.id, source.description, work)


def run_shard_row(predictor: Predictor, row: dict[str, Any], output: str) -> CaseResult:
    """A raw shard row (Ray Data): decoded inside the guard, so a corrupt row fails alone."""
    from crossdim.data.shards import decode_row

    case_id = str(row.get("id", "?"))
    return guarded(case_id, f"shard row {case_id}", lambda: _predict_shard_case(predictor, decode_row(row), output))


def run_shard_case(predictor: Predictor, case: Any, output: str) -> CaseResult:
    """A decoded shard case (crossdim.data.shards.CaseArrays)."""
    return guarded(case.id, f"shard row {case.id}", lambda: _predict_shard_case(predictor, case, output))


def _predict_shard_case(predictor: Predictor, case: Any, output: str) -> CaseResult:
    prediction = predictor.predict_preprocessed(case.image, case.geometry)
    affine = np.asarray(case.geometry["original_affine"], dtype=np.float64)
    reference = (case.geometry.get("source_files") or [""])[0]  # its NIfTI header, if still readable here
    return write_prediction(prediction, affine, reference, output_uris(output, case.id, False))


# ----------------------------------------------------------------------------- many cases
def run_local(predictor: Predictor, sources: Sequence[CaseSource], output: str) -> list[CaseResult]:
    single = len(sources) == 1 and is_single_file(output)
    results = []
    for n, source in enumerate(sources, 1):
        results.append(run_source(predictor, source, output, single))
        report_progress(n, len(sources), results[-1])
    return results


def run_local_shards(predictor: Predictor, cases: Iterable[Any], total: int, output: str) -> list[CaseResult]:
    results = []
    for n, case in enumerate(cases, 1):
        results.append(run_shard_case(predictor, case, output))
        report_progress(n, total, results[-1])
    return results


def report_progress(n: int, total: int, result: CaseResult) -> None:
    status = "ok" if result.status == "ok" else f"FAILED: {result.error}"
    print(f"[{n}/{total}] {result.id}: {status} ({result.seconds:.1f} s)", file=sys.stderr, flush=True)


class PredictActor:
    """Ray Data actor: pulls the model once (from the node's cache), predicts one case per call."""

    def __init__(self, model_uri: str, config_json: str, output: str, sources: Sequence[CaseSource] | None) -> None:
        from crossdim.inference import load_predictor

        self.predictor = load_predictor(model_uri, PredictConfig.model_validate_json(config_json))
        self.output, self.sources = output, list(sources or [])

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        if "index" in batch:
            results = [run_source(self.predictor, self.sources[int(i)], self.output) for i in batch["index"]]
        else:
            rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["id"]))]
            results = [run_shard_row(self.predictor, row, self.output) for row in rows]
        return {k: [getattr(r, k) for r in results] for k in CaseResult.__dataclass_fields__}


def run_on_ray(model_uri: str, config: PredictConfig, output: str, *, sources: Sequence[CaseSource] | None = None,
               shard_uri: str | None = None, split: str | None = None, fold: int = 0, workers: int = 1,
               use_gpu: bool = False) -> list[CaseResult]:
    """Predict every source (or every shard row of `shard_uri`) on `workers` Ray actors."""
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, log_to_driver=False)
    if shard_uri is not None:
        from crossdim.data.shards import open_shards

        dataset, total = open_shards(shard_uri, split=split, fold=fold), None
    else:
        dataset, total = ray.data.from_items([{"index": i} for i in range(len(sources or []))]), len(sources or [])
    mapped = dataset.map_batches(
        PredictActor, batch_size=1, concurrency=workers, num_gpus=1 if use_gpu else None,
        num_cpus=None if use_gpu else 1,
        fn_constructor_args=(model_uri, config.model_dump_json(), output, sources),
    )
    results = []
    for n, row in enumerate(mapped.iter_rows(), 1):
        results.append(CaseResult(**{k: row[k] for k in CaseResult.__dataclass_fields__}))
        report_progress(n, total or n, results[-1])
    return results


def write_report(output: str, results: Sequence[CaseResult], seconds: float) -> BatchSummary:
    """summary.json (+ failures.json when a case failed) next to the predictions."""
    failed = [r for r in results if r.status != "ok"]
    summary = BatchSummary(output=output, total=len(results), succeeded=len(results) - len(failed),
                           failed=len(failed), seconds=round(seconds, 2), results=list(results))
    folder = output if not is_single_file(output) else _parent(output)
    document = {k: v for k, v in asdict(summary).items() if k != "results"}
    document["cases"] = [asdict(r) for r in results]
    storage.write_text(storage.join(folder, SUMMARY_FILE), json.dumps(document, indent=1))
    if failed:
        storage.write_text(storage.join(folder, FAILURES_FILE),
                           json.dumps([{"id": r.id, "source": r.source, "error": r.error} for r in failed], indent=1))
    return summary


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if "/" in uri else "."
