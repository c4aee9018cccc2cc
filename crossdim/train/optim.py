"""Optimizers (timm `create_optimizer_v2`) and per-epoch learning-rate schedules.

- `nadam_lookahead` (paper): NAdam wrapped in Lookahead (alpha, k from OptimConfig; timm's
  defaults are 0.5 / 6), with `schedule: exp` (lr *= gamma each epoch; gamma 0.95 = 5% decay);
- `nadam`, `adamw`: plain; `cosine` / `poly` / `constant` schedules for any of them.
Schedules are a pure factor per epoch (`lr_factor`) driven by a torch `LambdaLR`, stepped once per
epoch, with an optional linear warm-up.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from crossdim.config import OptimConfig

_TIMM_NAMES = {"nadam_lookahead": "lookahead_nadam", "nadam": "nadam", "adamw": "adamw"}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    optimizer = create_optimizer_v2(model, opt=_TIMM_NAMES[cfg.name], lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "nadam_lookahead":
        for group in optimizer.param_groups:
            group["lookahead_alpha"] = cfg.lookahead_alpha
            group["lookahead_k"] = cfg.lookahead_k
    return optimizer


def lr_factor(epoch: int, cfg: OptimConfig, total_epochs: int) -> float:
    """Multiplier of the base lr for a 0-based epoch (pure)."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / (cfg.warmup_epochs + 1)
    t = epoch - cfg.warmup_epochs
    span = max(total_epochs - cfg.warmup_epochs, 1)
    if cfg.schedule == "exp":
        return cfg.gamma**t
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(t / span, 1.0)))
    if cfg.schedule == "poly":
        return max(1.0 - t / span, 0.0) ** cfg.poly_power
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    total_epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, cfg, total_epochs))
