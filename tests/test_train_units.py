"""Training building blocks without Ray: targets, losses, optimizers/schedules, validation metrics,
checkpoints, weight transfer, tracking helpers. Also hosts `write_blob_dataset`, the tiny
preprocessed dataset (shards + manifest) the Ray tests train on."""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch

from crossdim.config import InitConfig, LossConfig, OptimConfig, ValidationConfig
from crossdim.data.shards import CaseArrays, case_record, encode_case, make_splits, shard_name, write_manifest, write_shard
from crossdim.train.targets import TargetSpec, encode_labels, masks_from_labels, masks_to_label_map, target_spec

BRATS_DATASET = {"format": "brats", "name": "blobs-brats", "modality": "MR", "channel_names": ["t1", "flair"],
                 "labels": {"0": "background", "1": "NCR", "2": "ED", "4": "ET"},
                 "regions": {"ET": [4], "TC": [1, 4], "WT": [1, 2, 4]}, "spatial_dims": 3,
                 "label_convention": "brats2021"}
BLOB_DATASET = {"format": "msd", "name": "blobs", "modality": "MR", "channel_names": ["mr"],
                "labels": {"0": "background", "1": "blob"}, "regions": {}, "spatial_dims": 3, "label_convention": ""}


# ----------------------------------------------------------------------------- the tiny dataset
def blob_case(rng: np.random.Generator, shape: tuple[int, ...], channels: int, brats: bool) -> tuple[np.ndarray, np.ndarray]:
    """One bright ellipsoid (BraTS-like: nested 2 > 1 > 4 shells) in noise; learnable in a few steps."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    centre = np.array([rng.uniform(s * 0.35, s * 0.65) for s in shape]).reshape((-1,) + (1,) * len(shape))
    radius = np.array([s * rng.uniform(0.18, 0.26) for s in shape]).reshape(centre.shape)
    r = np.sqrt((((grid - centre) / radius) ** 2).sum(0))
    label = np.zeros(shape, np.uint8)
    label[r < 1.0] = 2 if brats else 1
    if brats:
        label[r < 0.75] = 1
        label[r < 0.5] = 4
    image = rng.normal(0, 0.3, size=(channels, *shape)).astype(np.float32)
    for c in range(channels):  # levels 0 < ring (2) < core (1) < centre (4), ~2.7 noise sigmas apart
        image[c] += (label > 0) * (1.2 + 0.3 * c) + np.isin(label, (1, 4)) * 0.8 + (label == 4) * 0.8
    return image, label


def write_blob_dataset(root: str, cases: int = 6, shape: tuple[int, ...] = (32, 32, 32), channels: int = 1,
                       brats: bool = False, seed: int = 0, folds: int = 3, dataset: dict | None = None) -> str:
    """A preprocessed dataset (one Parquet shard + manifest.json) in the shards' real format."""
    rng = np.random.default_rng(seed)
    info = dict(dataset or (BRATS_DATASET if brats else BLOB_DATASET))
    info["spatial_dims"] = len(shape)
    rows = []
    for i in range(cases):
        image, label = blob_case(rng, shape, channels, brats)
        case = CaseArrays(id=f"case_{i:03d}", image=image, label=label, spacing=(1.0,) * len(shape),
                          affine=np.eye(4), geometry={})
        rows.append(encode_case(case, "float16"))
    entry = write_shard(root, shard_name(0), rows)
    manifest = {
        "format_version": 1,
        "fingerprint": hashlib.sha256(f"{cases}-{shape}-{channels}-{brats}-{seed}".encode()).hexdigest(),
        "cases": [case_record(r, entry["file"]) for r in rows],
        "quarantined": [],
        "splits": make_splits([r["id"] for r in rows], folds, seed),
        "shards": [entry],
        "dataset": info,
        "preprocess": {"target_spacing": [1.0] * len(shape)},
        "statistics": {},
    }
    write_manifest(root, manifest)
    return root


