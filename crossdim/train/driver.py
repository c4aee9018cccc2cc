"""The training job's driver: pre-flight checks, one TorchTrainer, MLflow run, final model.

`run(config)` = `prepare` (every check that can fail, before any Ray Train work) ->
`build_trainer` (the one `TorchTrainer`; Tune builds the same with its callbacks) -> `fit` ->
`finish` (the final model as an MLflow pyfunc, optionally registered).

Resuming: Ray Train resumes a run from its last checkpoint when the same `name` and
`storage_path` are used again (a finished run then does no more training); the MLflow run is
found again by its `crossdim.run_key` tag and continued. Give new runs new names.

The same code runs on one CPU or many GPU nodes: only `scaling` changes. On a cluster,
`storage_path` must be shared storage (s3://...) and the tracking URI a server.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from pydantic import BaseModel

from crossdim import storage
from crossdim.config import TrainConfig
from crossdim.train.errors import NonFiniteLossError, TrainConfigError
from crossdim.train.loop import WorkerJob, train_loop_per_worker
from crossdim.train.targets import TargetSpec, target_spec

RAY_DATA_SPARE_CPUS = 1.0  # Ray Data's read tasks need a CPU beside the training workers
MODEL_FILES = ("config.json", "model.safetensors", "checksums.json", "dataset.json")


class TrainResult(BaseModel):
    name: str
    epochs_completed: int
    metrics: dict[str, float]  # the last epoch's reported metrics (rank 0)
    best_val_dice: float | None = None
    best_epoch: int | None = None
    checkpoint: str | None = None  # URI of the last checkpoint directory
    run_path: str | None = None  # the Ray run's directory (URI)
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None  # without credentials
    model_uri: str | None = None  # runs:/<id>/model
    registered_version: str | None = None


@dataclass
class PreparedRun:
    config: TrainConfig
    job: WorkerJob
    manifest: dict[str, Any]
    datasets: dict[str, Any]  # "train" / "val" Ray Datasets
    tracking_uri: str | None


# ----------------------------------------------------------------------------- pre-flight
def fail(message: str) -> TrainConfigError:
    return TrainConfigError(message.strip().splitlines()[0] if message.strip() else "invalid configuration")


def probe_model(config: TrainConfig, in_channels: int, num_classes: int) -> Any:
    """Build the configured model once (random weights) to validate arch, encoder and options."""
    from crossdim.models import create_model

    try:
        return create_model(config.model.arch, encoder=config.model.encoder, in_channels=in_channels,
                            num_classes=num_classes, pretrained=False, **config.model.options)
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise fail(f"model ({config.model.arch}, encoder {config.model.encoder!r}): {exc}") from None


def channels_and_classes(config: TrainConfig, manifest: dict[str, Any], spec: TargetSpec) -> tuple[int, int]:
    channels = {int(c["channels"]) for c in manifest["cases"]}
    if len(channels) != 1:
        raise fail(f"data.manifest: cases have different channel counts {sorted(channels)}")
    in_channels = channels.pop()
    for field, configured, actual in (("model.in_channels", config.model.in_channels, in_channels),
                                      ("model.num_classes", config.model.num_classes, spec.num_channels)):
        if configured is not None and configured != actual:
            raise fail(f"{field}={configured} does not match the dataset ({actual}, from {config.data.manifest})")
    return in_channels, spec.num_channels


def check_patch(config: TrainConfig, manifest: dict[str, Any], model: Any) -> int:
    """The patch fits the model and the data; returns the data's spatial dims."""
    patch, dims = list(config.data.patch_size), int(getattr(model, "spatial_dims", 3))
    shapes = [list(c["shape"]) for c in manifest["cases"]]
    data_dims = len(shapes[0])
    if len(patch) != dims:
        raise fail(f"data.patch_size {patch} has {len(patch)} values; a {dims}D model ({config.model.arch}) needs {dims}")
    if dims == 3 and data_dims != 3:
        raise fail(f"model.arch {config.model.arch} is 3D but the dataset {config.data.manifest} is 2D")
    axes = list(range(data_dims))
    if dims == 2 and data_dims == 3:
        if not -3 <= config.data.slice_axis <= 2:
            raise fail(f"data.slice_axis={config.data.slice_axis} is not a spatial axis of 3D data (-3..2)")
        axes.remove(config.data.slice_axis % 3)
    largest = [max(s[a] for s in shapes) for a in axes]
    if any(p > m for p, m in zip(patch, largest)):
        raise fail(f"data.patch_size {patch} is larger than the data (largest case extent {largest} "
                   f"along axes {axes} in {config.data.manifest})")
    check_input = getattr(model, "check_input", None)
    if check_input is not None:
        import torch

        try:
            check_input(torch.empty((1, model.in_channels, *patch), device="meta"))
        except ValueError as exc:
            raise fail(f"data.patch_size {patch}: {exc}") from None
    return data_dims


