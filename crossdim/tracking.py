"""MLflow tracking for training jobs: one run per job, logged by the driver and by rank 0 only.

Tracking URI: `tracking.tracking_uri`, else $MLFLOW_TRACKING_URI, else a local sqlite store
`sqlite:///<dir>/mlflow.db` with artifacts in `<dir>/mlartifacts`, where <dir> is the job's local
`storage_path` (or ~/.crossdim when storage is on S3). A multi-node cluster needs a tracking
server (workers on other nodes cannot see a local sqlite file).

What a run holds:
- params: the flattened TrainConfig, with anything that looks like a secret left out (keys such
  as *secret*, *password*, *token*, *access_key*; values holding a credential from the
  environment; user:password@ in URIs). Environment variables are never logged;
- per-epoch metrics (loss, lr, val_dice[_<class>], val_hd95_<class>, samples_per_s,
  data_wait_frac) from rank 0 (`EpochLogger`), plus a validation overlay PNG per evaluation;
- the resolved config (`config/train.json`), the dataset lineage (`log_inputs`: a MetaDataset
  whose source is the manifest URI and whose digest is the manifest fingerprint);
- the final model: an `mlflow.pyfunc` model (`CrossdimPyfunc`) whose artifact is the crossdim
  checkpoint directory (config.json + model.safetensors + dataset.json), so
  `mlflow.pyfunc.load_model(uri).predict(image)` runs sliding-window inference and
  `crossdim.models.load_model(<downloaded>/artifacts/checkpoint)` rebuilds the torch module;
  optionally registered under `tracking.registered_model_name` (+ alias).

A job re-run under the same Ray run name and storage path continues its MLflow run: runs are
found by the tag `crossdim.run_key` (a hash of storage path + name).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping
from urllib.parse import urlparse, urlunparse

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from crossdim.config import TrainConfig
    from crossdim.train.validation import Overlay

RUN_KEY_TAG = "crossdim.run_key"
MODEL_NAME = "model"  # the run's model: runs:/<run_id>/model
CHECKPOINT_ARTIFACT = "checkpoint"  # the pyfunc artifact key (and folder under artifacts/)
PROBE_TIMEOUT_S = 5
_SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|api[_-]?key|access[_-]?key|private[_-]?key|auth)", re.I)
_USERINFO = re.compile(r"//[^/@\s]+@")
_SECRET_ENV = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL|API_KEY)", re.I)


class TrackingError(ValueError):
    """The tracking server cannot be used; the message names the (credential-free) URI."""


# ----------------------------------------------------------------------------- URIs and secrets
def default_tracking_uri(storage_path: str) -> str:
    base = Path("~/.crossdim").expanduser() if str(storage_path).startswith("s3://") else Path(storage_path).expanduser()
    return f"sqlite:///{base.resolve() / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None, storage_path: str) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(storage_path)


def redact_uri(uri: str) -> str:
    """Drop user:password@ from a URI (pure)."""
    parsed = urlparse(str(uri))
    if parsed.username is None and parsed.password is None:
        return str(uri)
    host = parsed.hostname or ""
    netloc = f"{host}:{parsed.port}" if parsed.port else host
    return urlunparse(parsed._replace(netloc=netloc))


def scrub(text: str) -> str:
    """Free text (e.g. an error message) without user:password@ in URLs or secrets from the environment."""
    text = _USERINFO.sub("//", text)
    for value in _secret_values():
        text = text.replace(value, "***")
    return text


def _secret_values() -> list[str]:
    return [v for k, v in os.environ.items() if _SECRET_ENV.search(k) and v and len(v) >= 4]


def is_secret(key: str, value: Any, secrets: list[str] | None = None) -> bool:
    """A param that must not be logged: a secret-looking key, or a value holding a known secret."""
    if _SECRET_KEY.search(key.split(".")[-1]):
        return True
    text = str(value)
    return any(s in text for s in (secrets if secrets is not None else _secret_values()))


def safe_params(flat: Mapping[str, Any]) -> dict[str, str]:
    """Flattened config -> MLflow params with secrets left out and URIs redacted (pure but for env)."""
    secrets = _secret_values()
    out = {}
    for key, value in flat.items():
        if is_secret(key, value, secrets):
            continue
        text = redact_uri(value) if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        out[key] = text[:6000]
    return out


def redact_tree(data: Any, secrets: list[str] | None = None, key: str = "") -> Any:
    """A nested config with secret-looking entries replaced by '***' (for the config artifact)."""
    secrets = _secret_values() if secrets is None else secrets
    if isinstance(data, dict):
        return {k: redact_tree(v, secrets, str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [redact_tree(v, secrets, key) for v in data]
    if key and is_secret(key, data, secrets):
        return "***"
    return redact_uri(data) if isinstance(data, str) else data


# ----------------------------------------------------------------------------- server and runs
@contextlib.contextmanager
def _short_http_timeouts() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(PROBE_TIMEOUT_S)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_tracking(uri: str) -> None:
    """Fail fast (one line, within seconds) when the tracking store cannot be reached."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        with _short_http_timeouts():
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot track"
        detail = scrub(str(exc).strip().splitlines()[0][:200]) if str(exc).strip() else type(exc).__name__
        raise TrackingError(f"MLflow tracking server {redact_uri(uri)} is unreachable: {detail}") from None