# ----------------------------------------------------------------------------- targets
def test_target_spec_from_manifest_multiclass_and_regions():
    spec = target_spec(BLOB_DATASET)
    assert spec.kind == "multiclass" and spec.channel_names == ["background", "blob"] and spec.metric_names == ["blob"]
    regions = target_spec(BRATS_DATASET)
    assert regions.kind == "regions" and regions.channel_names == ["ET", "TC", "WT"]
    assert regions.metric_names == ["ET", "TC", "WT"]
    with pytest.raises(ValueError, match="dataset.labels"):
        target_spec({"labels": {"1": "only"}})


def test_encode_labels_remaps_and_builds_regions():
    spec = target_spec({"labels": {"0": "bg", "2": "a", "7": "b"}})
    out = encode_labels(np.array([[0, 2], [7, 2]], np.uint8), spec)
    assert out.shape == (1, 2, 2) and out.tolist() == [[[0, 1], [2, 1]]]
    with pytest.raises(ValueError, match=r"label values \[5\]"):
        encode_labels(np.array([5], np.uint8), spec)
    brats = target_spec(BRATS_DATASET)
    label = np.array([0, 1, 2, 4], np.uint8)
    enc = encode_labels(label, brats)
    assert enc.tolist() == [[0, 0, 0, 1], [0, 1, 0, 1], [0, 1, 1, 1]]  # ET, TC, WT
    assert masks_to_label_map(enc.astype(bool), brats).tolist() == label.tolist()  # inverse


def test_region_channel_order_survives_a_sorted_json_round_trip():
    """dataset.json is written with sorted keys; channels must keep the manifest's region order."""
    spec = target_spec({"regions": {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}, "labels": {}})
    assert spec.channel_names == ["WT", "TC", "ET"]
    reloaded = TargetSpec.model_validate(json.loads(json.dumps(spec.model_dump(), sort_keys=True)))
    assert list(reloaded.regions) == ["ET", "TC", "WT"]  # the dict order is gone...
    label = np.array([0, 1, 2, 4], np.uint8)
    expected = [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]  # ...but channels stay WT, TC, ET
    assert encode_labels(label, reloaded).tolist() == expected
    assert masks_from_labels(torch.from_numpy(label)[None], reloaded)[0].int().tolist() == expected
    assert masks_to_label_map(np.array(expected, bool), reloaded).tolist() == label.tolist()


# ----------------------------------------------------------------------------- losses
def test_losses_fall_towards_zero_for_the_right_answer():
    from crossdim.train.losses import DiceBCELoss, build_loss

    spec = target_spec(BLOB_DATASET)
    loss = build_loss(spec, LossConfig())
    target = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    target[..., 2:5, 2:5] = 1
    good = torch.cat([(1 - target) * 10.0 - 5, target * 10.0 - 5], 1).float()
    assert float(loss(good, target)) < 0.05 < float(loss(-good, target))
    regions = build_loss(target_spec(BRATS_DATASET), LossConfig(dice_weight=1.0, ce_weight=0.5))
    assert isinstance(regions, DiceBCELoss)
    t3 = torch.from_numpy(encode_labels(np.array([[0, 1], [2, 4]], np.uint8), target_spec(BRATS_DATASET)))[None]
    logits = (t3 * 2 - 1) * 20.0
    assert float(regions(logits, t3)) < 0.01 < float(regions(-logits, t3))


# ----------------------------------------------------------------------------- optimizers
def test_paper_optimizer_is_lookahead_nadam_with_5_percent_decay():
    from timm.optim import Lookahead

    from crossdim.train.optim import build_optimizer, build_scheduler, lr_factor

    model = torch.nn.Linear(3, 2)
    cfg = OptimConfig(name="nadam_lookahead", lr=1e-2, lookahead_alpha=0.5, lookahead_k=6, gamma=0.95)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, Lookahead) and "NAdam" in type(opt._base_optimizer).__name__
    assert all(g["lookahead_k"] == 6 and g["lookahead_alpha"] == 0.5 for g in opt.param_groups)
    sched = build_scheduler(opt, cfg, total_epochs=10)
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.95**3)
    cos = OptimConfig(name="adamw", schedule="cosine", warmup_epochs=1)
    assert lr_factor(0, cos, 11) == pytest.approx(0.5) and lr_factor(1, cos, 11) == pytest.approx(1.0)
    assert lr_factor(11, cos, 11) == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(5, OptimConfig(schedule="poly", poly_power=1.0), 10) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- validation