def check_amp(config: TrainConfig) -> None:
    if config.amp == "fp16" and not config.scaling.use_gpu:
        raise fail("amp=fp16 needs GPU workers (scaling.use_gpu=true); use bf16 or off on CPU")


def check_cluster(config: TrainConfig) -> None:
    """Enough CPUs/GPUs in the Ray cluster for the workers (+ a CPU for Ray Data)."""
    import ray

    total = ray.cluster_resources()
    sc = config.scaling
    need_cpu = sc.num_workers * sc.cpus_per_worker + RAY_DATA_SPARE_CPUS
    need_gpu = sc.num_workers * sc.gpus_per_worker if sc.use_gpu else 0.0
    have_cpu, have_gpu = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    if need_cpu > have_cpu + 1e-9 or need_gpu > have_gpu + 1e-9:
        raise fail(f"scaling: {sc.num_workers} workers x (CPU {sc.cpus_per_worker}"
                   f"{f', GPU {sc.gpus_per_worker}' if sc.use_gpu else ''}) + {RAY_DATA_SPARE_CPUS:g} CPU for Ray Data "
                   f"need CPU {need_cpu:g}, GPU {need_gpu:g}; the Ray cluster has CPU {have_cpu:g}, GPU {have_gpu:g} "
                   "(lower scaling.num_workers or the per-worker resources)")


def check_storage(config: TrainConfig) -> None:
    try:
        storage.check_writable(local_or_uri(config.storage_path))
    except (storage.StorageError, OSError) as exc:
        raise fail(f"storage_path: {exc}") from None


def alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def check_shared_storage(config: TrainConfig, nodes: int, tracking_uri: str | None = None) -> None:
    """On a cluster of several nodes every worker writes checkpoints and the driver reads them back,
    and rank 0 (on any node) logs to MLflow: a local storage_path or a local tracking store (sqlite,
    file) is only shared when the user says it is on a mount that every node has."""
    if nodes <= 1 or config.storage_shared:
        return
    if storage.is_local(config.storage_path):
        raise fail(f"storage_path {config.storage_path!r} is a local path but the Ray cluster has {nodes} nodes: "
                   "use shared storage, e.g. storage_path=s3://bucket/prefix, or set storage_shared=true "
                   "if that path is a filesystem mounted on every node")
    if tracking_uri and is_local_tracking_store(tracking_uri):
        from crossdim.tracking import redact_uri

        raise fail(f"tracking.tracking_uri {redact_uri(tracking_uri)!r} is a store on this node but the Ray cluster "
                   f"has {nodes} nodes and rank 0 logs from its own node: use an MLflow server "
                   "(tracking.tracking_uri=http://host:5000 or MLFLOW_TRACKING_URI), or set storage_shared=true "
                   "if that path is a filesystem mounted on every node")


def is_local_tracking_store(uri: str) -> bool:
    """sqlite:/// and file: stores and bare paths live on one machine's disk (pure)."""
    scheme = urlparse(str(uri)).scheme.lower()
    return scheme in ("", "file", "sqlite") or len(scheme) == 1  # a Windows drive letter is a path


def check_tracking(config: TrainConfig) -> str:
    from crossdim.tracking import TrackingError, check_tracking, resolve_tracking_uri

    uri = resolve_tracking_uri(config.tracking.tracking_uri, local_or_uri(config.storage_path))
    try:
        check_tracking(uri)
    except TrackingError as exc:
        raise fail(f"tracking: {exc}") from None
    return uri


