"""Multi-node Ray, simulated on one machine with `ray.cluster_utils.Cluster` (issue 7).

Three 1-CPU nodes (the head keeps its CPU for Ray Data): a training run with 2 workers of 1 CPU each
must place them on two different nodes. Storage shared by every node is S3 (moto); a local
storage_path on such a cluster is refused by the driver's pre-flight check, before any training.
"""

from __future__ import annotations

import os
import uuid

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402

from crossdim.config import TrainConfig, load_config  # noqa: E402
from crossdim.train.driver import check_shared_storage  # noqa: E402
from crossdim.train.errors import TrainConfigError  # noqa: E402
from tests.servers import S3_ENV, S3Server  # noqa: E402
from tests.test_train_units import SMALL_UNET, fast_config, write_blob_dataset  # noqa: E402

SECRET = S3_ENV["AWS_SECRET_ACCESS_KEY"]
NODES = 3
SLICES_2D = ("model.arch=omnianet", SMALL_UNET, "data.patch_size=[32, 32]", "data.slice_axis=2", "data.batch_size=4")


@pytest.fixture(scope="module")
def s3(moto_s3_server):
    """One bucket for the module, with the AWS_* environment set before the cluster's nodes start
    (every node's processes inherit it, as they would from a cluster's environment)."""
    env = dict(S3_ENV, AWS_ENDPOINT_URL=moto_s3_server)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("AWS_PROFILE", raising=False)
        server = S3Server(endpoint=moto_s3_server, bucket=f"crossdim-multinode-{uuid.uuid4().hex[:8]}", env=env)
        server.client().create_bucket(Bucket=server.bucket)
        yield server


@pytest.fixture(scope="module")
def cluster(s3):
    """Head + 2 worker nodes, 1 CPU each; this test process is the driver. Only this cluster is stopped."""
    import ray
    from ray.cluster_utils import Cluster

    sim = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        for _ in range(NODES - 1):
            sim.add_node(num_cpus=1)
        sim.wait_for_nodes()
        ray.init(address=sim.address, log_to_driver=False)
        yield sim
    finally:
        ray.shutdown()
        sim.shutdown()


def train_worker_nodes() -> list[str]:
    """Node ids of this driver's Ray Train worker actors (alive or finished), from the GCS actor table."""
    import ray

    job = ray.get_runtime_context().get_job_id()
    return [a["Address"]["NodeID"] for a in ray._private.state.actors().values()
            if "RayTrainWorker" in a["ActorClassName"] and a["JobID"] == job]


def config(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, None, ["data.manifest=unused", *overrides])


def test_shared_storage_rule_without_ray():
    local, s3_cfg = config("storage_path=/tmp/runs"), config("storage_path=s3://bucket/runs")
    check_shared_storage(local, 1)  # one node: a local path is fine
    check_shared_storage(s3_cfg, 5)
    check_shared_storage(config("storage_path=/mnt/nfs/runs", "storage_shared=true"), 5)
    with pytest.raises(TrainConfigError) as info:
        check_shared_storage(local, 2)
    message = str(info.value)
    assert message.startswith("storage_path '/tmp/runs' is a local path") and "2 nodes" in message
    assert "s3://" in message and "storage_shared=true" in message and "\n" not in message


def test_a_local_tracking_store_is_refused_on_several_nodes():
    """Rank 0 logs to MLflow from whichever node it lands on: a sqlite file on the driver's disk
    would silently get no metrics (or another node's copy would)."""
    s3_cfg = config("storage_path=s3://bucket/runs")
    check_shared_storage(s3_cfg, 1, "sqlite:////tmp/mlflow.db")  # one node
    check_shared_storage(s3_cfg, 3, "http://user:pw@mlflow.internal:5000")
    check_shared_storage(config("storage_path=s3://bucket/runs", "storage_shared=true"), 3, "sqlite:////nfs/m.db")
    for uri in ("sqlite:////tmp/mlflow.db", "file:///tmp/mlruns", "/tmp/mlruns"):
        with pytest.raises(TrainConfigError) as info:
            check_shared_storage(s3_cfg, 3, uri)
        message = str(info.value)
        assert message.startswith(f"tracking.tracking_uri '{uri}' is a store on this node") and "3 nodes" in message
        assert "MLflow server" in message and "storage_shared=true" in message and "\n" not in message


@pytest.mark.slow
def test_local_storage_path_refused_before_training(cluster, tmp_path):
    import ray
    from mlflow.tracking import MlflowClient

    from crossdim.train import run

    assert sum(node["Alive"] for node in ray.nodes()) == NODES
    data = write_blob_dataset(str(tmp_path / "blobs"), cases=4, shape=(32, 32, 32), folds=2)
    cfg = fast_config(str(tmp_path), data, "local-on-multinode", *SLICES_2D, "scaling.cpus_per_worker=1")
    with pytest.raises(TrainConfigError) as info:
        run(cfg)
    message = str(info.value)
    assert "storage_path" in message and f"{NODES} nodes" in message and "s3://" in message
    assert "\n" not in message
    assert not (tmp_path / "results" / "local-on-multinode").exists()  # no Ray run was started
    client = MlflowClient(cfg.tracking.tracking_uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    assert train_worker_nodes() == []


@pytest.mark.slow
def test_sweep_with_a_local_storage_path_is_refused_before_any_trial(cluster, tmp_path):
    from crossdim.config import TuneConfig
    from crossdim.tune import run

    data = write_blob_dataset(str(tmp_path / "blobs"), cases=4, shape=(32, 32, 32), folds=2)
    train = fast_config(str(tmp_path), data, "unused", *SLICES_2D, "scaling.cpus_per_worker=1")
    sweep = TuneConfig.model_validate({"name": "local-sweep", "search_alg": "grid",
                                       "search_space": {"optim.lr": {"values": [1e-3, 3e-3]}},
                                       "train": train.model_dump(mode="json")})
    with pytest.raises(TrainConfigError) as info:
        run(sweep)
    assert f"{NODES} nodes" in str(info.value) and "s3://" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "results" / "local-sweep").exists()
    assert train_worker_nodes() == []


@pytest.mark.slow
def test_two_workers_on_two_nodes_share_s3_storage(cluster, s3, mlflow_server, tmp_path):
    import ray
    from mlflow.tracking import MlflowClient

    from crossdim.train import run

    data = write_blob_dataset(s3.uri("shards/blobs"), cases=4, shape=(32, 32, 32), folds=2)
    cfg = fast_config(str(tmp_path), data, "multinode", *SLICES_2D, "scaling.cpus_per_worker=1",
                      f"storage_path={s3.uri('runs')}", f"tracking.tracking_uri={mlflow_server}")
    result = run(cfg)

    nodes = train_worker_nodes()
    alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes  # one worker per node
    assert set(nodes) <= alive
    # the checkpoints (written by rank 0 from its node) are on S3, each a crossdim model directory
    assert result.epochs_completed == 2 and result.checkpoint == s3.uri("runs/multinode/epoch_0001")
    keys = s3.keys("runs/multinode/")
    for name in ("config.json", "model.safetensors", "dataset.json"):
        assert f"runs/multinode/epoch_0001/{name}" in keys
    client = MlflowClient(cfg.tracking.tracking_uri)
    assert [m.step for m in client.get_metric_history(result.mlflow_run_id, "loss")] == [0, 1]
    params = client.get_run(result.mlflow_run_id).data.params
    assert params["storage_path"] == s3.uri("runs") and not any(SECRET in v for v in params.values())