def test_case_scores_dice_and_hd95_known_values():
    from crossdim.train.validation import MetricSums, case_scores

    truth = torch.zeros(1, 2, 16, 16, dtype=torch.bool)
    truth[0, 0, 4:8, 4:8] = True  # class a: 16 voxels
    pred = truth.clone()
    pred[0, 0, 4:8, 8] = True  # 4 extra voxels one column over: Dice 32/36, HD95 <= 1 voxel * 2mm
    dice, hd = case_scores(pred, truth, spacing=(2.0, 2.0), hd95=True)
    assert float(dice[0]) == pytest.approx(32 / 36)
    assert float(dice[1]) == 1.0  # both empty
    assert 0 < float(hd[0]) <= 2.0 and math.isnan(float(hd[1]))
    sums = MetricSums(["a", "b"])
    sums.add(dice, hd)
    sums.add(torch.tensor([0.5, float("nan")]), torch.tensor([4.0, float("inf")]))
    out = sums.summary()
    assert out["val_dice_a"] == pytest.approx((32 / 36 + 0.5) / 2)
    assert out["val_dice_b"] == 1.0 and out["val_dice"] == pytest.approx((out["val_dice_a"] + 1.0) / 2)
    assert "val_hd95_b" not in out and out["val_hd95_a"] == pytest.approx((float(hd[0]) + 4.0) / 2)