def read_data(config: TrainConfig) -> tuple[dict[str, Any], list[str], list[str]]:
    from crossdim.data.shards import read_manifest, select_ids

    if not config.data.manifest:
        raise fail("data.manifest is empty: set it to a preprocessed dataset (crossdim preprocess --output URI)")
    try:
        manifest = read_manifest(config.data.manifest)
        train_ids = select_ids(manifest, "train", config.data.fold)
        val_ids = select_ids(manifest, "val", config.data.fold)
    except (ValueError, OSError) as exc:
        raise fail(f"data.manifest: {exc}") from None
    unlabelled = [c["id"] for c in manifest["cases"] if c["id"] in set(train_ids + val_ids) and not c.get("has_label", True)]
    if unlabelled:
        raise fail(f"data.manifest: train/val cases without labels: {', '.join(unlabelled[:5])}")
    if len(train_ids) < config.scaling.num_workers:
        raise fail(f"scaling.num_workers={config.scaling.num_workers} exceeds the {len(train_ids)} training cases "
                   f"of fold {config.data.fold}")
    return manifest, train_ids, val_ids


def open_datasets(config: TrainConfig) -> dict[str, Any]:
    """Ray Datasets of the fold's splits; shard checksums are verified here (pre-flight)."""
    from crossdim.data.shards import open_shards

    try:
        return {split: open_shards(config.data.manifest, split, config.data.fold, verify=True)
                for split in ("train", "val")}
    except (ValueError, OSError) as exc:
        raise fail(f"data.manifest: {exc}") from None


def local_or_uri(path: str) -> str:
    return path if storage.is_s3(path) else os.path.abspath(os.path.expanduser(path))


# ----------------------------------------------------------------------------- prepare / build / run
def dataset_info(config: TrainConfig, manifest: dict[str, Any], spec: TargetSpec, in_channels: int,
                 model_dims: int, data_dims: int) -> dict[str, Any]:
    """dataset.json of every checkpoint: what inference needs besides the weights."""
    slice_axis = config.data.slice_axis % 3 if (model_dims == 2 and data_dims == 3) else None
    return {
        "manifest": config.data.manifest,
        "fingerprint": manifest.get("fingerprint"),
        "dataset": manifest.get("dataset", {}),
        "preprocess": manifest.get("preprocess", {}),
        "target": spec.model_dump(),
        "in_channels": in_channels,
        "spatial_dims": data_dims,
        "model_spatial_dims": model_dims,
        "window": {"roi_size": list(config.data.patch_size), "slice_axis": slice_axis,
                   "overlap": config.validation.sw_overlap, "mode": config.validation.sw_mode},
    }


def fault_hooks() -> dict[str, Any]:
    """The documented test hooks (see crossdim.train.loop), read from the driver's environment."""
    nan_at = os.environ.get("CROSSDIM_NAN_LOSS_AT")
    return {"fail_once": os.environ.get("CROSSDIM_FAIL_ONCE") or None,
            "nan_loss_at": int(nan_at) if nan_at else None}


def ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init()


def prepare(config: TrainConfig, tracking: bool = True) -> PreparedRun:
    """Every pre-flight check (TrainConfigError, one line), then the datasets and the MLflow run."""
    from crossdim.train.transfer import check_source

    check_amp(config)
    manifest, train_ids, val_ids = read_data(config)
    try:
        spec = target_spec(manifest.get("dataset", {}))
    except ValueError as exc:
        raise fail(f"data.manifest: {exc}") from None
    in_channels, num_classes = channels_and_classes(config, manifest, spec)
    model = probe_model(config, in_channels, num_classes)
    data_dims = check_patch(config, manifest, model)
    tracking_uri = check_tracking(config) if tracking else None
    try:
        check_source(config.init, tracking_uri)
    except ValueError as exc:
        raise fail(str(exc)) from None
    check_storage(config)
    ensure_ray()
    check_shared_storage(config, alive_nodes(), tracking_uri)
    check_cluster(config)
    datasets = open_datasets(config)
    job = WorkerJob(config=config, target=spec, in_channels=in_channels, data_spatial_dims=data_dims,
                    train_ids=train_ids, val_ids=val_ids, tracking_uri=tracking_uri,
                    dataset_info=dataset_info(config, manifest, spec, in_channels, model.spatial_dims, data_dims),
                    **fault_hooks())
    return PreparedRun(config, job, manifest, datasets, tracking_uri)


def start_tracking(prepared: PreparedRun) -> None:
    """Open (or continue) the job's MLflow run and log its setup; sets job.run_id."""
    from crossdim import tracking

    if prepared.tracking_uri is None:
        return
    cfg = prepared.config
    run_id, _resumed = tracking.start_or_resume_run(prepared.tracking_uri, cfg.tracking.experiment,
                                                    local_or_uri(cfg.storage_path), cfg.name)
    tracking.log_run_setup(prepared.tracking_uri, run_id, cfg, cfg.data.manifest, prepared.manifest)
    prepared.job.run_id = run_id


