"""Typed configuration for every stage (pydantic), YAML loading and dotted `--set` overrides.

Untyped dicts stop here: the library below receives these models.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

T = TypeVar("T", bound=BaseModel)

FormatName = Literal["msd", "brats", "camus", "chaos"]


class ConfigError(ValueError):
    """A configuration problem; the message names the file and field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------- preprocessing
class PreprocessConfig(Strict):
    format: FormatName | None = None
    input: str | None = None  # raw dataset directory
    output: str | None = None  # local path or s3://bucket/prefix
    # "median": the dataset's median spacing (nnU-Net); a list: explicit (mm, in array axis order);
    # None: keep each case's own spacing.
    target_spacing: Literal["median"] | list[float] | None = "median"
    orientation: str = "RAS"
    # "auto": CT -> clip to foreground percentiles + z-score; MR/US/other -> z-score over non-zero.
    normalization: Literal["auto", "zscore_nonzero", "ct", "none"] = "auto"
    ct_percentiles: tuple[float, float] = (0.5, 99.5)
    crop_foreground: bool = True
    image_dtype: Literal["float16", "float32"] = "float16"
    shard_target_mb: float = Field(64.0, gt=0)
    compression: str = "zstd"
    num_folds: int = Field(5, ge=2)
    seed: int = 0
    concurrency: int | None = Field(None, ge=1)  # Ray Data tasks in flight; None: Ray decides
    max_cases: int | None = Field(None, ge=1)
    plan_sample_cases: int = Field(64, ge=1)  # cases measured to fit the plan (spacing, CT statistics)


# ----------------------------------------------------------------------------- models / training
class ModelConfig(Strict):
    arch: str = "dxnet"  # an architecture or a preset (crossdim.models.list_architectures/presets)
    encoder: str = "test_efficientnet"  # any timm name
    in_channels: int | None = Field(None, ge=1)  # None: from the dataset manifest
    num_classes: int | None = Field(None, ge=1)  # None: from the manifest (regions or labels)
    options: dict[str, Any] = Field(default_factory=dict)  # further create_model kwargs


class InitConfig(Strict):
    # False: random; True: timm's pretrained weights; a str: a weights file/URI (.safetensors or
    # state dict), a crossdim checkpoint directory, `runs:/<id>/model` or `models:/name@alias`.
    pretrained: bool | str = False
    inflate_mode: Literal["repeat", "center"] = "repeat"


class AugmentConfig(Strict):
    enabled: bool = True
    flip_prob: float = Field(0.5, ge=0, le=1)
    rotate_prob: float = Field(0.2, ge=0, le=1)
    rotate_degrees: float = 15.0
    scale_intensity_prob: float = Field(0.2, ge=0, le=1)
    shift_intensity_prob: float = Field(0.2, ge=0, le=1)
    noise_prob: float = Field(0.1, ge=0, le=1)


class DataConfig(Strict):
    manifest: str = ""  # URI of a preprocessed dataset (the directory holding manifest.json)
    fold: int = Field(0, ge=0)
    patch_size: list[int] = Field(default_factory=lambda: [32, 32, 32])
    batch_size: int = Field(2, ge=1)
    foreground_ratio: float = Field(0.33, ge=0, le=1)  # share of patches forced to hold foreground
    slice_axis: int = -1  # Omnia-Net on 3D data: the spatial axis slices are taken along
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


class OptimConfig(Strict):
    name: Literal["nadam_lookahead", "nadam", "adamw"] = "nadam_lookahead"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lookahead_alpha: float = 0.5
    lookahead_k: int = 6
    schedule: Literal["exp", "cosine", "poly", "constant"] = "exp"
    gamma: float = 0.95  # exp: lr *= gamma every epoch (the paper: 5% decay per epoch)
    poly_power: float = 0.9
    warmup_epochs: int = 0


class LossConfig(Strict):
    dice_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(1.0, ge=0)  # BCE for region targets, CE for multi-class


class ScalingConfig(Strict):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)


class ValidationConfig(Strict):
    every: int = Field(1, ge=1)  # epochs
    sw_overlap: float = Field(0.5, ge=0, lt=1)
    sw_mode: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = Field(2, ge=1)
    max_cases: int | None = None
    hd95: bool = True


class TrackingConfig(Strict):
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else a local sqlite store
    experiment: str = "crossdim"
    registered_model_name: str | None = None
    alias: str | None = None
    log_model: bool = True


class TrainConfig(Strict):
    name: str = "crossdim-train"  # Ray run name: re-using it resumes that run
    storage_path: str = "~/crossdim_results"  # local path or s3://bucket/prefix
    storage_shared: bool = False  # a local storage_path is a filesystem mounted on every node (multi-node)
    model: ModelConfig = Field(default_factory=ModelConfig)
    init: InitConfig = Field(default_factory=InitConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    epochs: int = Field(10, ge=1)
    steps_per_epoch: int = Field(50, ge=1)
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    grad_clip: float | None = 12.0
    seed: int = 0
    max_failures: int = Field(2, ge=-1)
    num_to_keep: int = Field(2, ge=1)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v or "/" in v or v.strip() != v:
            raise ValueError("must be a non-empty name without '/' or surrounding spaces")
        return v


# ----------------------------------------------------------------------------- sweeps
class SearchDimension(Strict):
    """One searched value: exactly one of `values` (choice/grid), or `low`/`high` (+ `log`)."""

    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> "SearchDimension":
        has_values = self.values is not None
        has_range = self.low is not None or self.high is not None
        if has_values == has_range:
            raise ValueError("give either 'values' or 'low'/'high'")
        if has_values and not self.values:
            raise ValueError("'values' is empty")
        if has_range and (self.low is None or self.high is None or self.low >= self.high):
            raise ValueError("needs low < high")
        return self


class TuneConfig(Strict):
    name: str = "crossdim-sweep"
    train: TrainConfig = Field(default_factory=TrainConfig)
    # dotted TrainConfig field -> dimension, e.g. "model.arch": {values: [dxnet, dsnet]}
    search_space: dict[str, SearchDimension] = Field(default_factory=dict)
    search_alg: Literal["random", "grid", "optuna"] = "random"
    num_samples: int = Field(4, ge=1)
    metric: str = "val_dice"
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    max_concurrent_trials: int | None = Field(None, ge=1)
    registered_model_name: str | None = None
    alias: str = "champion"


# ----------------------------------------------------------------------------- inference
class PredictConfig(Strict):
    model: str = ""  # models:/name@alias, models:/name/version, runs:/id/model, or a local dir
    input: str = ""
    output: str = ""
    sw_overlap: float = Field(0.5, ge=0, lt=1)
    sw_mode: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = Field(4, ge=1)
    tta: bool = False
    save_probabilities: bool = False
    device: str = "auto"


# ----------------------------------------------------------------------------- loading
def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> T:
    """Build `cls` from an optional YAML file, then dotted `key=value` overrides (values parsed as YAML).

    Errors are one line naming the file and the field.
    """
    data: dict[str, Any] = dict(base or {})
    source = "defaults"
    if path is not None:
        source = str(path)
        data = deep_merge(data, read_yaml(path))
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(data, key, value)
        source = f"{source} + --set"
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {format_validation_error(exc)}") from None


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
    return loaded


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value (e.g. optim.lr=3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = value


def get_dotted(data: dict[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"field '{loc}': {msg}")
    more = len(exc.errors()) - 3
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": value} (e.g. for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
