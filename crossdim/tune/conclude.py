"""After `fit`: summarise the trials on the parent run, register the best model, end the parent run."""

from __future__ import annotations

from crossdim.config import TuneConfig
from crossdim.tune.results import DECISION_TAG, MOVED_TAG, STATUS_TAG, VERSION_TAG, SweepPlan, SweepResult
from crossdim.tune.promote import ModelEvidence, Registration, register_candidate
from crossdim.tune.runs import child_runs, client
from crossdim.tune.space import expected_trials, key_fields
from crossdim.tune.summary import UNFINISHED, TrialSummary, best_trial, plot, rows, to_csv, to_markdown, trial_from_run


def searched_fields(config: TuneConfig) -> list[str]:
    return [f for key in config.search_space for f in key_fields(key)]


def log_fields(config: TuneConfig) -> list[str]:
    return [key for key, dim in config.search_space.items() if dim.log]


def log_summary(uri: str, run_id: str, config: TuneConfig, trials: list[TrialSummary]) -> None:
    """trials.csv, trials.md and <metric>_per_trial.png under the parent run's `summary/`."""
    import matplotlib.pyplot as plt

    mlflow = client(uri)
    table = rows(trials, searched_fields(config), config.metric)
    mlflow.log_text(run_id, to_csv(table), "summary/trials.csv")
    mlflow.log_text(run_id, to_markdown(table), "summary/trials.md")
    fig = plot(trials, searched_fields(config), config.metric, log_fields(config))
    try:
        mlflow.log_figure(run_id, fig, f"summary/{config.metric}_per_trial.png")
    finally:
        plt.close(fig)


def log_counts(uri: str, run_id: str, config: TuneConfig, trials: list[TrialSummary],
               best: TrialSummary | None) -> None:
    mlflow = client(uri)
    for status in ("finished", "stopped_early", "failed", "unfinished"):
        mlflow.log_metric(run_id, f"trials_{status}", sum(t.status == status for t in trials))
    if best is not None and best.metric is not None:
        mlflow.log_metric(run_id, f"best_{config.metric}", best.metric)
        mlflow.set_tag(run_id, "crossdim.best_trial", best.trial_id)


def trial_fold(config: TuneConfig, trial: TrialSummary) -> int:
    return int(trial.params.get("data.fold", config.train.data.fold))


def register_best(config: TuneConfig, plan: SweepPlan, parent_id: str, prior: dict[str, str],
                  best: TrialSummary) -> Registration:
    """Once per sweep: a resumed sweep that already registered reports that registration again."""
    if prior.get(VERSION_TAG):
        return Registration(version=prior[VERSION_TAG], alias_moved=prior.get(MOVED_TAG) == "true",
                            reason=prior.get(DECISION_TAG, ""))
    evidence = ModelEvidence(version="", metric=config.metric, value=best.metric, fingerprint=plan.fingerprint,
                             fold=trial_fold(config, best))
    registration = register_candidate(plan.tracking_uri, str(best.model_uri), str(config.registered_model_name),
                                      config.alias, config.mode, evidence,
                                      {"crossdim.sweep": config.name, "crossdim.trial_id": best.trial_id})
    mlflow = client(plan.tracking_uri)
    for key, value in ((VERSION_TAG, registration.version), (MOVED_TAG, str(registration.alias_moved).lower()),
                       (DECISION_TAG, registration.reason)):
        mlflow.set_tag(parent_id, key, value)
    return registration


def sweep_complete(config: TuneConfig, trials: list[TrialSummary]) -> bool:
    """Every expected trial exists and has an outcome (an interrupted sweep leaves some without) (pure)."""
    return len(trials) >= expected_trials(config) and all(t.status != UNFINISHED for t in trials)


def conclude(config: TuneConfig, plan: SweepPlan, parent_id: str, prior: dict[str, str]) -> SweepResult:
    """Summary, counts and (for a complete sweep) registration; ends the parent run."""
    from crossdim.tracking import redact_uri

    uri = plan.tracking_uri
    runs = child_runs(uri, config.train.tracking.experiment, plan.storage_path, parent_id)
    trials = [trial_from_run(r, config.metric) for r in runs]
    finished = sweep_complete(config, trials)
    best = best_trial(trials, config.mode)
    log_summary(uri, parent_id, config, trials)
    log_counts(uri, parent_id, config, trials, best)
    registration = None
    if finished and best is not None and config.registered_model_name:
        registration = register_best(config, plan, parent_id, prior, best)
    status = "finished" if finished else "interrupted"
    client(uri).set_tag(parent_id, STATUS_TAG, status)
    client(uri).set_terminated(parent_id, status="FINISHED" if finished else "KILLED")
    return SweepResult(
        name=config.name, status=status, experiment_path=redact_uri(plan.experiment_path), parent_run_id=parent_id,
        tracking_uri=redact_uri(uri), metric=config.metric, trials=trials,
        best_trial_id=best.trial_id if best else None, best_metric=best.metric if best else None,
        best_model_uri=best.model_uri if best else None, registered_model_name=config.registered_model_name,
        registered_version=registration.version if registration else None,
        alias=config.alias if config.registered_model_name else None,
        alias_moved=bool(registration and registration.alias_moved),
        alias_reason=registration.reason if registration else None)

