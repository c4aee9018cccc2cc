"""The search space: dotted TrainConfig fields -> Ray Tune domains, checked before any work.

    search_space:
      optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}      # log-uniform
      model.encoder: {values: [efficientnet_b0, resnet34]}  # choice / grid axis
      "model.arch,data.patch_size":                         # a joint dimension: fields that move together
        values: [[omnianet, [128, 128]], [dxnet, [96, 96, 96]]]

Keys are dotted TrainConfig fields (`model.options.<name>` reaches into the free-form options).
A key naming several fields joined by ',' is one *joint* dimension: each value is a list with one
entry per field (Omnia-Net needs a 2D patch where DX-Net needs a 3D one). `name`, `storage_path`,
`data.manifest` and `tracking.*` belong to the sweep, not to a trial, and cannot be searched.

Domains per search algorithm:
- random / optuna: `values` -> `tune.choice`; `low`/`high` -> uniform, log-uniform (`log`), or
  integers (`integer`, `high` inclusive);
- grid: every `values` dimension is a `tune.grid_search` axis (the trials are their cross
  product); a `low`/`high` dimension is sampled afresh for each grid point; `num_samples` repeats
  the whole grid (num_samples=1: each grid point once).
Values that are not scalars (lists, mappings) travel through Tune as JSON text (Optuna's
categoricals take scalars only) and are decoded by `trial_config`.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

from crossdim.config import ConfigError, SearchDimension, TrainConfig, TuneConfig, format_validation_error, set_dotted

JOINT_SEPARATOR = ","
SWEEP_OWNED = ("name", "storage_path", "data.manifest", "tracking")
_SCALARS = (str, int, float, bool, type(None))


class SearchSpaceError(ConfigError):
    """An empty or invalid search space (one line, naming the key)."""


# ----------------------------------------------------------------------------- keys
def key_fields(key: str) -> list[str]:
    """'a.b,c.d' -> ['a.b', 'c.d'] (pure)."""
    return [part.strip() for part in key.split(JOINT_SEPARATOR)]


def field_error(field: str) -> str | None:
    """Why `field` is not a searchable dotted TrainConfig field, or None when it is (pure)."""
    if not field:
        return "empty field name"
    if any(field == owned or field.startswith(owned + ".") for owned in SWEEP_OWNED):
        return f"'{field}' is set by the sweep, not searched"
    model: type[BaseModel] = TrainConfig
    parts = field.split(".")
    for depth, part in enumerate(parts):
        info = model.model_fields.get(part)
        if info is None:
            where = ".".join(parts[:depth]) or "TrainConfig"
            return f"'{field}' is not a TrainConfig field ({where} has {', '.join(model.model_fields)})"
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if depth == len(parts) - 1:
                return f"'{field}' is a section; search one of its fields ({', '.join(annotation.model_fields)})"
            model = annotation
            continue
        if depth < len(parts) - 1 and not _is_mapping(annotation):
            return f"'{field}' goes below the leaf field '{'.'.join(parts[: depth + 1])}'"
        return None
    return None


def _is_mapping(annotation: Any) -> bool:
    return annotation is dict or get_origin(annotation) is dict or any(_is_mapping(a) for a in get_args(annotation))


# ----------------------------------------------------------------------------- values
def dimension_points(key: str, dim: SearchDimension) -> list[dict[str, Any]]:
    """The per-field assignments a dimension can take, for checking: every value, or low and high."""
    fields = key_fields(key)
    if dim.values is not None:
        points = []
        for value in dim.values:
            if len(fields) > 1 and (not isinstance(value, list) or len(value) != len(fields)):
                raise SearchSpaceError(f"search_space['{key}']: joint value {json.dumps(value)} must be a list of "
                                       f"{len(fields)} entries ({', '.join(fields)})")
            points.append(dict(zip(fields, value if len(fields) > 1 else [value])))
        return points
    if len(fields) > 1:
        raise SearchSpaceError(f"search_space['{key}']: a joint dimension needs 'values', not low/high")
    if dim.log and dim.low is not None and dim.low <= 0:
        raise SearchSpaceError(f"search_space['{key}']: log scale needs low > 0, got {dim.low:g}")
    cast = (lambda v: int(round(v))) if dim.integer else float
    return [{fields[0]: cast(dim.low)}, {fields[0]: cast(dim.high)}]


def check_point(base: dict[str, Any], key: str, point: dict[str, Any]) -> TrainConfig:
    """The base config with `point` applied, validated (SearchSpaceError naming the key and value)."""
    data = json.loads(json.dumps(base))
    for field, value in point.items():
        set_dotted(data, field, value)
    try:
        config = TrainConfig.model_validate(data)
    except ValidationError as exc:
        shown = json.dumps(point[key_fields(key)[0]] if len(point) == 1 else list(point.values()))
        raise SearchSpaceError(f"search_space['{key}']: value {shown} is invalid: {format_validation_error(exc)}") from None
    check_names(key, config, point)
    return config


def check_names(key: str, config: TrainConfig, point: dict[str, Any]) -> None:
    """Architecture and encoder names exist (cheap registry look-ups, no model is built)."""
    if "model.arch" in point:
        from crossdim.models import list_architectures, list_presets

        known = list_architectures() + list_presets()
        if config.model.arch not in known:
            raise SearchSpaceError(f"search_space['{key}']: unknown architecture '{config.model.arch}' "
                                   f"(valid: {', '.join(known)})")
    if "model.encoder" in point and ":" not in config.model.encoder:  # hf-hub:/local sources are checked per trial
        import timm

        if not timm.is_model(config.model.encoder):
            raise SearchSpaceError(f"search_space['{key}']: '{config.model.encoder}' is not a timm model name")


def check_search_space(config: TuneConfig) -> None:
    """Every key is a searchable field and every value validates; raises SearchSpaceError (one line)."""
    if not config.search_space:
        raise SearchSpaceError("search_space is empty: give at least one dotted TrainConfig field to search "
                               "(e.g. optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true})")
    base = config.train.model_dump(mode="json")
    seen: dict[str, str] = {}
    for key, dim in config.search_space.items():
        for field in key_fields(key):
            problem = field_error(field)
            if problem:
                raise SearchSpaceError(f"search_space['{key}']: {problem}")
            if field in seen:
                raise SearchSpaceError(f"search_space: field '{field}' appears in both '{seen[field]}' and '{key}'")
            seen[field] = key
        for point in dimension_points(key, dim):
            check_point(base, key, point)


def grid_points(config: TuneConfig) -> int:
    """Trials one pass of a grid makes: the product of the `values` dimensions' sizes (pure)."""
    sizes = [len(d.values) for d in config.search_space.values() if d.values is not None]
    return math.prod(sizes) if sizes else 1


