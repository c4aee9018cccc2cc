"""crossdim doctor: every check against real local servers (moto S3, mlflow server, Ray) or dead ports."""

from __future__ import annotations

import argparse
import json
import os
import time

import pytest

from crossdim import doctor
from crossdim.doctor import Check, format_table, run_doctor
from tests.servers import free_port

SECRET = "testing-secret-do-not-log"


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def doctor_args(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    doctor.add_arguments(parser)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items() if v is not True]
    argv += [f"--{k}" for k, v in kw.items() if v is True]
    return parser.parse_args(argv)


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    """No credentials anywhere boto3 looks: env, profile files, container/instance metadata."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


# ----------------------------------------------------------------------------- all ok
@pytest.mark.slow
def test_all_ok_against_moto_and_mlflow_server(moto_s3, mlflow_server, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    storage = moto_s3.uri("runs")
    # A generous timeout: this runs beside other jobs on 2 CPUs; the fail tests below are the fast ones.
    code = doctor.main(doctor_args(storage=storage, timeout=30, json=True))
    out = capsys.readouterr()
    checks = [Check(**row) for row in json.loads(out.out)]
    rows = by_name(checks)
    assert [c for c in checks if c.status != "ok"] == []
    assert code == 0
    assert set(rows) == {"packages", "torch/CUDA", "ray", "mlflow", "s3 credentials", "s3 endpoint", "storage"}
    assert "local mode" in rows["ray"].detail
    assert rows["mlflow"].detail.startswith(f"{mlflow_server}: healthy")
    assert "...ting" in rows["s3 credentials"].detail  # last 4 chars of the key id "testing" only
    assert moto_s3.endpoint in rows["s3 endpoint"].detail
    assert "written and deleted" in rows["storage"].detail
    assert moto_s3.keys("runs") == []  # the write probe cleaned up after itself
    table = format_table(checks)
    assert table.endswith("7 ok, 0 warn, 0 fail")
    for text in (out.out, out.err, table):
        assert SECRET not in text and "testing" not in text


# ----------------------------------------------------------------------------- failures, each fast
def test_dead_mlflow_port_fails_fast(monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    [row] = doctor.check_mlflow(None, timeout=2)
    assert time.monotonic() - start < 5
    assert row.status == "fail"
    assert uri in row.detail and "not reachable" in row.detail
    assert "MLFLOW_TRACKING_URI" in row.fix


def test_missing_bucket_fails_with_create_command(moto_s3):
    start = time.monotonic()
    rows = by_name(doctor.check_s3("s3://no-such-bucket-crossdim/runs", timeout=3))
    assert time.monotonic() - start < 10
    assert rows["s3 credentials"].status == "ok" and rows["s3 endpoint"].status == "ok"
    assert rows["storage"].status == "fail"
    assert "bucket 'no-such-bucket-crossdim' does not exist" in rows["storage"].detail
    assert f"aws s3 mb s3://no-such-bucket-crossdim --endpoint-url {moto_s3.endpoint}" in rows["storage"].fix


def test_missing_credentials_fail_for_s3_storage(no_aws_credentials, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    start = time.monotonic()
    rows = by_name(doctor.check_s3("s3://some-bucket/runs", timeout=2))
    assert time.monotonic() - start < 5
    assert rows["s3 credentials"].status == "fail"
    assert "no S3 credentials found" in rows["s3 credentials"].detail
    assert "AWS_ACCESS_KEY_ID" in rows["s3 credentials"].fix
    assert "storage" not in rows  # no bucket probe without credentials


def test_half_set_credentials_name_the_missing_variable(no_aws_credentials, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    row = doctor.check_s3_credentials(required=True)
    assert row.status == "fail" and "AWS_ACCESS_KEY_ID is not set" in row.detail
    assert SECRET not in row.detail + row.fix


def test_credentials_are_optional_without_s3(no_aws_credentials, monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    rows = by_name(doctor.check_s3(str(tmp_path / "runs"), timeout=2))
    assert rows["s3"].status == "ok" and "not used" in rows["s3"].detail
    assert rows["storage"].status == "ok" and "will be created" in rows["storage"].detail


@pytest.mark.parametrize("scheme", ["", "http://", "ray://"])
def test_unreachable_ray_address_fails_fast(monkeypatch, scheme):
    address = f"{scheme}127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    start = time.monotonic()
    [row] = doctor.check_ray(None, timeout=2)
    assert time.monotonic() - start < 3
    assert row.status == "fail"
    assert address in row.detail and "cannot connect" in row.detail
    assert "RAY_ADDRESS" in row.fix


def test_no_ray_address_is_local_mode(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    [row] = doctor.check_ray(None, timeout=1)
    assert row.status == "ok" and "local mode" in row.detail


def test_bad_ray_address_is_one_line_fail():
    [row] = doctor.check_ray("http://:8265", timeout=1)
    assert row.status == "fail" and "no host" in row.detail


def test_main_exits_1_on_failure_and_never_prints_secrets(moto_s3, monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    dead_mlflow = f"http://user:{SECRET}@127.0.0.1:{free_port()}"
    code = doctor.main(doctor_args(tracking_uri=dead_mlflow, storage="s3://no-such-bucket-crossdim/x", json=True))
    out = capsys.readouterr()
    assert code == 1
    rows = {r["name"]: r for r in json.loads(out.out)}
    assert {rows[n]["status"] for n in ("ray", "mlflow", "storage")} == {"fail"}
    assert "user:***@" in rows["mlflow"]["detail"]
    assert SECRET not in out.out + out.err


# ----------------------------------------------------------------------------- MLflow sqlite
def test_sqlite_store_new_then_existing(local_mlflow, tmp_path):
    [row] = doctor.check_mlflow(None, timeout=2)
    assert row.status == "ok" and "created on first run" in row.detail
    import mlflow

    mlflow.set_tracking_uri(local_mlflow)
    mlflow.MlflowClient().create_experiment("doctor-check")
    [row] = doctor.check_mlflow(None, timeout=2)
    assert row.status == "ok" and "2 experiment(s) listed" in row.detail  # Default + ours


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_storage_dir_fails(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        row = doctor.check_local_dir("storage", str(locked / "runs"))
    finally:
        locked.chmod(0o700)
    assert row.status == "fail" and "not writable" in row.detail


# ----------------------------------------------------------------------------- pure parts
def test_summarize_ray_rows():
    ok = doctor.summarize_ray("h:6379", {"version": doctor._installed_version("ray"), "nodes": 3,
                                         "resources": {"CPU": 24.0, "GPU": 2.0}})
    assert ok.status == "ok" and "3 node(s), CPU 24, GPU 2" in ok.detail
    no_gpu = doctor.summarize_ray("h:6379", {"version": doctor._installed_version("ray"), "nodes": 1,
                                             "resources": {"CPU": 4.0}})
    assert no_gpu.status == "warn" and "scaling.use_gpu=false" in no_gpu.fix
    mismatch = doctor.summarize_ray("h:6379", {"version": "0.0.1", "nodes": 1, "resources": {"GPU": 1.0}})
    assert mismatch.status == "warn" and "ray==0.0.1" in mismatch.fix


def test_redact_scrubs_env_secrets_and_url_passwords(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    text = doctor.redact(f"failed: key {SECRET} at https://alice:hunter22@mlflow.example.org/api")
    assert SECRET not in text and "hunter22" not in text
    assert "***" in text and "https://alice:***@mlflow.example.org/api" in text
    assert doctor.key_hint("AKIA" + "ABCDEFGHIJKLWXYZ") == "...WXYZ"


def test_format_table_wraps_and_counts():
    checks = [Check("a", "ok", "short"), Check("b", "fail", "x " * 60, "do this"), Check("c", "warn", "w")]
    table = format_table(checks, detail_width=40, fix_width=20)
    lines = table.splitlines()
    assert lines[0].split() == ["check", "status", "detail", "how", "to", "fix"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert max(len(line) for line in lines) <= 5 + 2 + 6 + 2 + 40 + 2 + 20
    assert sum(line.startswith("b ") for line in lines) == 1 and len(lines) > 6  # b's detail wrapped
    assert lines[-1] == "1 ok, 1 warn, 1 fail"


def test_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout must be > 0"):
        run_doctor(timeout=0)


def test_probe_environment_is_restored(monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    with doctor.probe_environment(2.5):
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "3"
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7"


# ----------------------------------------------------------------------------- a real Ray head
@pytest.mark.slow
def test_reachable_ray_reports_resources(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ctx = ray.init(num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1",
                   dashboard_port=free_port(), logging_level="ERROR")
    try:
        [row] = doctor.check_ray(f"http://{ctx.dashboard_url}", timeout=5)
    finally:
        ray.shutdown()
    assert row.status == "warn"  # reachable, but no GPUs on this CPU machine
    assert f"Ray {ray.__version__}, 1 node(s), CPU 1, GPU 0" in row.detail


def test_storage_under_a_file_fails(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    row = doctor.check_local_dir("storage", str(blocker / "runs"))
    assert row.status == "fail" and f"{blocker} is not a directory" in row.detail


def test_torch_row_lists_gpus(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H200")
    row = doctor.check_torch()
    assert row.status == "ok" and "2 GPU(s): NVIDIA H200" in row.detail


@pytest.mark.parametrize("message, hint", [
    ("API request to http://h/api failed: Read timed out", "larger --timeout"),
    ("API request failed with code 403 != 200", "--allowed-hosts"),
    ("API request failed with code 401 != 200", "MLFLOW_TRACKING_USERNAME"),
    ("Detected out-of-date database schema", "mlflow db upgrade"),
])
def test_mlflow_failures_get_specific_fixes(message, hint):
    assert hint in doctor._mlflow_fix(message)


def test_main_checks_the_storage_and_tracking_of_a_train_config(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = tmp_path / "train.yaml"
    config.write_text(f"storage_path: {tmp_path / 'runs'}\ntracking:\n  tracking_uri: sqlite:///{tmp_path / 'm.db'}\n")
    code = doctor.main(doctor_args(config=config, json=True))
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert code == 0
    assert rows["storage"]["detail"].startswith(f"{tmp_path / 'runs'}: will be created")
    assert rows["mlflow"]["detail"].startswith(f"sqlite:///{tmp_path / 'm.db'}: local store")


def test_main_reports_a_bad_config_field_in_one_line(tmp_path):
    from crossdim.config import ConfigError

    config = tmp_path / "train.yaml"
    config.write_text("storage_pth: /tmp/x\n")
    with pytest.raises(ConfigError, match="field 'storage_pth': unknown field"):
        doctor.main(doctor_args(config=config))
