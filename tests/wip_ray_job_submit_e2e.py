"""WORK IN PROGRESS (not collected: rename to test_*.py once it passes on a quiet machine).

`ray job submit` end to end on a real local Ray cluster (issue 7).

A head node is started with `ray start --head` bound to 127.0.0.1 (2 CPUs); the preprocess ->
train (+ register) -> predict pipelines are submitted as jobs with `--working-dir .`, shards and
checkpoints live on the moto S3 endpoint and tracking on a real `mlflow server`. Credentials reach
the jobs through the cluster's environment (never through the runtime env JSON or the command
line). The test stops only the cluster it started.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.servers import BIN, free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SECRET = "testing-secret-do-not-log"


def _ray(args: list[str], env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def ray_head(moto_s3, mlflow_server, tmp_path):
    """A fresh head node (own temp dir and ports) whose environment carries the S3/MLflow settings."""
    env = dict(os.environ)
    env.update(moto_s3.env)
    env.update({"MLFLOW_TRACKING_URI": mlflow_server, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
                "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                "CROSSDIM_CACHE_DIR": str(tmp_path / "model-cache")})
    env.pop("RAY_ADDRESS", None)
    port, dashboard = free_port(), free_port()
    temp_dir = Path("/tmp") / f"ray-e2e-{os.getpid()}-{port}"  # short: Ray's socket paths are length-limited
    started = _ray(["start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}",
                    "--include-dashboard=true", "--disable-usage-stats"], env, timeout=180)
    assert started.returncode == 0, started.stderr[-3000:]
    address = f"http://127.0.0.1:{dashboard}"
    env["RAY_ADDRESS"] = address
    try:
        yield address, env
    finally:
        # Stop only this cluster: `ray stop` would stop every Ray instance of this user.
        gcs = f"127.0.0.1:{port}"
        pids = subprocess.run(["pgrep", "-f", f"{temp_dir}|{gcs}"], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 15)
            except (ProcessLookupError, ValueError):
                pass
        time.sleep(3)
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass


def submit(address: str, env: dict, *entrypoint: str) -> tuple[str, str]:
    """`ray job submit` (waits for the job); returns (job id, `ray job logs` output)."""
    runtime_env = json.dumps({"env_vars": {"PYTHONUNBUFFERED": "1"},
                              "excludes": [".venv", ".git", "tests", "bench", "*.nii.gz"]})
    proc = _ray(["job", "submit", f"--address={address}", "--working-dir", ".", "--runtime-env-json", runtime_env,
                 "--", "python", "-m", *entrypoint], env)
    match = re.search(r"raysubmit_\w+", proc.stdout + proc.stderr)
    assert match, proc.stdout[-2000:] + proc.stderr[-2000:]
    job_id = match.group(0)
    logs = _ray(["job", "logs", f"--address={address}", job_id], env, timeout=120)
    assert logs.returncode == 0, logs.stderr[-2000:]
    status = _ray(["job", "status", f"--address={address}", job_id], env, timeout=120)
    assert "SUCCEEDED" in status.stdout + status.stderr, f"job {entrypoint} failed:\n{logs.stdout[-4000:]}"
    assert SECRET not in logs.stdout, "a credential leaked into the job logs"
    return job_id, logs.stdout


def test_preprocess_train_register_predict_as_jobs(ray_head, moto_s3, mlflow_server, tmp_path):
    from crossdim.data.synth import write_synthetic

    address, env = ray_head
    raw = write_synthetic("msd", str(tmp_path / "raw"), 6, seed=0)
    heldout = write_synthetic("msd", str(tmp_path / "heldout"), 1, seed=77)
    shards = moto_s3.uri("shards/msd")

    _, logs = submit(address, env, "pipelines.preprocess", "--format", "msd", "--input", raw, "--output", shards,
                     "--no-progress")
    assert "6 case(s)" in logs
    assert "shards/msd/manifest.json" in moto_s3.keys("shards/msd/")

    name = f"e2e-{os.getpid()}"
    _, logs = submit(address, env, "pipelines.train",
                     "--set", "model.arch=dxnet", "--set", "model.encoder=test_efficientnet",
                     "--set", f"data.manifest={shards}", "--set", "data.patch_size=[32,32,16]",
                     "--set", f"storage_path={moto_s3.uri('runs')}", "--set", f"name={name}",
                     "--set", "epochs=2", "--set", "steps_per_epoch=4", "--set", "scaling.num_workers=1",
                     "--set", "scaling.cpus_per_worker=0.5", "--set", "optim.name=adamw",
                     "--set", "tracking.registered_model_name=e2e-dxnet", "--set", "tracking.alias=champion")
    assert any(k.startswith(f"runs/{name}/") for k in moto_s3.keys("runs/")), "no checkpoint on S3"

    from mlflow import MlflowClient

    version = MlflowClient(mlflow_server).get_model_version_by_alias("e2e-dxnet", "champion")
    assert version.version == "1"

    case = sorted(p for p in Path(heldout).glob("imagesTr/*.nii.gz"))[0]
    out = tmp_path / "pred" / "case.nii.gz"
    submit(address, env, "pipelines.predict", "--model", "models:/e2e-dxnet@champion", "--input", str(case),
           "--output", str(out))
    src, pred = nib.load(str(case)), nib.load(str(out))
    assert pred.shape == src.shape[:3]
    np.testing.assert_allclose(pred.affine, src.affine, atol=1e-5)