def run_config(config: TrainConfig, callbacks: list[Any] | None = None) -> Any:
    import ray.train

    path = local_or_uri(config.storage_path)
    fs_kwargs: dict[str, Any] = {}
    if storage.is_s3(path):  # an explicit filesystem: workers need no AWS_ENDPOINT_URL of their own
        fs, inner = storage.filesystem(path)
        fs_kwargs = {"storage_filesystem": fs}
        path = inner
    return ray.train.RunConfig(
        name=config.name, storage_path=path, callbacks=callbacks or [],
        failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.num_to_keep), **fs_kwargs)


def build_trainer(prepared: PreparedRun, callbacks: list[Any] | None = None) -> Any:
    """The one TorchTrainer of a job (Tune passes its report callback)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from crossdim.train.ingest import CaseSplit, one_case_per_block

    sc = prepared.config.scaling
    resources = {"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if sc.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=prepared.job.model_dump(mode="json"),
        scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                               resources_per_worker=resources),
        run_config=run_config(prepared.config, callbacks),
        datasets={name: one_case_per_block(ds) for name, ds in prepared.datasets.items()},
        dataset_config=CaseSplit(),
    )


def checkpoint_uri(config: TrainConfig, checkpoint: Any) -> str | None:
    if checkpoint is None:
        return None
    return f"s3://{checkpoint.path}" if storage.is_s3(config.storage_path) else checkpoint.path


def finish(prepared: PreparedRun, result: Any) -> TrainResult:
    """Raise on a NaN stop; else log the final model and summarise."""
    cfg, metrics = prepared.config, dict(result.metrics or {})  # metrics of the latest checkpoint
    ckpt_uri = checkpoint_uri(cfg, result.checkpoint)
    stopped_at = int(metrics.get("epoch", -1)) + 1
    if stopped_at < cfg.epochs:  # the workers only end early on a non-finite loss (loop.run_epoch)
        raise NonFiniteLossError(f"non-finite loss in epoch {stopped_at}: training stopped; "
                                 f"last good checkpoint: {ckpt_uri or 'none'}")
    model_uri = version = None
    if prepared.tracking_uri and prepared.job.run_id and cfg.tracking.log_model and result.checkpoint is not None:
        model_uri, version = log_final_model(prepared, result.checkpoint)
    best = metrics.get("best_val_dice")
    return TrainResult(
        name=cfg.name, epochs_completed=int(metrics.get("epoch", -1)) + 1,
        metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        best_val_dice=best, best_epoch=int(metrics["best_epoch"]) if "best_epoch" in metrics else None,
        checkpoint=ckpt_uri, run_path=str(result.path), mlflow_run_id=prepared.job.run_id,
        tracking_uri=_redacted(prepared.tracking_uri), model_uri=model_uri, registered_version=version)


def _redacted(uri: str | None) -> str | None:
    from crossdim.tracking import redact_uri

    return redact_uri(uri) if uri else None


def log_final_model(prepared: PreparedRun, checkpoint: Any) -> tuple[str, str | None]:
    """The last checkpoint's model files (MODEL_FILES, without the training state) as the run's pyfunc model."""
    from crossdim import tracking

    cfg = prepared.config.tracking
    with tempfile.TemporaryDirectory(prefix="crossdim-model-") as tmp:
        full, model_dir = os.path.join(tmp, "full"), os.path.join(tmp, "model")
        checkpoint.to_directory(full)
        os.makedirs(model_dir)
        for name in MODEL_FILES:
            shutil.copy2(os.path.join(full, name), os.path.join(model_dir, name))
        model_uri = tracking.log_checkpoint_model(prepared.tracking_uri, prepared.job.run_id, model_dir)
    version = None
    if cfg.registered_model_name:
        version = tracking.register(prepared.tracking_uri, model_uri, cfg.registered_model_name, cfg.alias)
    return model_uri, version


def run(config: TrainConfig) -> TrainResult:
    """Train `config` on Ray Train; see the module docstring."""
    from crossdim import tracking

    prepared = prepare(config)
    start_tracking(prepared)
    status = "FAILED"
    try:
        result = build_trainer(prepared).fit()
        summary = finish(prepared, result)
        status = "FINISHED"
        return summary
    finally:
        if prepared.tracking_uri and prepared.job.run_id:
            tracking.finish_run(prepared.tracking_uri, prepared.job.run_id, status)
