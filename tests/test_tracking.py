"""MLflow tracking without Ray: reachability probe, run resume by tag, params without secrets,
lineage, the pyfunc model over a crossdim checkpoint (load, predict, register, alias)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from crossdim import tracking
from crossdim.config import TrainConfig, load_config
from tests.servers import free_port
from tests.test_train_units import BLOB_DATASET, tiny_omnianet

SECRET = "testing-secret-do-not-log"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One local sqlite store for the module (its schema migration is the slow part)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_unreachable_server_fails_fast_in_one_line():
    uri = f"http://user:pw@127.0.0.1:{free_port()}"
    start = time.time()
    with pytest.raises(tracking.TrackingError) as exc:
        tracking.check_tracking(uri)
    assert time.time() - start < 30
    message = str(exc.value)
    assert "\n" not in message and "unreachable" in message
    assert "pw" not in message and "127.0.0.1" in message


def test_default_uri_is_a_local_sqlite_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(None, str(tmp_path)) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking.resolve_tracking_uri("http://x:5000", str(tmp_path)) == "http://x:5000"
    assert tracking.default_tracking_uri("s3://b/p").endswith(".crossdim/mlflow.db")


def test_run_is_resumed_by_tag_and_setup_logs_no_secret(store, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    cfg = load_config(TrainConfig, None, ["name=r1", f"storage_path={tmp_path}", f"data.manifest={tmp_path}/data",
                                          f"model.options={{note: {SECRET}}}", "tracking.tracking_uri=http://u:pw@h:1"])
    run_id, resumed = tracking.start_or_resume_run(store, "exp", str(tmp_path), "r1")
    again, resumed2 = tracking.start_or_resume_run(store, "exp", str(tmp_path), "r1")
    other, _ = tracking.start_or_resume_run(store, "exp", str(tmp_path), "r2")
    assert (resumed, resumed2) == (False, True) and again == run_id and other != run_id
    manifest = {"fingerprint": "f" * 64, "dataset": BLOB_DATASET}
    tracking.log_run_setup(store, run_id, cfg, f"{tmp_path}/data", manifest)
    tracking.log_run_setup(store, run_id, cfg, f"{tmp_path}/data", manifest)  # a resume: no param clash
    run = MlflowClient(store).get_run(run_id)
    params, tags = run.data.params, run.data.tags
    assert params["optim.lr"] == "0.001" and params["name"] == "r1"
    assert params["tracking.tracking_uri"] == "http://h:1"
    assert "model.options.note" not in params
    assert not any(SECRET in str(v) for v in [*params.values(), *tags.values()])
    inputs = run.inputs.dataset_inputs
    assert inputs and inputs[0].dataset.digest == "f" * 36 and inputs[0].dataset.name == "blobs"
    assert str(tmp_path / "data") in inputs[0].dataset.source
    local = MlflowClient(store).download_artifacts(run_id, "config/train.json", str(tmp_path / "dl"))
    text = open(local).read()
    assert SECRET not in text and '"name": "r1"' in text


def test_epoch_logger_logs_metrics_and_pictures(store, tmp_path):
    from mlflow.tracking import MlflowClient

    from crossdim.train.validation import Overlay

    run_id, _ = tracking.start_or_resume_run(store, "exp", str(tmp_path), "pics")
    logger = tracking.EpochLogger(store, run_id)
    logger.metrics(0, {"loss": 1.0, "val_dice": float("nan")})
    logger.metrics(1, {"loss": 0.5, "val_dice": 0.8})
    logger.overlay(1, Overlay("c", np.random.rand(8, 8), np.eye(8, dtype=np.uint8), np.eye(8, dtype=np.uint8)))
    client = MlflowClient(store)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(0, 1.0), (1, 0.5)]
    assert [m.step for m in client.get_metric_history(run_id, "val_dice")] == [1]  # NaN skipped
    assert [a.path for a in client.list_artifacts(run_id, "validation")] == ["validation/epoch_0001.png"]
    db_dir = os.path.dirname(store[len("sqlite:///"):])
    assert os.path.isdir(os.path.join(db_dir, "mlartifacts"))  # a local store keeps artifacts beside its db


def write_model_dir(path: str) -> str:
    from crossdim.models.io import save_model
    from crossdim.train.checkpoint import write_dataset_info
    from crossdim.train.targets import target_spec

    model = tiny_omnianet().eval()
    save_model(model, path)
    write_dataset_info(path, {"target": target_spec(BLOB_DATASET).model_dump(), "in_channels": 1, "spatial_dims": 3,
                              "window": {"roi_size": [32, 32], "slice_axis": 2, "overlap": 0.25, "mode": "constant"}})
    return path


def test_pyfunc_model_loads_predicts_and_registers(store, tmp_path, monkeypatch):
    import mlflow

    from crossdim.models import load_model
    from crossdim.train.transfer import find_checkpoint_dir

    model_dir = write_model_dir(str(tmp_path / "ckpt"))
    run_id, _ = tracking.start_or_resume_run(store, "exp", str(tmp_path), "model")
    uri = tracking.log_checkpoint_model(store, run_id, model_dir)
    assert uri == f"runs:/{run_id}/model"
    version = tracking.register(store, uri, "blobnet", "champion")
    assert version == "1"

    monkeypatch.chdir(tmp_path)
    image = np.random.default_rng(0).normal(size=(1, 40, 36, 5)).astype(np.float32)
    expected = tracking.predict_label_map(load_model(model_dir), tracking_info(model_dir), image)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    for ref in (uri, "models:/blobnet@champion"):
        out = mlflow.pyfunc.load_model(ref).predict(image)
        assert out.shape == (40, 36, 5) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, expected)
    # the artifact is a crossdim checkpoint directory: crossdim's own loader reads it
    root = mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl"), tracking_uri=store)
    loaded = load_model(find_checkpoint_dir(root))
    for a, b in zip(loaded.state_dict().values(), load_model(model_dir).state_dict().values()):
        torch.testing.assert_close(a, b)
    assert sorted(os.listdir(find_checkpoint_dir(root))) == ["checksums.json", "config.json", "dataset.json",
                                                             "model.safetensors"]
    assert not any(name.endswith((".pkl", ".pickle")) for _r, _d, files in os.walk(root) for name in files)


def tracking_info(model_dir: str) -> dict:
    from crossdim.train.checkpoint import read_dataset_info

    return read_dataset_info(model_dir)
