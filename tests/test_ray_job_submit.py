"""`ray job submit` end to end on a real local Ray cluster (issue 7).

A head node is started with `ray start --head` bound to 127.0.0.1 (2 CPUs, token auth, its own temp
dir); a synthetic MSD dataset is written with `crossdim synth`, then the preprocess -> train
(+ register under an alias) -> tune (2 trials) -> predict (`models:/name@alias`) pipelines are
submitted as jobs with `--working-dir .`. Shards and checkpoints live on the moto S3 endpoint,
tracking on a real `mlflow server`. Credentials reach the jobs through the cluster's environment
(never through the runtime env JSON or the command line), and never appear in job logs or MLflow
params. Jobs run the repository's code (the uploaded working dir) on the cluster's Python: the head
node's PATH starts with this venv's bin/, so the entrypoint's `python` is the venv's. The test
stops only the processes of the cluster it started.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.servers import BIN, free_ports

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SECRET = "testing-secret-do-not-log"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXCLUDES = [".venv", ".git", "tests", "bench", "infra", "*.nii.gz", "mlflow.db", "mlruns"]
TINY_DXNET = ["model.arch=dxnet", "model.encoder=test_efficientnet", "data.patch_size=[32,32,16]",
              "scaling.num_workers=1", "scaling.cpus_per_worker=0.5", "optim.name=adamw", "validation.hd95=false",
              "max_failures=0"]


def _ray(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def cluster_pids(temp_dir: Path, gcs_port: int) -> set[int]:
    """The processes of this cluster only: those naming its temp dir or GCS port, and their descendants."""
    table = subprocess.run(["ps", "-ww", "-e", "-o", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in table.splitlines() if len(line.split(None, 2)) == 3]
    mine = re.compile(rf"{re.escape(str(temp_dir))}|:{gcs_port}\b")  # the GCS may bind a non-loopback IP
    pids = {int(pid) for pid, _, args in rows if mine.search(args)}
    pids.discard(os.getpid())
    grown = True
    while grown:
        children = {int(pid) for pid, ppid, _ in rows if int(ppid) in pids} - pids - {os.getpid()}
        pids |= children
        grown = bool(children)
    return pids


def stop_cluster(temp_dir: Path, gcs_port: int) -> None:
    """SIGTERM then SIGKILL this cluster's processes (`ray stop` would stop every Ray of this user)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 1)):
        for pid in cluster_pids(temp_dir, gcs_port):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(wait)


def own_ports(ports: list[int]) -> list[str]:
    """Flags giving the services that default to fixed ports (another Ray on the machine holds
    those) 5 of the distinct free `ports`."""
    flags = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port", "ray-client-server-port")
    return [f"--{flag}={port}" for flag, port in zip(flags, ports, strict=True)]


