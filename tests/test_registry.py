"""Registry helpers: `crossdim models list|promote` on a local sqlite MLflow store."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest

from crossdim.infer.registry import RegistryError, resolve
from crossdim.registry_cli import add_arguments, list_models, main, promote
from tests.servers import free_port


def _register(tmp_path: Path, name: str, count: int) -> list[str]:
    import mlflow
    from mlflow.tracking import MlflowClient

    exp = mlflow.create_experiment(f"exp-{name}", artifact_location=(tmp_path / "artifacts").as_uri())
    client = MlflowClient()
    client.create_registered_model(name)
    versions = []
    for i in range(count):
        with mlflow.start_run(experiment_id=exp) as run:
            f = tmp_path / f"weights{i}.txt"
            f.write_text(str(i))
            mlflow.log_artifact(str(f), artifact_path="model")
        source = f"{run.info.artifact_uri}/model"
        versions.append(client.create_model_version(name, source, run_id=run.info.run_id).version)
    return [str(v) for v in versions]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_list_and_promote_round_trip(local_mlflow, tmp_path, capsys):
    assert _register(tmp_path, "seg", 2) == ["1", "2"]
    _register(tmp_path, "other", 1)
    rows = list_models("seg")
    assert [(r.name, r.version, r.aliases) for r in rows] == [("seg", "2", []), ("seg", "1", [])]
    assert {r.name for r in list_models()} == {"seg", "other"}

    info = promote("seg", 1, "champion")
    assert info.version == "1" and info.aliases == ["champion"]
    assert resolve("models:/seg@champion").version == "1"
    assert main(_parse(["promote", "seg", "2", "--alias", "champion"])) == 0  # moves the alias
    assert capsys.readouterr().out.strip() == "models:/seg@champion -> version 2"
    assert resolve("models:/seg@champion").download_uri == "models:/seg/2"

    assert main(_parse(["list", "seg"])) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "VERSION", "ALIASES", "STATUS", "RUN"]
    assert table[1].split()[:3] == ["seg", "2", "champion"] and table[2].split()[:3] == ["seg", "1", "-"]


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: list_models("nope"), "no registered model named 'nope'"),
        (lambda: promote("nope", 1, "champion"), "no registered model named 'nope'"),
        (lambda: promote("seg", 7, "champion"), "has no version 7"),
        (lambda: promote("seg", "x", "champion"), "version must be a positive integer"),
        (lambda: promote("seg", 1, "bad alias!"), "not a valid alias"),
        (lambda: resolve("models:/seg@staging"), "has no alias 'staging' (aliases: none)"),
        (lambda: resolve("models:/seg/9"), "has no version 9"),
        (lambda: resolve("models:/ghost@champion"), "no registered model named 'ghost'"),
        (lambda: resolve("runs:/0123456789abcdef/model"), "no run '0123456789abcdef'"),
        (lambda: resolve("s3://bucket/model"), "not a model URI"),
    ],
)
def test_unknown_names_and_versions_are_one_line_errors(local_mlflow, tmp_path, call, needle):
    _register(tmp_path, "seg", 1)
    with pytest.raises(RegistryError) as info:
        call()
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_unreachable_registry_fails_fast(monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    start = time.monotonic()
    with pytest.raises(RegistryError, match=f"MLflow tracking server {url} is unreachable") as info:
        list_models()
    assert "\n" not in str(info.value)
    with pytest.raises(RegistryError, match="unreachable"):
        resolve("models:/seg@champion")
    assert time.monotonic() - start < 10
