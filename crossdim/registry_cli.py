"""`crossdim models list [NAME]` and `crossdim models promote NAME VERSION --alias A`.

Thin wrappers on MlflowClient (tracking URI from MLFLOW_TRACKING_URI) with one-line errors for
unknown names and versions and for an unreachable server.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from crossdim.infer.registry import RegistryError, client, get_registered_model, get_version, mlflow_message

_ALIAS_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: str
    aliases: list[str] = field(default_factory=list)
    run_id: str | None = None
    status: str | None = None
    source: str | None = None
    created_ms: int | None = None


def list_models(name: str | None = None) -> list[ModelVersionInfo]:
    """Every version of every registered model (or of `name`), newest version first per model."""
    mlflow_client = client()
    if name is not None:
        get_registered_model(mlflow_client, name, f"models list {name}")
        names = [name]
    else:
        names = sorted(m.name for m in _search_all(mlflow_client.search_registered_models))
    rows: list[ModelVersionInfo] = []
    for model_name in names:
        rows.extend(_versions_of(mlflow_client, model_name))
    return rows


def _versions_of(mlflow_client: Any, name: str) -> list[ModelVersionInfo]:
    # search_model_versions leaves aliases empty on some stores: take them from the model itself.
    aliases: dict[str, list[str]] = {}
    for alias, version in (mlflow_client.get_registered_model(name).aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    versions = _search_all(mlflow_client.search_model_versions, filter_string=f"name = '{_quote(name)}'")
    rows = [replace(_info(v), aliases=sorted(aliases.get(str(v.version), []))) for v in versions]
    return sorted(rows, key=lambda r: -int(r.version))


def promote(name: str, version: str | int, alias: str) -> ModelVersionInfo:
    """Point `alias` (e.g. champion) at `version` of `name`; returns the promoted version."""
    if not _ALIAS_RE.match(alias) or alias.isdigit() or alias.lower() == "latest":
        raise RegistryError(f"--alias {alias!r}: not a valid alias (letters, digits, '_' or '-', "
                            "not a number, not 'latest')")
    mlflow_client = client()
    get_registered_model(mlflow_client, name, f"models promote {name}")
    get_version(mlflow_client, name, str(version), f"models promote {name} {version}")
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.set_registered_model_alias(name, alias, str(version))
    except MlflowException as exc:
        raise RegistryError(f"models promote {name} {version}: {mlflow_message(exc)}") from None
    return _info(mlflow_client.get_model_version(name, str(version)))


def _search_all(search: Any, **kwargs: Any) -> list[Any]:
    out: list[Any] = []
    token = None
    while True:
        page = search(max_results=200, page_token=token, **kwargs)
        out.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return out


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


def _info(version: Any) -> ModelVersionInfo:
    return ModelVersionInfo(
        name=version.name, version=str(version.version), aliases=sorted(version.aliases or []),
        run_id=version.run_id, status=str(version.status) if version.status else None,
        source=version.source, created_ms=version.creation_timestamp,
    )


def format_table(rows: list[ModelVersionInfo]) -> str:
    header = ("NAME", "VERSION", "ALIASES", "STATUS", "RUN")
    lines = [header] + [(r.name, r.version, ",".join(r.aliases) or "-", r.status or "-", r.run_id or "-")
                        for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", metavar="COMMAND", required=True)
    p_list = sub.add_parser("list", help="list registered models and their versions/aliases")
    p_list.add_argument("name", nargs="?", help="only this registered model")
    p_list.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_promote = sub.add_parser("promote", help="point an alias (e.g. champion) at a model version")
    p_promote.add_argument("name")
    p_promote.add_argument("version")
    p_promote.add_argument("--alias", required=True)


def main(args: argparse.Namespace) -> int:
    if args.models_command == "list":
        rows = list_models(args.name)
        print(json.dumps([asdict(r) for r in rows], indent=2) if args.json else format_table(rows))
        return 0
    info = promote(args.name, args.version, args.alias)
    print(f"models:/{info.name}@{args.alias} -> version {info.version}")
    return 0