def test_predict_logits_slicewise_equals_per_slice_prediction():
    from crossdim.train.validation import predict_logits

    model = torch.nn.Conv2d(2, 3, 3, padding=1).eval()
    image = torch.randn(1, 2, 10, 12, 7)
    cfg = ValidationConfig(sw_overlap=0.25, sw_mode="constant")
    with torch.no_grad():
        out = predict_logits(model, image, [12, 7], cfg, slice_axis=0)
        assert out.shape == (1, 3, 10, 12, 7)
        torch.testing.assert_close(out[:, :, 4], model(image[:, :, 4]), atol=1e-5, rtol=1e-5)
        out2 = predict_logits(model, image, [10, 12], cfg, slice_axis=-1)
        torch.testing.assert_close(out2[..., 3], model(image[..., 3]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="window"):
        predict_logits(model, image, [8, 8], cfg, slice_axis=None)


# ----------------------------------------------------------------------------- checkpoints
def tiny_omnianet(in_channels: int = 1, num_classes: int = 2):
    from crossdim.models import create_model

    return create_model("omnianet", encoder="test_efficientnet", in_channels=in_channels, num_classes=num_classes,
                        decoder_channels=[16, 16, 8, 8, 8])


def test_checkpoint_round_trip_restores_model_and_optimizer(tmp_path):
    from crossdim.models import load_model
    from crossdim.train.checkpoint import TrainState, load_train_state, read_dataset_info, save_checkpoint
    from crossdim.train.optim import build_optimizer, build_scheduler

    model = tiny_omnianet()
    cfg = OptimConfig()
    opt, = [build_optimizer(model, cfg)]
    sched = build_scheduler(opt, cfg, 5)
    x = torch.randn(2, 1, 32, 32)
    for _ in range(2):
        opt.zero_grad()
        model(x).mean().backward()
        opt.step()
    sched.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = TrainState(epoch=3, global_step=17, best_metric=0.7, best_epoch=2, seed=4, mlflow_run_id="abc")
    save_checkpoint(str(tmp_path), model, state, opt, sched, scaler, {"target": {"kind": "multiclass"}})
    assert sorted(os.listdir(tmp_path)) == ["checksums.json", "config.json", "dataset.json", "model.safetensors",
                                         "train_state.pt"]
    torch.load(tmp_path / "train_state.pt", weights_only=True)  # plain tensors/containers only
    assert read_dataset_info(str(tmp_path))["target"]["kind"] == "multiclass"
    restored = load_model(str(tmp_path))  # any checkpoint is a crossdim model directory
    model2 = tiny_omnianet()
    opt2 = build_optimizer(model2, cfg)
    sched2 = build_scheduler(opt2, cfg, 5)
    got = load_train_state(str(tmp_path), model2, opt2, sched2, scaler)
    assert got == state
    for a, b, c in zip(model.state_dict().values(), model2.state_dict().values(), restored.state_dict().values()):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    assert sched2.last_epoch == sched.last_epoch == 1


def test_epoch_seed_is_stable_and_distinct():
    from crossdim.train.checkpoint import epoch_seed

    assert epoch_seed(0, 0, 1) == epoch_seed(0, 0, 1)
    assert len({epoch_seed(0, r, e) for r in range(4) for e in range(50)}) == 200


# ----------------------------------------------------------------------------- transfer
def test_transfer_state_copies_and_inflates_pure():
    from crossdim.models.inflate import inflate_weight
    from crossdim.train.transfer import source_kind, transfer_state

    source = {"stem.conv.weight": torch.randn(4, 1, 3, 3), "encoder.bn.weight": torch.randn(4),
              "decoder.x.weight": torch.randn(2, 2, 3, 3)}
    target = {"stem.conv.weight": torch.zeros(4, 1, 3, 3, 3), "encoder.bn.weight": torch.zeros(4),
              "decoder.x.weight": torch.zeros(2, 2, 3, 3, 3), "encoder.other": torch.zeros(5)}
    out, report = transfer_state(target, source, "center", "src")
    torch.testing.assert_close(out["stem.conv.weight"], inflate_weight(source["stem.conv.weight"], 3, "center"))
    torch.testing.assert_close(out["encoder.bn.weight"], source["encoder.bn.weight"])
    assert torch.equal(out["decoder.x.weight"], target["decoder.x.weight"])  # decoders are not transferred
    assert report.inflated == ["stem.conv.weight"] and report.copied == ["encoder.bn.weight"]
    assert report.skipped == ["encoder.other"]
    nested, rep2 = transfer_state({"net2d.encoder.bn.weight": torch.zeros(4)}, source)
    torch.testing.assert_close(nested["net2d.encoder.bn.weight"], source["encoder.bn.weight"])
    assert rep2.copied == ["net2d.encoder.bn.weight"]
    assert [source_kind(v) for v in (False, True, "w.safetensors", "runs:/x/model", "/ckpt")] == \
        ["none", "timm", "weights", "checkpoint", "checkpoint"]


def test_initialize_model_from_a_2d_checkpoint_dir(tmp_path):
    from crossdim.models.io import save_model
    from crossdim.train.transfer import initialize_model

    src = tiny_omnianet()
    save_model(src, str(tmp_path / "src"))
    dst = tiny_omnianet()
    report = initialize_model(dst, InitConfig(pretrained=str(tmp_path / "src")))
    assert report is not None and report.transferred > 10 and not report.inflated
    for key, value in dst.state_dict().items():
        if key.startswith(("stem.", "encoder.")):
            torch.testing.assert_close(value, src.state_dict()[key])
    with pytest.raises(ValueError, match="no stem/encoder weight"):
        from crossdim.models import create_model

        other = create_model("omnianet", encoder="test_resnet", in_channels=3, num_classes=2, stem_channels=8)
        initialize_model(other, InitConfig(pretrained=str(tmp_path / "src")))


# ----------------------------------------------------------------------------- tracking helpers
def test_secrets_never_become_params(monkeypatch):
    from crossdim.tracking import redact_tree, redact_uri, safe_params

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-do-not-log")
    flat = {"optim.lr": 0.1, "tracking.tracking_uri": "https://user:pw@mlflow.example:5000",
            "model.options.api_token": "abc", "data.manifest": "s3://b/testing-secret-do-not-log/x",
            "storage_path": "s3://bucket/runs"}
    params = safe_params(flat)
    assert params == {"optim.lr": "0.1", "tracking.tracking_uri": "https://mlflow.example:5000",
                      "storage_path": "s3://bucket/runs"}
    assert redact_uri("http://h:1/x") == "http://h:1/x"
    tree = redact_tree({"a": {"password": "p", "uri": "http://u:p@h/"}, "b": [1]})
    assert tree == {"a": {"password": "***", "uri": "http://h/"}, "b": [1]}


def test_render_overlay_makes_a_png_figure():
    from crossdim.tracking import render_overlay
    from crossdim.train.validation import overlay_slice

    image = np.random.rand(1, 4, 8, 8).astype(np.float32)
    truth = np.zeros((4, 8, 8), np.uint8)
    truth[2, 2:4, 2:4] = 1
    ov = overlay_slice("c", image, truth, truth)
    assert ov.image.shape == (8, 8) and ov.truth.sum() == 4  # the slice with the most foreground
    fig = render_overlay(ov)
    assert len(fig.axes) == 3


def test_blob_dataset_reads_back(tmp_path):
    from crossdim.data.shards import iter_cases, read_manifest

    root = write_blob_dataset(str(tmp_path / "ds"), cases=4, shape=(16, 16, 16), brats=True, folds=2)
    manifest = read_manifest(root)
    assert len(manifest["splits"]["folds"]) == 2
    cases = list(iter_cases(root))
    assert [c.id for c in cases] == [f"case_{i:03d}" for i in range(4)]
    assert cases[0].image.shape == (1, 16, 16, 16) and set(np.unique(cases[0].label)) == {0, 1, 2, 4}
    assert TargetSpec.model_validate(target_spec(manifest["dataset"]).model_dump()).kind == "regions"


# ----------------------------------------------------------------------------- configs for the Ray tests
def fast_config(root: str, manifest: str, name: str, *overrides: str):
    """A tiny 2-worker CPU TrainConfig (0.5 CPU each, leaving a CPU for Ray Data), small decoders."""
    from crossdim.config import TrainConfig, load_config

    base = [f"name={name}", f"storage_path={root}/results", f"data.manifest={manifest}",
            f"tracking.tracking_uri=sqlite:///{root}/mlflow.db", "scaling.num_workers=2",
            "scaling.cpus_per_worker=0.5", "data.batch_size=2", "data.foreground_ratio=0.5",
            "data.augment.rotate_prob=0", "validation.hd95=false", "validation.sw_overlap=0.25",
            "optim.lr=3e-3", "epochs=2", "steps_per_epoch=4", "num_to_keep=3", "max_failures=0"]
    return load_config(TrainConfig, None, [*base, *overrides])


SMALL_UNET = "model.options={stem_channels: 8, decoder_channels: [32, 16, 16, 8, 8]}"
SMALL_DSNET = "model.options={encoder_3d_channels: [8, 8, 8, 8], omnianet_kwargs: {decoder_channels: [32, 16, 16, 8, 8]}}"


def test_model_initialisation_follows_the_seed(tmp_path):
    from crossdim.train.loop import WorkerJob, build_model

    def job(seed: int) -> WorkerJob:
        cfg = fast_config(str(tmp_path), str(tmp_path / "m"), "seeded", "model.arch=omnianet", SMALL_UNET, f"seed={seed}")
        return WorkerJob(config=cfg, target=target_spec(BLOB_DATASET), in_channels=1, data_spatial_dims=3,
                         train_ids=[], val_ids=[], dataset_info={})

    weights = [build_model(job(seed), initialize=False).state_dict() for seed in (0, 0, 1)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
