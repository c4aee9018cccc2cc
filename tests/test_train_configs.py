"""Every training preset in configs/ loads, validates and builds its model; paper settings hold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from crossdim.config import TrainConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = ["demo", "camus_omnianet_b0", "chaos_omnianet_b4", "brats_dsnet", "brats_dxnet"]
CHANNELS = {"demo": (1, 2), "camus_omnianet_b0": (1, 4), "chaos_omnianet_b4": (1, 5), "brats_dsnet": (4, 3),
            "brats_dxnet": (4, 3)}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_builds(name):
    from crossdim.train.driver import probe_model

    cfg = load_config(TrainConfig, CONFIGS / f"{name}.yaml")
    in_channels, classes = CHANNELS[name]
    model = probe_model(cfg, in_channels, classes)  # arch, timm encoder and options are valid
    assert len(cfg.data.patch_size) == model.spatial_dims
    model.check_input(torch.empty((1, in_channels, *cfg.data.patch_size), device="meta"))
    assert cfg.epochs < 100
    if name != "demo":  # paper settings (MODELS.md)
        assert cfg.optim.name == "nadam_lookahead" and cfg.optim.schedule == "exp"
        assert cfg.optim.gamma == pytest.approx(0.95)
        assert (cfg.optim.lookahead_alpha, cfg.optim.lookahead_k) == (0.5, 6)
        assert cfg.scaling.use_gpu and cfg.loss.dice_weight > 0 and cfg.loss.ce_weight > 0


def test_demo_is_two_half_cpu_workers():
    cfg = load_config(TrainConfig, CONFIGS / "demo.yaml")
    assert cfg.scaling.num_workers == 2 and cfg.scaling.cpus_per_worker == 0.5 and not cfg.scaling.use_gpu
    assert cfg.model.arch == "dxnet" and cfg.model.encoder == "test_efficientnet"
    assert cfg.epochs * cfg.steps_per_epoch <= 30
