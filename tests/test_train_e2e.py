"""End to end: Omnia-Net on 2D (CAMUS-like) images, 2 workers, checkpoints on S3 (moto), tracking on
a real `mlflow server` whose artifacts live on the same S3; params without secrets, per-epoch
metrics, dataset lineage, the logged model loads (MLflow pyfunc and crossdim) and predicts, and is
registered under an alias.

Threshold: four nested classes (background < ring < core < centre, brighter inwards); a constant
predictor scores a mean Dice near 0 (background everywhere: 0 on every class). Six short epochs on
two validation cases reached a best val_dice of 0.47-0.80 across runs (the sample order from Ray Data
varies), so >= 0.3 says the classes are being segmented; test_train_ray.py holds the tighter
learning thresholds. This test is about the plumbing: S3, the MLflow server, the registry.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tests.test_train_units import SMALL_UNET, fast_config, write_blob_dataset  # noqa: E402

pytestmark = pytest.mark.slow
EPOCHS = 6
SECRET = "testing-secret-do-not-log"  # the moto fixture's AWS_SECRET_ACCESS_KEY
CAMUS_LIKE = {"format": "camus", "name": "blobs-2d", "modality": "US", "channel_names": ["us"],
              "labels": {"0": "background", "1": "LV", "2": "MYO", "4": "LA"}, "regions": {}}


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_omnianet_2d_on_s3_and_mlflow_server(ray_cluster, moto_s3, mlflow_server, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from crossdim.models import load_model
    from crossdim.train import run
    from crossdim.train.transfer import find_checkpoint_dir

    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET
    data = write_blob_dataset(str(tmp_path / "camus"), cases=6, shape=(64, 64), brats=True, folds=3,
                              dataset=CAMUS_LIKE)
    cfg = fast_config(str(tmp_path), data, "omnia-2d-e2e", "model.arch=omnianet", SMALL_UNET,
                      "data.patch_size=[64, 64]", "data.batch_size=4", f"epochs={EPOCHS}", "steps_per_epoch=8",
                      f"storage_path={moto_s3.uri('runs')}", "tracking.tracking_uri=null",  # $MLFLOW_TRACKING_URI
                      "tracking.registered_model_name=blobs-2d", "tracking.alias=champion", "validation.hd95=true")
    result = run(cfg)

    # checkpoints on S3, each a crossdim model directory; num_to_keep=3 of them are kept
    keys = moto_s3.keys("runs/omnia-2d-e2e/")
    kept = sorted({k.split("/")[2] for k in keys if k.split("/")[2].startswith("epoch_")})
    assert len(kept) == 3 and kept[-1] == f"epoch_{EPOCHS - 1:04d}", kept
    for epoch in kept:
        for name in ("config.json", "model.safetensors", "dataset.json", "train_state.pt"):
            assert f"runs/omnia-2d-e2e/{epoch}/{name}" in keys
    assert result.checkpoint == moto_s3.uri(f"runs/omnia-2d-e2e/epoch_{EPOCHS - 1:04d}")
    # learning
    assert {"val_dice_LV", "val_dice_MYO", "val_dice_LA"} <= result.metrics.keys()
    assert result.best_val_dice >= 0.3, (result.best_val_dice, result.metrics)

    client = MlflowClient(mlflow_server)
    run_ = client.get_run(result.mlflow_run_id)
    params, tags = run_.data.params, run_.data.tags
    assert params["model.arch"] == "omnianet" and params["storage_path"] == moto_s3.uri("runs")
    assert not any(SECRET in f"{k}={v}" for k, v in [*params.items(), *tags.items()])
    loss = [(m.step, m.value) for m in client.get_metric_history(result.mlflow_run_id, "loss")]
    assert [s for s, _ in loss] == list(range(EPOCHS)) and loss[-1][1] < loss[0][1]
    for key in ("lr", "val_dice", "val_dice_LV", "samples_per_s", "data_wait_frac"):
        assert len(client.get_metric_history(result.mlflow_run_id, key)) == EPOCHS, key
    # HD95 is logged for a class in the epochs where it is both predicted and present (else undefined)
    hd95 = {c: client.get_metric_history(result.mlflow_run_id, f"val_hd95_{c}") for c in ("LV", "MYO", "LA")}
    assert any(hd95.values()) and all(m.value >= 0 for ms in hd95.values() for m in ms), hd95
    (lineage,) = run_.inputs.dataset_inputs
    assert lineage.dataset.name == "blobs-2d" and data in lineage.dataset.source
    pictures = [a.path for a in client.list_artifacts(result.mlflow_run_id, "validation")]
    assert pictures == [f"validation/epoch_{e:04d}.png" for e in range(EPOCHS)]
    assert any(k.startswith("mlartifacts/") for k in moto_s3.keys())  # the server stored artifacts on S3

    # the logged model: MLflow pyfunc (by run and by alias) and crossdim's own loader agree
    assert result.model_uri == f"runs:/{result.mlflow_run_id}/model" and result.registered_version == "1"
    monkeypatch.chdir(tmp_path)
    image = np.random.default_rng(1).normal(size=(1, 64, 64)).astype(np.float32)
    by_run = mlflow.pyfunc.load_model(result.model_uri).predict(image)
    by_alias = mlflow.pyfunc.load_model("models:/blobs-2d@champion").predict(image)
    assert by_run.shape == (64, 64) and set(np.unique(by_run)) <= {0, 1, 2, 4}
    np.testing.assert_array_equal(by_run, by_alias)
    root = mlflow.artifacts.download_artifacts(result.model_uri, dst_path=str(tmp_path / "dl"))
    model = load_model(find_checkpoint_dir(root))
    with torch.no_grad():
        logits = model(torch.from_numpy(image)[None])
    assert logits.shape == (1, 4, 64, 64)
    lut = np.array([0, 1, 2, 4], np.uint8)
    np.testing.assert_array_equal(lut[logits.argmax(1)[0].numpy()], by_run)
