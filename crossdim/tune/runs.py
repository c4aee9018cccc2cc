"""MLflow runs of a sweep: one parent run per sweep, one nested child run per trial.

- The parent is found again by its `crossdim.sweep_key` tag (hash of storage path + sweep name), so
  a resumed sweep continues its parent run.
- A trial's child run is found by its `crossdim.trial_id` tag under the parent, else created with
  the tags the training job uses to find its own run (`crossdim.run_key` of the trial's Ray run
  name): `crossdim.train` then logs params, per-epoch metrics and the model into that very run.
  A resumed trial therefore never makes a second child run.
- Trial outcome tags: `crossdim.trial_status` (finished | stopped_early | failed) and
  `crossdim.failure_reason` (one line); stopped-early runs end KILLED, failed ones FAILED.
  A trial ends its own run only when it finished; a failing trial records just its reason
  (`note_failure`) and the driver's `TrialOutcomes` ends the run. A trial that the scheduler
  stops can raise while it is torn down: were it to mark itself failed, it would race the
  driver's `stopped_early` (seen once: a run KILLED but tagged failed).
"""

from __future__ import annotations

import json
from typing import Any

from crossdim.tracking import RUN_KEY_TAG, experiment_id, redact_uri, run_key

PARENT_TAG = "mlflow.parentRunId"
SWEEP_KEY_TAG = "crossdim.sweep_key"
SWEEP_TAG = "crossdim.sweep"
TRIAL_TAG = "crossdim.trial_id"
TRIAL_PARAMS_TAG = "crossdim.trial_params"
STATUS_TAG = "crossdim.trial_status"
REASON_TAG = "crossdim.failure_reason"
MODEL_URI_TAG = "crossdim.model_uri"
FINISHED, STOPPED_EARLY, FAILED = "finished", "stopped_early", "failed"
RUN_STATUS = {FINISHED: "FINISHED", STOPPED_EARLY: "KILLED", FAILED: "FAILED"}


def client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def sweep_key(storage_path: str, name: str) -> str:
    return run_key(storage_path, f"sweep:{name}")


def find_run(uri: str, experiment: str, filter_string: str) -> Any | None:
    runs = client(uri).search_runs([experiment], filter_string=filter_string, max_results=1,
                                   order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def start_or_resume_parent(uri: str, experiment: str, storage_path: str, name: str,
                           tags: dict[str, str]) -> tuple[str, dict[str, str]]:
    """(parent run id, its tags before this call): the sweep's run, found by key or created."""
    exp = experiment_id(uri, experiment, storage_path)
    key = sweep_key(storage_path, name)
    found = find_run(uri, exp, f"tags.`{SWEEP_KEY_TAG}` = '{key}'")
    if found is not None:
        client(uri).update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id, dict(found.data.tags)
    run = client(uri).create_run(exp, run_name=name, tags={SWEEP_KEY_TAG: key, SWEEP_TAG: name,
                                                           "crossdim.storage_path": redact_uri(storage_path), **tags})
    return run.info.run_id, {}


def find_or_create_child(uri: str, experiment: str, parent_id: str, sweep: str, trial_id: str,
                         trial_name: str, storage_path: str, fields: dict[str, Any]) -> str:
    """The trial's child run (found by trial id, else created so the training job adopts it)."""
    exp = experiment_id(uri, experiment, storage_path)
    found = find_run(uri, exp, f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{PARENT_TAG}` = '{parent_id}'")
    if found is not None:
        return found.info.run_id
    tags = {PARENT_TAG: parent_id, TRIAL_TAG: trial_id, SWEEP_TAG: sweep, TRIAL_PARAMS_TAG: json.dumps(fields),
            RUN_KEY_TAG: run_key(storage_path, trial_name), "crossdim.ray_run_name": trial_name,
            "crossdim.storage_path": redact_uri(storage_path)}
    return client(uri).create_run(exp, run_name=trial_name, tags=tags).info.run_id


def child_runs(uri: str, experiment: str, storage_path: str, parent_id: str) -> list[Any]:
    exp = experiment_id(uri, experiment, storage_path)
    return client(uri).search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                                   max_results=10000, order_by=["attributes.start_time ASC"])


def child_by_trial(uri: str, experiment: str, storage_path: str, parent_id: str, trial_id: str) -> Any | None:
    exp = experiment_id(uri, experiment, storage_path)
    return find_run(uri, exp, f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{PARENT_TAG}` = '{parent_id}'")


def note_failure(uri: str, run_id: str, reason: str) -> None:
    """A failing trial's one-line reason on its (still running) child run; the outcome is the driver's."""
    client(uri).set_tag(run_id, REASON_TAG, reason[:500])


def mark_trial(uri: str, run_id: str, status: str, reason: str | None = None,
               extra: dict[str, str] | None = None) -> None:
    """Record a trial's outcome on its child run and end the run. A reason noted by an attempt that
    did not end the trial (torn down by the scheduler, or by an interrupted sweep that was
    resumed) is dropped from a run that did not fail."""
    mlflow = client(uri)
    if status != FAILED and REASON_TAG in mlflow.get_run(run_id).data.tags:
        mlflow.delete_tag(run_id, REASON_TAG)
    tags = {STATUS_TAG: status, **(extra or {})}
    if reason:
        tags[REASON_TAG] = reason[:500]
    for key, value in tags.items():
        mlflow.set_tag(run_id, key, value)
    mlflow.set_terminated(run_id, status=RUN_STATUS[status])
