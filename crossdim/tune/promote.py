"""Register a sweep's best model and move the alias only when it beats the alias holder.

Every registered version carries, as tags, the evidence a later comparison needs:
`crossdim.metric` (name), `crossdim.metric_value`, `crossdim.fingerprint` (the dataset's manifest
fingerprint), `crossdim.fold`, plus `crossdim.sweep` and `crossdim.trial_id`.

The decision (`decide_alias`, pure):
- no version holds the alias -> move it;
- the holder was measured on the same validation split (same fingerprint and fold) with the same
  metric -> move only when the candidate is strictly better (per the sweep's mode);
- otherwise the two cannot be compared (another dataset or fold, another metric, or the holder
  records no evidence): the alias is NOT moved - a model measured elsewhere is never replaced
  silently - and the reason says why; promote by hand if intended (`crossdim models promote`).
A holder registered by `crossdim train` has no such tags: its evidence is read from its run
(last value of the metric, the `data.fold` param, and the dataset digest MLflow keeps, which is
the fingerprint's first 36 characters; fingerprints are compared on that prefix).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

METRIC_TAG = "crossdim.metric"
VALUE_TAG = "crossdim.metric_value"
FINGERPRINT_TAG = "crossdim.fingerprint"
FOLD_TAG = "crossdim.fold"
DIGEST_CHARS = 36  # MLflow dataset digests keep this many characters of the fingerprint


class ModelEvidence(BaseModel):
    """What a registered version was measured on, and how well it did."""

    version: str
    metric: str | None = None
    value: float | None = None
    fingerprint: str | None = None
    fold: int | None = None


class AliasDecision(BaseModel):
    move: bool
    reason: str


def decide_alias(candidate: ModelEvidence, holder: ModelEvidence | None, alias: str, mode: str) -> AliasDecision:
    """Whether `candidate` takes `alias` from `holder` (see the module docstring) (pure)."""
    if holder is None:
        return AliasDecision(move=True, reason=f"no version held @{alias}")
    if holder.version == candidate.version:
        return AliasDecision(move=False, reason=f"v{candidate.version} already holds @{alias}")
    problem = comparison_problem(candidate, holder)
    if problem:
        return AliasDecision(move=False, reason=f"cannot compare with @{alias} v{holder.version}: {problem}; alias left")
    better = candidate.value > holder.value if mode == "max" else candidate.value < holder.value  # type: ignore[operator]
    verb = "beats" if better else "does not beat"
    return AliasDecision(move=better, reason=f"v{candidate.version} {candidate.metric} {candidate.value:.4f} {verb} "
                                             f"@{alias} v{holder.version} {holder.value:.4f}")


def comparison_problem(candidate: ModelEvidence, holder: ModelEvidence) -> str | None:
    """Why two versions' metrics are not comparable, or None (pure)."""
    if holder.value is None or holder.metric is None:
        return "it records no metric"
    if holder.metric != candidate.metric:
        return f"it records {holder.metric}, not {candidate.metric}"
    if not holder.fingerprint or holder.fold is None:
        return "it records no dataset fingerprint/fold"
    if holder.fingerprint[:DIGEST_CHARS] != (candidate.fingerprint or "")[:DIGEST_CHARS]:
        return f"other data (fingerprint {holder.fingerprint[:12]} vs {(candidate.fingerprint or '')[:12]})"
    if holder.fold != candidate.fold:
        return f"other validation fold ({holder.fold} vs {candidate.fold})"
    return None


# ----------------------------------------------------------------------------- registry I/O
def evidence_tags(evidence: ModelEvidence) -> dict[str, str]:
    return {METRIC_TAG: str(evidence.metric), VALUE_TAG: repr(evidence.value),
            FINGERPRINT_TAG: str(evidence.fingerprint), FOLD_TAG: str(evidence.fold)}


def read_evidence(client: Any, version: Any, metric: str) -> ModelEvidence:
    """A registered version's evidence: its tags, else its run (see the module docstring)."""
    tags = dict(version.tags or {})
    if VALUE_TAG in tags:
        return ModelEvidence(version=str(version.version), metric=tags.get(METRIC_TAG), value=float(tags[VALUE_TAG]),
                             fingerprint=tags.get(FINGERPRINT_TAG), fold=_int(tags.get(FOLD_TAG)))
    if not version.run_id:
        return ModelEvidence(version=str(version.version))
    run = client.get_run(version.run_id)
    inputs = getattr(run.inputs, "dataset_inputs", None) or []
    digest = inputs[0].dataset.digest if inputs else None
    value = run.data.metrics.get(metric)
    return ModelEvidence(version=str(version.version), metric=metric if value is not None else None, value=value,
                         fingerprint=digest, fold=_int(run.data.params.get("data.fold")))


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def alias_holder(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


class Registration(BaseModel):
    version: str
    alias_moved: bool
    reason: str


def register_candidate(uri: str, model_uri: str, name: str, alias: str, mode: str, evidence: ModelEvidence,
                       extra_tags: dict[str, str]) -> Registration:
    """Register `model_uri` as a new version with its evidence; move `alias` if `decide_alias` says so."""
    from crossdim.tracking import register

    client = _client(uri)
    version = register(uri, model_uri, name)
    for key, value in {**evidence_tags(evidence), **extra_tags}.items():
        client.set_model_version_tag(name, version, key, value)
    candidate = evidence.model_copy(update={"version": version})
    holder = alias_holder(client, name, alias)
    held = read_evidence(client, holder, str(evidence.metric)) if holder is not None else None
    decision = decide_alias(candidate, held, alias, mode)
    if decision.move:
        client.set_registered_model_alias(name, alias, version)
    return Registration(version=version, alias_moved=decision.move, reason=decision.reason)


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)
