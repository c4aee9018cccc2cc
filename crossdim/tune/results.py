"""What a sweep returns and the tags it leaves on its MLflow parent run."""

from __future__ import annotations

from pydantic import BaseModel

from crossdim.tune.summary import TrialSummary

CONFIG_SHA_TAG = "crossdim.sweep_config_sha"
STATUS_TAG = "crossdim.sweep_status"
VERSION_TAG = "crossdim.registered_version"
DECISION_TAG = "crossdim.alias_decision"
MOVED_TAG = "crossdim.alias_moved"


class SweepPlan(BaseModel):
    tracking_uri: str
    storage_path: str  # local absolute path or s3:// URI
    experiment_path: str  # <storage_path>/<name>: the Tune experiment
    fingerprint: str
    manifest: str


class SweepResult(BaseModel):
    name: str
    status: str  # finished | interrupted
    experiment_path: str
    parent_run_id: str
    tracking_uri: str  # without credentials
    metric: str
    trials: list[TrialSummary]
    best_trial_id: str | None = None
    best_metric: float | None = None
    best_model_uri: str | None = None
    registered_model_name: str | None = None
    registered_version: str | None = None
    alias: str | None = None
    alias_moved: bool = False
    alias_reason: str | None = None
