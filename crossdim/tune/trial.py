"""The Tune trainable: one trial = exactly the training job of `crossdim train`.

`run_trial(params, context)` builds the trial's TrainConfig (base + sampled fields, Ray run name
`<sweep>_<trial id>`), opens its MLflow child run, then runs the training library's own steps:
`prepare` (pre-flight: model built once, so an encoder the 3D inflation cannot convert fails here,
in seconds) -> `start_tracking` (adopts the child run) -> `build_trainer` with Tune's
`TuneReportCallback` -> `fit` -> `finish` (the final model logged to the child run).

A restored (interrupted) trial reruns this function: the child run is found by its trial id and
Ray Train resumes the trial's run from its last checkpoint (same run name and storage path).
A failure's one-line reason is noted on the child run (`crossdim.failure_reason`) and re-raised
as `TrialFailed` with that line, which is what Tune keeps as the trial's error; the driver's
`TrialOutcomes` then ends the run FAILED (or `stopped_early`, when the scheduler was stopping it).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict

from crossdim.config import TrainConfig, TuneConfig

_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception|Failed)): (.+)$")


class TrialFailed(RuntimeError):
    """A trial's training job failed; the message is the one-line reason."""


class TrialContext(BaseModel):
    """What every trial shares (travels to the trial actor as a plain object)."""

    model_config = ConfigDict(extra="forbid")

    sweep: TuneConfig
    parent_run_id: str
    tracking_uri: str
    storage_path: str  # local absolute path or s3:// URI


def trial_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}_{trial_id}"


def one_line_reason(exc: BaseException) -> str:
    """The most specific `XxxError: message` line of an error (worker tracebacks included) (pure)."""
    text = str(exc).strip()
    matches = [m for m in map(_ERROR_LINE.match, text.splitlines()) if m]
    if matches:
        kind, message = matches[-1].groups()
        return f"{kind}: {message.strip()}"[:300]
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:300] if first else type(exc).__name__


def run_trial(params: dict[str, Any], context: TrialContext) -> None:
    """Tune function trainable (wrapped with tune.with_parameters(context=...))."""
    from ray import tune

    from crossdim.tune.space import decode_params, trial_config

    trial_id = tune.get_context().get_trial_id()
    fields = decode_params(context.sweep, params)
    config = trial_config(context.sweep.train, fields, trial_name(context.sweep.name, trial_id), context.tracking_uri)
    run_id = open_child_run(context, trial_id, config, fields)
    train_with_tune(config, context.tracking_uri, run_id)


def open_child_run(context: TrialContext, trial_id: str, config: TrainConfig, fields: dict[str, Any]) -> str:
    from crossdim.tune.runs import find_or_create_child

    return find_or_create_child(context.tracking_uri, config.tracking.experiment, context.parent_run_id,
                                context.sweep.name, trial_id, config.name, context.storage_path, fields)


def train_with_tune(config: TrainConfig, tracking_uri: str, run_id: str) -> None:
    """prepare -> start_tracking -> build_trainer(TuneReportCallback) -> fit -> finish; outcome tagged."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from crossdim.train import build_trainer, finish, prepare, start_tracking
    from crossdim.tune.runs import FINISHED, MODEL_URI_TAG, mark_trial, note_failure

    try:
        prepared = prepare(config)
        start_tracking(prepared)
        if prepared.job.run_id != run_id:
            raise TrialFailed(f"training job opened MLflow run {prepared.job.run_id}, not the trial's child run {run_id}")
        result = build_trainer(prepared, callbacks=[TuneReportCallback()]).fit()
        summary = finish(prepared, result)
    except Exception as exc:  # noqa: BLE001 - every failure's reason is recorded on the child run, then re-raised
        reason = one_line_reason(exc)
        note_failure(tracking_uri, run_id, reason)  # TrialOutcomes ends the run: failed, or stopped_early
        raise TrialFailed(reason) from None
    mark_trial(tracking_uri, run_id, FINISHED, extra={MODEL_URI_TAG: summary.model_uri or ""})