def run_key(storage_path: str, name: str) -> str:
    return hashlib.sha256(f"{storage_path.rstrip('/')}|{name}".encode()).hexdigest()[:32]


def experiment_id(uri: str, experiment: str, storage_path: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # local store: artifacts next to the db, not in the cwd
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return client.create_experiment(experiment, artifact_location=location)


def start_or_resume_run(uri: str, experiment: str, storage_path: str, name: str) -> tuple[str, bool]:
    """(run id, resumed): the run tagged with this job's key, else a new one."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = experiment_id(uri, experiment, storage_path)
    key = run_key(storage_path, name)
    runs = client.search_runs([exp], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    if runs:
        client.update_run(runs[0].info.run_id, status="RUNNING")
        return runs[0].info.run_id, True
    run = client.create_run(exp, run_name=name, tags={RUN_KEY_TAG: key, "crossdim.ray_run_name": name,
                                                      "crossdim.storage_path": redact_uri(storage_path)})
    return run.info.run_id, False


def log_run_setup(uri: str, run_id: str, config: "TrainConfig", manifest_uri: str,
                  manifest: Mapping[str, Any]) -> None:
    """Params, the resolved config artifact and the dataset lineage (driver, once per job start)."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from crossdim.config import flatten

    client = MlflowClient(uri)
    existing = client.get_run(run_id).data.params
    params = {k: v for k, v in safe_params(flatten(config.model_dump())).items() if k not in existing}
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])
    client.log_dict(run_id, redact_tree(config.model_dump()), "config/train.json")
    log_dataset(client, run_id, manifest_uri, manifest)


def log_dataset(client: Any, run_id: str, manifest_uri: str, manifest: Mapping[str, Any]) -> None:
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    uri = redact_uri(manifest_uri)
    try:
        with warnings.catch_warnings():  # local paths match two equivalent source classes; either is right
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(uri if "://" in uri else Path(uri).resolve().as_uri())
    except Exception:  # noqa: BLE001 - unknown schemes fall back to a plain HTTP-style source
        from mlflow.data.http_dataset_source import HTTPDatasetSource

        source = HTTPDatasetSource(uri)
    info = manifest.get("dataset", {})
    dataset = MetaDataset(source, name=str(info.get("name") or "dataset"),
                          digest=str(manifest.get("fingerprint", ""))[:36] or None)
    entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])
    client.log_inputs(run_id, datasets=[entity])


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).set_terminated(run_id, status=status)


# ----------------------------------------------------------------------------- per-epoch logging
class EpochLogger:
    """Rank 0's per-epoch metrics and validation pictures (MlflowClient; no global state)."""

    def __init__(self, uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(uri), run_id

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in values.items()
                 if isinstance(v, (int, float, np.floating)) and np.isfinite(v)]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def overlay(self, step: int, overlay: "Overlay") -> None:
        import matplotlib.pyplot as plt

        fig = render_overlay(overlay)
        try:
            self.client.log_figure(self.run_id, fig, f"validation/epoch_{step:04d}.png")
        finally:
            plt.close(fig)


def render_overlay(overlay: "Overlay") -> Any:
    """One figure: image, truth and prediction of one slice."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    vmax = max(int(overlay.truth.max()), int(overlay.prediction.max()), 1)
    for ax, (title, data) in zip(axes, (("image", None), ("truth", overlay.truth), ("prediction", overlay.prediction))):
        ax.imshow(overlay.image, cmap="gray")
        if data is not None:
            ax.imshow(np.ma.masked_equal(data, 0), cmap="autumn", alpha=0.6, vmin=0, vmax=vmax)
        ax.set_title(f"{overlay.case_id}: {title}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- the model
MODEL_CODE = """\
# crossdim pyfunc model (MLflow models-from-code): the checkpoint directory is the artifact.
import mlflow.models

