"""Training checkpoints: a directory any crossdim tool can read, with no pickled objects.

    config.json        the model's config (crossdim.models.io.save_model format)
    model.safetensors  the weights (same) -> `crossdim.models.load_model(dir)` works on any checkpoint
    dataset.json       manifest dataset + preprocess + fingerprint, the target spec and the window
                       (inference replays preprocessing, names classes, slides the same patch)
    train_state.pt     optimizer / scheduler / grad-scaler state dicts, epoch, global step, best
                       metric, MLflow run id; tensors, numbers and strings only, written with
                       torch.save and read with torch.load(weights_only=True)

Randomness: every epoch reseeds torch, the patch sampler and the augmentations from
(seed, rank, epoch) (`epoch_seed`), so a run resumed at epoch e draws exactly what an
uninterrupted run would have drawn (same world size); train_state records that seed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

TRAIN_STATE = "train_state.pt"
DATASET_JSON = "dataset.json"


@dataclass
class TrainState:
    epoch: int = -1  # last completed epoch (0-based); training resumes at epoch + 1
    global_step: int = 0
    best_metric: float = float("-inf")  # val_dice
    best_epoch: int = -1
    seed: int = 0
    mlflow_run_id: str = ""


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """A 63-bit seed per (seed, rank, epoch) (pure)."""
    digest = hashlib.sha256(f"{seed}:{rank}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def save_checkpoint(directory: str, model: nn.Module, state: TrainState, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: Any, dataset_info: dict[str, Any]) -> str:
    """Write a full checkpoint into `directory` (created). Returns it."""
    from crossdim.models.io import save_model

    os.makedirs(directory, exist_ok=True)
    save_model(unwrap(model), directory)
    write_dataset_info(directory, dataset_info)
    payload = {
        "format": 1,
        "state": asdict(state),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {},
    }
    torch.save(payload, os.path.join(directory, TRAIN_STATE))
    return directory


def write_dataset_info(directory: str, dataset_info: dict[str, Any]) -> None:
    with open(os.path.join(directory, DATASET_JSON), "w") as f:
        json.dump(dataset_info, f, indent=1, sort_keys=True, default=str)


def read_dataset_info(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, DATASET_JSON)
    if not os.path.isfile(path):
        raise ValueError(f"{directory}: not a crossdim training checkpoint (no {DATASET_JSON})")
    with open(path) as f:
        return json.load(f)


def load_train_state(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                     scaler: Any) -> TrainState:
    """Restore weights and optimizer/scheduler/scaler state from `directory` (in place)."""
    from crossdim.models.io import load_model

    path = os.path.join(directory, TRAIN_STATE)
    if not os.path.isfile(path):
        raise ValueError(f"{directory}: checkpoint has no {TRAIN_STATE}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    restored = load_model(directory)
    unwrap(model).load_state_dict(restored.state_dict())
    optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload.get("scheduler"):
        scheduler.load_state_dict(payload["scheduler"])
    if scaler is not None and payload.get("scaler"):
        scaler.load_state_dict(payload["scaler"])
    return TrainState(**payload["state"])
