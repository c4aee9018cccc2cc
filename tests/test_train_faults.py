"""Faults: pre-flight errors (one line, before any Ray Train work), a NaN loss (stops, keeps the
last good checkpoint), a worker killed mid-epoch (resumes from the last checkpoint, one MLflow run,
no epoch repeated)."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402

from crossdim.train import NonFiniteLossError, TrainConfigError  # noqa: E402
from tests.servers import free_port  # noqa: E402
from tests.test_train_units import SMALL_UNET, fast_config, write_blob_dataset  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return write_blob_dataset(str(tmp_path_factory.mktemp("blobs")), cases=4, shape=(32, 32, 32), folds=2)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def dx(tmp_path, manifest: str, name: str, *overrides: str):
    return fast_config(str(tmp_path), manifest, name, "model.arch=dxnet", SMALL_UNET, "data.patch_size=[32, 32, 32]",
                       *overrides)


def expect_preflight_error(cfg, needle: str) -> str:
    from crossdim.train import run

    with pytest.raises(TrainConfigError) as exc:
        run(cfg)
    message = str(exc.value)
    assert needle in message and "\n" not in message, message
    assert not os.path.exists(os.path.join(cfg.storage_path, cfg.name))  # Ray Train never started
    return message


# ----------------------------------------------------------------------------- pre-flight (no Ray needed)
def test_unknown_encoder(tmp_path, data):
    msg = expect_preflight_error(dx(tmp_path, data, "bad-enc", "model.encoder=efficientnet_b99"), "efficientnet_b99")
    assert msg.startswith("model (dxnet")


def test_patch_larger_than_the_data(tmp_path, data):
    expect_preflight_error(dx(tmp_path, data, "big-patch", "data.patch_size=[64, 64, 64]"),
                           "data.patch_size [64, 64, 64] is larger than the data")


def test_patch_dims_and_class_count_must_match(tmp_path, data):
    expect_preflight_error(dx(tmp_path, data, "dims", "data.patch_size=[32, 32]"), "needs 3")
    expect_preflight_error(dx(tmp_path, data, "classes", "model.num_classes=5"), "model.num_classes=5")


def test_unreachable_tracking_server(tmp_path, data):
    port = free_port()
    msg = expect_preflight_error(dx(tmp_path, data, "no-mlflow", f"tracking.tracking_uri=http://127.0.0.1:{port}"),
                                 "unreachable")
    assert msg.startswith("tracking: MLflow tracking server")


def test_missing_manifest(tmp_path):
    expect_preflight_error(dx(tmp_path, str(tmp_path / "nowhere"), "no-data"), "data.manifest")


# ----------------------------------------------------------------------------- pre-flight (with Ray)
@pytest.mark.slow
def test_more_workers_than_the_cluster_can_place(ray_cluster, tmp_path, data):
    msg = expect_preflight_error(dx(tmp_path, data, "too-many", "scaling.num_workers=2", "scaling.cpus_per_worker=1"),
                                 "need CPU 3")  # 2 x 1 CPU + 1 for Ray Data
    assert "the Ray cluster has CPU 2" in msg


@pytest.mark.slow
def test_bad_shard_checksum(ray_cluster, tmp_path):
    root = write_blob_dataset(str(tmp_path / "corrupt"), cases=4, shape=(32, 32, 32), folds=2)
    shard = tmp_path / "corrupt" / "shards" / "shard-00000.parquet"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    expect_preflight_error(dx(tmp_path, root, "corrupt"), "does not match the manifest")


# ----------------------------------------------------------------------------- during training
@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(ray_cluster, tmp_path, data, monkeypatch):
    from mlflow.tracking import MlflowClient

    from crossdim.tracking import run_key
    from crossdim.train import run

    monkeypatch.setenv("CROSSDIM_NAN_LOSS_AT", "1")
    cfg = dx(tmp_path, data, "nan", "epochs=3", "steps_per_epoch=2")
    with pytest.raises(NonFiniteLossError) as exc:
        run(cfg)
    message = str(exc.value)
    assert "non-finite loss in epoch 1" in message and message.endswith("epoch_0000")
    run_dir = os.path.join(cfg.storage_path, cfg.name)
    assert sorted(d for d in os.listdir(run_dir) if d.startswith("epoch_")) == ["epoch_0000"]
    client = MlflowClient(cfg.tracking.tracking_uri)
    (found,) = client.search_runs([client.get_experiment_by_name("crossdim").experiment_id],
                                  f"tags.`crossdim.run_key` = '{run_key(cfg.storage_path, cfg.name)}'")
    assert found.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(found.info.run_id, "loss")] == [0]


@pytest.mark.slow
def test_worker_failure_resumes_from_the_last_checkpoint(ray_cluster, tmp_path, data, monkeypatch):
    from mlflow.tracking import MlflowClient

    from crossdim.train import run

    marker = tmp_path / "failed-once"
    monkeypatch.setenv("CROSSDIM_FAIL_ONCE", f"1:{marker}")  # rank 1 dies half-way through epoch 1
    cfg = dx(tmp_path, data, "fault", "epochs=3", "steps_per_epoch=4", "max_failures=1")
    result = run(cfg)
    assert marker.exists() and "epoch 1" in marker.read_text()
    assert result.epochs_completed == 3
    client = MlflowClient(cfg.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("crossdim").experiment_id])
    assert [r.info.run_id for r in runs if r.info.run_name == "fault"] == [result.mlflow_run_id]  # one run
    # epochs 0, 1, 2 each logged once: epoch 0 (checkpointed) was not repeated after the restart
    steps = [m.step for m in client.get_metric_history(result.mlflow_run_id, "loss")]
    assert steps == [0, 1, 2]
    global_steps = [m.value for m in client.get_metric_history(result.mlflow_run_id, "global_step")]
    assert global_steps == [4, 8, 12]  # the resumed run continued from the checkpoint's step count
    run_dir = os.path.join(cfg.storage_path, cfg.name)
    assert sorted(d for d in os.listdir(run_dir) if d.startswith("epoch_")) == ["epoch_0000", "epoch_0001", "epoch_0002"]