@pytest.fixture
def ray_head(moto_s3, mlflow_server, tmp_path):
    """A fresh head node (own temp dir and ports) whose environment carries the S3/MLflow settings."""
    env = dict(os.environ)
    env.update(moto_s3.env)
    env.update({"MLFLOW_TRACKING_URI": mlflow_server, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
                "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "CROSSDIM_CACHE_DIR": str(tmp_path / "model-cache")})
    env.pop("RAY_ADDRESS", None)
    port, dashboard, *others = free_ports(7)
    temp_dir = Path("/tmp") / f"ray-e2e-{os.getpid()}-{port}"  # short: Ray's socket paths are length-limited
    try:
        started = _ray(["start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}",
                        "--include-dashboard=true", "--disable-usage-stats", *own_ports(others)], env, timeout=240)
        assert started.returncode == 0, started.stderr[-3000:]
        env["RAY_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
        yield env
    finally:
        stop_cluster(temp_dir, port)
        assert not cluster_pids(temp_dir, port), "processes of the test's cluster survived"


def submit(env: dict, *entrypoint: str) -> str:
    """`ray job submit` (waits for the job); asserts success and clean logs; returns `ray job logs` output."""
    runtime_env = json.dumps({"env_vars": {"PYTHONUNBUFFERED": "1"}, "excludes": EXCLUDES})
    assert SECRET not in runtime_env
    deadline = time.time() + 120  # right after `ray start` the job agent may not be registered yet
    while True:
        proc = _ray(["job", "submit", "--working-dir", ".", "--runtime-env-json", runtime_env,
                     "--", "python", "-m", *entrypoint], env)
        if "No available agent" not in proc.stdout + proc.stderr or time.time() > deadline:
            break
        time.sleep(3)
    match = re.search(r"raysubmit_\w+", proc.stdout + proc.stderr)
    assert match, proc.stdout[-2000:] + proc.stderr[-2000:]
    job_id = match.group(0)
    logs = _ray(["job", "logs", job_id], env, timeout=120)
    assert logs.returncode == 0, logs.stderr[-2000:]
    status = ANSI.sub("", _ray(["job", "status", job_id], env, timeout=120).stdout)
    assert f"Job '{job_id}' succeeded" in status, f"job {entrypoint[0]} failed ({status[-300:]}):\n{logs.stdout[-4000:]}"
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert SECRET not in logs.stdout + proc.stdout + proc.stderr, "a credential leaked into the job output"
    return logs.stdout


def last_json(text: str) -> dict:
    """The summary a train/tune job prints last (an indented JSON object)."""
    start = text.rindex("\n{\n") + 1
    return json.loads(text[start:text.index("\n}", start) + 2])


def assert_no_secret_in_run(client, run_id: str) -> dict:
    data = client.get_run(run_id).data
    assert not any(SECRET in f"{k}={v}" for k, v in [*data.params.items(), *data.tags.items()])
    return data.params


def test_preprocess_train_tune_predict_as_jobs(ray_head, moto_s3, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    env, pid = ray_head, os.getpid()
    for out, cases, seed in ((tmp_path / "raw", 6, 0), (tmp_path / "heldout", 1, 77)):
        made = subprocess.run([str(BIN / "crossdim"), "synth", "--format", "msd", "--out", str(out), "--cases",
                               str(cases), "--seed", str(seed)], env=env, capture_output=True, text=True, timeout=300)
        assert made.returncode == 0, made.stderr[-2000:]
    shards = moto_s3.uri("shards/msd")

    logs = submit(env, "pipelines.preprocess", "--format", "msd", "--input", str(tmp_path / "raw"),
                  "--output", shards, "--no-progress", "--set", "crop_foreground=false", "--set", "num_folds=2")
    assert "6 case(s)" in logs
    assert "shards/msd/manifest.json" in moto_s3.keys("shards/msd/")

    name = f"e2e-{pid}"
    overrides = [*TINY_DXNET, f"data.manifest={shards}", f"storage_path={moto_s3.uri('runs')}", f"name={name}",
                 "epochs=2", "steps_per_epoch=3", "tracking.registered_model_name=e2e-dxnet",
                 "tracking.alias=champion"]
    summary = last_json(submit(env, "pipelines.train", *[a for o in overrides for a in ("--set", o)]))
    assert summary["epochs_completed"] == 2 and summary["registered_version"] == "1"
    assert summary["checkpoint"] == moto_s3.uri(f"runs/{name}/epoch_0001")
    assert f"runs/{name}/epoch_0001/model.safetensors" in moto_s3.keys(f"runs/{name}/")
    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias("e2e-dxnet", "champion")
    assert version.version == "1" and version.run_id == summary["mlflow_run_id"]
    params = assert_no_secret_in_run(client, version.run_id)
    assert params["storage_path"] == moto_s3.uri("runs") and params["model.arch"] == "dxnet"

    sweep = [f"name=e2e-sweep-{pid}", "search_alg=grid", "num_samples=1", "scheduler=none", "max_concurrent_trials=1",
             "search_space={model.encoder: {values: [test_efficientnet, test_resnet]}}",
             "registered_model_name=e2e-sweep", "alias=champion", "train.epochs=1", "train.steps_per_epoch=2",
             f"train.data.manifest={shards}", f"train.storage_path={moto_s3.uri('sweeps')}",
             *[f"train.{o}" for o in TINY_DXNET]]
    result = last_json(submit(env, "pipelines.tune", *[a for o in sweep for a in ("--set", o)]))
    assert result["status"] == "finished" and len(result["trials"]) == 2
    assert sorted(t["params"]["model.encoder"] for t in result["trials"]) == ["test_efficientnet", "test_resnet"]
    assert all(t["status"] == "finished" and t["epochs"] == 1 for t in result["trials"]), result["trials"]
    assert result["registered_version"] == "1" and result["alias_moved"]
    best = client.get_model_version_by_alias("e2e-sweep", "champion")
    assert best.run_id == next(t["run_id"] for t in result["trials"] if t["trial_id"] == result["best_trial_id"])
    for trial in result["trials"]:
        assert_no_secret_in_run(client, trial["run_id"])
    assert any(k.startswith(f"sweeps/e2e-sweep-{pid}") for k in moto_s3.keys("sweeps/")), "no sweep state on S3"

    case = sorted((tmp_path / "heldout").glob("imagesTr/*.nii.gz"))[0]
    out = tmp_path / "pred" / "case.nii.gz"
    submit(env, "pipelines.predict", "--model", "models:/e2e-dxnet@champion", "--input", str(case),
           "--output", str(out))
    src, pred = nib.load(str(case)), nib.load(str(out))
    assert pred.shape == src.shape[:3]
    np.testing.assert_allclose(pred.affine, src.affine, atol=1e-5)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}  # MSD synth labels: organ, lesion
