"""A Tune callback (driver side): the one writer of a trial's outcome, unless the trial finished.

A trial stopped by the scheduler (ASHA) or whose actor died is killed from outside, and a failing
trial only notes its reason (`runs.note_failure`), so its child run is still RUNNING: on
`on_trial_complete` / `on_trial_error` this callback tags it `stopped_early` (run KILLED, with the
epochs reached; a reason noted while the trial was being torn down is dropped) or `failed` (run
FAILED, the reason the trial noted, else the first line of Tune's error file). Runs the trial
ended itself (finished) are left as they are; a trial that failed before opening its child run
(e.g. the tracking server was down) gets one here, so every trial of the sweep has a record.
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback

from crossdim.tune.runs import (
    FAILED,
    REASON_TAG,
    STOPPED_EARLY,
    child_by_trial,
    find_or_create_child,
    mark_trial,
)


class TrialOutcomes(Callback):
    def __init__(self, tracking_uri: str, experiment: str, storage_path: str, parent_run_id: str, sweep: str) -> None:
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.storage_path, self.parent_run_id, self.sweep = storage_path, parent_run_id, sweep

    def _open_run(self, trial_id: str) -> Any | None:
        run = child_by_trial(self.tracking_uri, self.experiment, self.storage_path, self.parent_run_id, trial_id)
        return run if run is not None and run.info.status == "RUNNING" else None

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        run = self._open_run(trial.trial_id)
        if run is None:
            return
        epoch = (trial.last_result or {}).get("epoch")
        reached = str(int(epoch) + 1) if epoch is not None else "0"
        mark_trial(self.tracking_uri, run.info.run_id, STOPPED_EARLY, extra={"crossdim.stopped_after_epochs": reached})

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        from crossdim.tune.trial import trial_name

        run = child_by_trial(self.tracking_uri, self.experiment, self.storage_path, self.parent_run_id, trial.trial_id)
        if run is not None and run.info.status != "RUNNING":
            return  # already ended (a finished run is not overwritten)
        run_id = run.info.run_id if run is not None else find_or_create_child(
            self.tracking_uri, self.experiment, self.parent_run_id, self.sweep, trial.trial_id,
            trial_name(self.sweep, trial.trial_id), self.storage_path, dict(trial.config))
        noted = run.data.tags.get(REASON_TAG) if run is not None else None
        mark_trial(self.tracking_uri, run_id, FAILED, reason=noted or error_line(trial))


def error_line(trial: Any) -> str:
    """First line of the trial's error as Tune recorded it (its error file), else a generic reason."""
    from crossdim.tune.trial import one_line_reason

    path = getattr(trial, "error_file", None)
    try:
        with open(path) as f:  # type: ignore[arg-type]
            return one_line_reason(RuntimeError(f.read()))
    except (OSError, TypeError):
        return "trial actor failed (no error recorded)"
