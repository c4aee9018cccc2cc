"""Real local servers for tests, bound to 127.0.0.1, started and stopped by the fixtures.

- `moto_s3`: a moto S3 server; sets AWS_* and AWS_ENDPOINT_URL (via monkeypatch) and yields
  a small object with `.endpoint`, `.bucket` (created) and `.uri(prefix)`.
- `mlflow_server`: a real `mlflow server` (sqlite backend, artifacts on the moto S3); sets
  MLFLOW_TRACKING_URI and yields its URL.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: all bound at once, so the OS cannot hand the same one out twice
    (one at a time, a port just released can come back at once: seen as two Ray components on one port)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception as exc:  # noqa: BLE001 - polling
            last = exc
            time.sleep(0.3)
    raise TimeoutError(f"{url} not up after {timeout}s ({last})")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-do-not-log",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    env: dict

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **_boto_kwargs(self.env))

    def keys(self, prefix: str = "") -> list[str]:
        out = []
        paginator = self.client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            out.extend(o["Key"] for o in page.get("Contents", []))
        return sorted(out)


def _boto_kwargs(env: dict) -> dict:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }


@pytest.fixture(scope="session")
def moto_s3_server(tmp_path_factory):
    """One moto server per test session (cheap to share; each test gets its own bucket)."""
    port = free_port()
    exe = shutil.which("moto_server", path=str(BIN)) or shutil.which("moto_server")
    if exe is None:
        raise RuntimeError("moto_server not found: install the dev extras (pip install -e '.[dev]')")
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint + "/moto-api/", 30, proc)
        yield endpoint
    finally:
        stop(proc)
        log.close()


@pytest.fixture
def moto_s3(moto_s3_server, monkeypatch) -> S3Server:
    env = dict(S3_ENV, AWS_ENDPOINT_URL=moto_s3_server)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", moto_s3_server)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"crossdim-test-{uuid.uuid4().hex[:10]}"
    server = S3Server(endpoint=moto_s3_server, bucket=bucket, env=env)
    server.client().create_bucket(Bucket=bucket)
    return server


@pytest.fixture
def mlflow_server(moto_s3, tmp_path, monkeypatch) -> str:
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend and artifacts on the moto S3.

    Artifacts are proxied through the server, so clients need no S3 credentials of their own.
    """
    port = free_port()
    env = dict(os.environ)
    env.update(moto_s3.env)
    env["MLFLOW_S3_ENDPOINT_URL"] = moto_s3.endpoint
    env["AWS_ENDPOINT_URL"] = moto_s3.endpoint
    db = tmp_path / "mlflow.db"
    log_path = tmp_path / "mlflow-server.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{db}",
         "--artifacts-destination", moto_s3.uri("mlartifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_http(url + "/health", 240, proc)
        except Exception:
            log.flush()
            raise RuntimeError(f"mlflow server did not start:\n{log_path.read_text()[-3000:]}") from None
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        yield url
    finally:
        stop(proc)
        log.close()


@pytest.fixture
def local_mlflow(tmp_path, monkeypatch) -> str:
    """The embedded default: a local sqlite tracking store in the test's tmp dir."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