def expected_trials(config: TuneConfig) -> int:
    return config.num_samples * (grid_points(config) if config.search_alg == "grid" else 1)


def candidate_configs(config: TuneConfig) -> list[TrainConfig]:
    """Trial configs at every combination of the dimensions that touch `scaling` (for resource checks)."""
    base = config.train.model_dump(mode="json")
    scaling_dims = [dimension_points(k, d) for k, d in config.search_space.items()
                    if any(f.startswith("scaling.") for f in key_fields(k))]
    combos = itertools.product(*scaling_dims) if scaling_dims else [()]
    out = []
    for combo in combos:
        point = {f: v for part in combo for f, v in part.items()}
        out.append(check_point(base, ",".join(point), point) if point else config.train)
    return out


# ----------------------------------------------------------------------------- Tune domains
def is_encoded(dim: SearchDimension) -> bool:
    """Values travel as JSON text when any is not a scalar (pure)."""
    return dim.values is not None and any(not isinstance(v, _SCALARS) for v in dim.values)


def to_domain(dim: SearchDimension, grid: bool) -> Any:
    from ray import tune

    if dim.values is not None:
        values = [json.dumps(v) for v in dim.values] if is_encoded(dim) else list(dim.values)
        return tune.grid_search(values) if grid else tune.choice(values)
    low, high = float(dim.low), float(dim.high)  # type: ignore[arg-type]
    if dim.integer:
        sampler = tune.lograndint if dim.log else tune.randint
        return sampler(int(round(low)), int(round(high)) + 1)  # Tune's upper bound is exclusive
    return tune.loguniform(low, high) if dim.log else tune.uniform(low, high)


def param_space(config: TuneConfig) -> dict[str, Any]:
    """{search key: Tune domain}; keys stay dotted (Tune nests on '/', not '.')."""
    grid = config.search_alg == "grid"
    return {key: to_domain(dim, grid) for key, dim in config.search_space.items()}


def decode_params(config: TuneConfig, params: dict[str, Any]) -> dict[str, Any]:
    """Tune's sampled values -> {dotted field: value} (JSON text decoded, joint keys split) (pure)."""
    out: dict[str, Any] = {}
    for key, dim in config.search_space.items():
        if key not in params:
            raise SearchSpaceError(f"trial parameters miss the searched key '{key}'")
        value = json.loads(params[key]) if is_encoded(dim) else params[key]
        if dim.integer and dim.values is None:
            value = int(value)
        fields = key_fields(key)
        out.update(zip(fields, value) if len(fields) > 1 else [(fields[0], value)])
    return out


def trial_config(base: TrainConfig, fields: dict[str, Any], name: str, tracking_uri: str | None = None) -> TrainConfig:
    """The trial's TrainConfig: base + searched fields, its own Ray run name, the sweep's tracking
    store, no registration (the sweep registers its best model) (pure)."""
    data = base.model_dump(mode="json")
    for field, value in fields.items():
        set_dotted(data, field, value)
    data["name"] = name
    data["tracking"].update(registered_model_name=None, alias=None)
    if tracking_uri:
        data["tracking"]["tracking_uri"] = tracking_uri
    return TrainConfig.model_validate(data)
