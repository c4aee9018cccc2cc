"""Segmentation losses (MONAI), chosen by the target kind.

- multi-class (softmax): `DiceCELoss(to_onehot_y=True, softmax=True)`; target (B, 1, *S) indices;
- regions (sigmoid, e.g. BraTS ET/TC/WT): `DiceLoss(sigmoid=True)` + `BCEWithLogitsLoss`; target
  (B, R, *S) of 0/1. (MONAI's DiceCELoss would use softmax cross-entropy for R > 1 channels, which
  is wrong for overlapping regions.)
Weights come from LossConfig (dice_weight, ce_weight).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from crossdim.config import LossConfig
from crossdim.train.targets import TargetSpec


class DiceBCELoss(nn.Module):
    """dice_weight * soft Dice(sigmoid) + ce_weight * BCE-with-logits, for multi-label regions."""

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0) -> None:
        super().__init__()
        from monai.losses import DiceLoss

        self.dice = DiceLoss(sigmoid=True, include_background=True)
        self.bce = nn.BCEWithLogitsLoss()
        self.dice_weight, self.bce_weight = dice_weight, bce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype)
        return self.dice_weight * self.dice(logits, target) + self.bce_weight * self.bce(logits, target)


def build_loss(spec: TargetSpec, cfg: LossConfig) -> nn.Module:
    if cfg.dice_weight == 0 and cfg.ce_weight == 0:
        raise ValueError("loss: dice_weight and ce_weight are both 0")
    if spec.kind == "regions":
        return DiceBCELoss(cfg.dice_weight, cfg.ce_weight)
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=cfg.dice_weight, lambda_ce=cfg.ce_weight)
