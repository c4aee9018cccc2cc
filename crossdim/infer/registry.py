"""MLflow registry access with one-line errors: reachability, URI parsing, version resolution.

A model URI is `models:/name@alias`, `models:/name/version`, `runs:/<run_id>/<path>`, or a local
directory. Registry problems raise `RegistryError` naming the URI and what is missing.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PROBE_TIMEOUT_S = 5.0
_MODELS_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))/?$")
_RUNS_RE = re.compile(r"^runs:/(?P<run_id>[^/]+)/(?P<path>.+?)/?$")


class RegistryError(ValueError):
    """A model URI that cannot be resolved: unknown name/alias/version/run or unreachable registry."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model URI pinned to an immutable source."""

    uri: str  # as given
    download_uri: str  # pinned: models:/name/<version> or runs:/id/path
    tracking_uri: str
    name: str | None = None
    version: str | None = None
    run_id: str | None = None

    @property
    def pinned(self) -> str:
        return f"{self.tracking_uri}|{self.download_uri}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def is_registry_uri(uri: str) -> bool:
    return uri.startswith(("models:/", "runs:/"))


def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast (instead of MLflow's minutes of retries) when an HTTP tracking server is down.

    Any HTTP answer, even 401/404, counts as reachable; only connection failures do not."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RegistryError(f"MLflow tracking server {uri} is unreachable ({reason})") from None


def client() -> Any:
    """An MlflowClient on the current tracking URI, after a reachability probe."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    check_reachable(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def mlflow_message(exc: BaseException) -> str:
    """The first line of an MLflow error, without its long JSON tail."""
    text = getattr(exc, "message", None) or str(exc)
    return text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__


def resolve(uri: str) -> ResolvedModel:
    """Pin `models:/name@alias` or `models:/name/version` to a version, check `runs:/` runs exist."""
    models = _MODELS_RE.match(uri)
    if models:
        return _resolve_registered(uri, models["name"], models["alias"], models["version"])
    runs = _RUNS_RE.match(uri)
    if runs:
        return _resolve_run(uri, runs["run_id"], runs["path"])
    raise RegistryError(f"{uri}: not a model URI (expected models:/name@alias, models:/name/version, "
                        "runs:/<run_id>/<path> or a local checkpoint directory)")


def _resolve_registered(uri: str, name: str, alias: str | None, version: str | None) -> ResolvedModel:
    mlflow_client = client()
    registered = get_registered_model(mlflow_client, name, uri)
    if alias is not None:
        aliases = dict(registered.aliases or {})
        if alias not in aliases:
            known = ", ".join(sorted(aliases)) or "none"
            raise RegistryError(f"{uri}: registered model '{name}' has no alias '{alias}' (aliases: {known})")
        version = str(aliases[alias])
    found = get_version(mlflow_client, name, str(version), uri)
    return ResolvedModel(uri=uri, download_uri=f"models:/{name}/{found.version}", tracking_uri=tracking_uri(),
                         name=name, version=str(found.version), run_id=found.run_id)


def get_version(mlflow_client: Any, name: str, version: str, what: str) -> Any:
    from mlflow.exceptions import MlflowException

    if not version.isdigit():
        raise RegistryError(f"{what}: version must be a positive integer (or use @alias), got '{version}'")
    try:
        return mlflow_client.get_model_version(name, version)
    except MlflowException:
        raise RegistryError(f"{what}: registered model '{name}' has no version {version}") from None


def get_registered_model(mlflow_client: Any, name: str, what: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or "not found" in str(exc).lower():
            raise RegistryError(f"{what}: no registered model named '{name}' in {tracking_uri()}") from None
        raise RegistryError(f"{what}: registry error ({mlflow_message(exc)})") from None


def _resolve_run(uri: str, run_id: str, path: str) -> ResolvedModel:
    from mlflow.exceptions import MlflowException

    try:
        client().get_run(run_id)
    except MlflowException:
        raise RegistryError(f"{uri}: no run '{run_id}' in {tracking_uri()}") from None
    return ResolvedModel(uri=uri, download_uri=uri, tracking_uri=tracking_uri(), run_id=run_id)
