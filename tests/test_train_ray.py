"""2-worker CPU training on Ray Train (gloo DDP) on synthetic 3D data: Omnia-Net on slices, then
DX-Net from its inflated encoder (the 2D -> 3D workflow from two configs), DS-Net on BraTS-like
regions. (Omnia-Net on 2D images: test_train_e2e.py.)

Thresholds: the data are bright ellipsoids in noise (the blob fills ~5% of a volume), so a
constant predictor scores Dice 0 (all background) or ~0.09 (all foreground); val_dice >= 0.5 means
the net actually segments the blob. The loss must fall from the first to the last epoch.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.test_train_units import SMALL_DSNET, SMALL_UNET, fast_config, write_blob_dataset  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data3d(tmp_path_factory) -> str:
    return write_blob_dataset(str(tmp_path_factory.mktemp("blobs3d")), cases=4, shape=(32, 32, 32), folds=2)


def loss_history(uri: str, run_id: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, "loss")]


def assert_learned(result, uri: str, threshold: float = 0.5) -> None:
    history = loss_history(uri, result.mlflow_run_id)
    assert [s for s, _ in history] == list(range(len(history)))
    assert history[-1][1] < history[0][1], history
    assert result.metrics["val_dice"] >= threshold, result.metrics


def test_omnianet_slices_then_dxnet_from_its_inflated_encoder(ray_cluster, data3d, tmp_path):
    from crossdim.models import load_model
    from crossdim.models.dxnet import split_2d_state
    from crossdim.models.inflate import inflate_state_dict
    from crossdim.train import run
    from crossdim.train.driver import prepare
    from crossdim.train.loop import build_model

    # config 1: Omnia-Net (2D) on axial slices of the 3D cases
    cfg2d = fast_config(str(tmp_path), data3d, "omnia-slices", "model.arch=omnianet", SMALL_UNET,
                        "data.patch_size=[32, 32]", "data.slice_axis=2", "data.batch_size=4")
    res2d = run(cfg2d)
    assert res2d.model_uri and res2d.checkpoint and res2d.epochs_completed == 2
    history = loss_history(cfg2d.tracking.tracking_uri, res2d.mlflow_run_id)
    assert [s for s, _ in history] == [0, 1] and history[1][1] < history[0][1]  # the source learns
    # config 2: DX-Net starting from that run's logged model, inflated ("center" mode)
    cfg3d = fast_config(str(tmp_path), data3d, "dxnet-from-2d", "model.arch=dxnet", SMALL_UNET,
                        "data.patch_size=[32, 32, 32]", f"init.pretrained={res2d.model_uri}",
                        "init.inflate_mode=center", "validation.hd95=true")
    job = prepare(cfg3d).job
    dxnet = build_model(job, initialize=True)  # what rank 0 does on a fresh start
    encoder_2d, stem_2d = split_2d_state(load_model(res2d.checkpoint).state_dict())
    for part, state in (("encoder", encoder_2d), ("stem", stem_2d)):
        expected = inflate_state_dict(state, "center")
        got = getattr(dxnet, part).state_dict()
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key])
    res3d = run(cfg3d)
    assert_learned(res3d, cfg3d.tracking.tracking_uri)
    assert "val_hd95_blob" in res3d.metrics and res3d.metrics["val_hd95_blob"] >= 0
    assert res3d.best_val_dice >= res3d.metrics["val_dice"] - 1e-9


def test_dsnet_regions_brats_like(ray_cluster, tmp_path):
    from crossdim.train import run

    data = write_blob_dataset(str(tmp_path / "brats"), cases=4, shape=(16, 32, 32), channels=2, brats=True, folds=2)
    cfg = fast_config(str(tmp_path), data, "dsnet", "model.arch=dsnet", SMALL_DSNET,
                      "data.patch_size=[16, 32, 32]", "epochs=3", "steps_per_epoch=5")
    result = run(cfg)
    assert {"val_dice_ET", "val_dice_TC", "val_dice_WT"} <= result.metrics.keys()
    # whole tumour (the blob) must be segmented; the mean over ET/TC/WT, with the small
    # enhancing centre, must beat what a constant predictor scores (< 0.1)
    assert_learned(result, cfg.tracking.tracking_uri, threshold=0.3)
    assert result.metrics["val_dice_WT"] >= 0.5