from crossdim.tracking import CrossdimPyfunc

mlflow.models.set_model(CrossdimPyfunc())
"""
PIP_REQUIREMENTS = ("torch", "timm", "monai", "safetensors", "numpy", "pydantic")


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("crossdim", *PIP_REQUIREMENTS):
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


try:  # the wrapper class must be importable by MLflow's loader; mlflow is a hard dependency
    from mlflow.pyfunc import PythonModel as _PythonModel
except ImportError:  # pragma: no cover
    _PythonModel = object  # type: ignore[assignment,misc]


class CrossdimPyfunc(_PythonModel):  # type: ignore[misc,valid-type]
    """An MLflow pyfunc over a crossdim checkpoint directory.

    predict(image (C, *S) float32) -> label map (*S) uint8 in the dataset's raw label values
    (regions such as BraTS ET/TC/WT painted back into one label map).
    """

    def load_context(self, context: Any) -> None:
        from crossdim.models import load_model
        from crossdim.train.checkpoint import read_dataset_info

        directory = context.artifacts[CHECKPOINT_ARTIFACT]
        self.model = load_model(directory).eval()
        self.info = read_dataset_info(directory)

    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        return predict_label_map(self.model, self.info, np.asarray(model_input, dtype=np.float32))


def predict_label_map(model: Any, info: Mapping[str, Any], image: np.ndarray) -> np.ndarray:
    """Sliding-window prediction of one preprocessed image (C, *S) -> raw label map (*S)."""
    import torch

    from crossdim.config import ValidationConfig
    from crossdim.train.targets import TargetSpec, logits_to_masks, masks_to_label_map
    from crossdim.train.validation import predict_logits

    window = info["window"]
    spec = TargetSpec.model_validate(info["target"])
    cfg = ValidationConfig(sw_overlap=window.get("overlap", 0.5), sw_mode=window.get("mode", "gaussian"))
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = predict_logits(model, torch.from_numpy(image)[None].to(device), window["roi_size"], cfg,
                                window.get("slice_axis"))
    return masks_to_label_map(logits_to_masks(logits, spec)[0].cpu().numpy(), spec)


def log_checkpoint_model(uri: str, run_id: str, checkpoint_dir: str) -> str:
    """Log `checkpoint_dir` as the run's pyfunc model. Returns runs:/<run_id>/model."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from crossdim.train.checkpoint import read_dataset_info

    info = read_dataset_info(checkpoint_dir)
    channels, dims = int(info["in_channels"]), int(info["spatial_dims"])
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (channels,) + (-1,) * dims)]),
                               outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1,) * dims)]))
    example = np.zeros((channels, *info["window"]["roi_size"][:dims]), dtype=np.float32)
    if len(info["window"]["roi_size"]) < dims:  # 2D model on 3D data: a thin stack of slices
        example = np.zeros((channels, 2, *info["window"]["roi_size"]), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="crossdim-pyfunc-") as tmp, using_tracking_uri(uri), \
            mlflow.start_run(run_id=run_id):
        code = os.path.join(tmp, "crossdim_model.py")  # MLflow "models from code": nothing pickled
        with open(code, "w") as f:
            f.write(MODEL_CODE)
        mlflow.pyfunc.log_model(name=MODEL_NAME, python_model=code,
                                artifacts={CHECKPOINT_ARTIFACT: checkpoint_dir}, pip_requirements=_pip_requirements(),
                                signature=signature, input_example=example)
    return f"runs:/{run_id}/{MODEL_NAME}"


def register(uri: str, model_uri: str, name: str, alias: str | None = None) -> str:
    """Register `model_uri` under `name` (+ alias). Returns the new version."""
    import mlflow
    from mlflow.tracking import MlflowClient

    with using_tracking_uri(uri):
        version = mlflow.register_model(model_uri, name).version
    if alias:
        MlflowClient(uri).set_registered_model_alias(name, alias, version)
    return str(version)


@contextlib.contextmanager
def using_tracking_uri(uri: str | None) -> Iterator[None]:
    """Point the fluent MLflow API (needed by `log_model`) at `uri` for a block, then restore
    exactly the previous state: the global setting (MLflow keeps it in a module variable) and
    $MLFLOW_TRACKING_URI (which `set_tracking_uri` also writes)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    if not uri:
        yield
        return
    saved_global, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_global)
        if saved_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env
