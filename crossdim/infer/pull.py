"""Model URI -> a verified local checkpoint directory (`config.json` + `model.safetensors` [+ dataset.json]).

- `models:/name@alias` / `models:/name/version`: the alias is pinned to its version first, then
  `models:/name/<version>` is downloaded, so the cache key never follows a moving alias;
- `runs:/<id>/<path>`: downloaded as is; `s3://...`: copied with crossdim.storage;
- a local directory: used in place (not cached).

Downloads land in `$CROSSDIM_CACHE_DIR` (default `~/.cache/crossdim/models`) under
`<sha256(tracking URI | pinned URI)[:20]>/`, written to a temporary folder and renamed into place.
Integrity: when the checkpoint records checksums (`checksums.json`, or `sha256` entries in
config.json's `extra`) they are verified; the cache additionally records the sha256 of every file
it downloaded (`crossdim-cache.json`) and re-verifies them on every hit: a tampered or truncated
cache entry is downloaded again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from crossdim import storage
from crossdim.infer.registry import RegistryError, ResolvedModel, is_registry_uri, mlflow_message, resolve
from crossdim.models.io import CHECKSUMS_FILE, CONFIG_FILE, WEIGHTS_FILE

CACHE_RECORD = "crossdim-cache.json"
_CHUNK = 8 << 20


class ChecksumError(ValueError):
    """A checkpoint file whose sha256 differs from the recorded one."""


@dataclass(frozen=True)
class PulledModel:
    directory: Path  # the checkpoint directory (config.json + model.safetensors)
    uri: str  # as given
    name: str | None = None
    version: str | None = None
    run_id: str | None = None
    cached: bool = False  # served from the cache without a download


def cache_root() -> Path:
    return Path(os.environ.get("CROSSDIM_CACHE_DIR") or Path.home() / ".cache" / "crossdim" / "models")


def cache_key(pinned: str) -> str:
    return hashlib.sha256(pinned.encode()).hexdigest()[:20]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def pull(uri: str) -> PulledModel:
    """Resolve, download (or reuse the cache) and verify the checkpoint behind `uri`."""
    uri = str(uri).strip()
    if not uri:
        raise ValueError("--model: empty model URI")
    if os.path.isdir(uri):
        directory = local_checkpoint(Path(uri))
        verify_recorded(directory)
        return PulledModel(directory=directory, uri=uri)
    if storage.is_s3(uri):
        return _pull_cached(uri, f"{uri}", lambda dst: storage.download_dir(uri, str(dst)))
    if not is_registry_uri(uri):
        raise ValueError(f"--model {uri}: not a directory, s3:// URI or MLflow model URI "
                         "(models:/name@alias, models:/name/version, runs:/<id>/<path>)")
    resolved = resolve(uri)
    pulled = _pull_cached(uri, resolved.pinned, lambda dst: _download(resolved, dst))
    return PulledModel(directory=pulled.directory, uri=uri, name=resolved.name, version=resolved.version,
                       run_id=resolved.run_id, cached=pulled.cached)


def _download(resolved: ResolvedModel, dst: Path) -> None:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        mlflow.artifacts.download_artifacts(artifact_uri=resolved.download_uri, dst_path=str(dst),
                                            tracking_uri=resolved.tracking_uri)
    except (MlflowException, OSError) as exc:
        raise RegistryError(f"{resolved.uri}: download of {resolved.download_uri} failed "
                            f"({mlflow_message(exc)})") from None


def _pull_cached(uri: str, pinned: str, download) -> PulledModel:
    entry = cache_root() / cache_key(pinned)
    if entry.is_dir() and _cache_ok(entry):
        return PulledModel(directory=find_checkpoint(entry, uri), uri=uri, cached=True)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        download(tmp)
        directory = find_checkpoint(tmp, uri)
        verify_recorded(directory)
        write_cache_record(tmp, pinned)
        _install(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PulledModel(directory=find_checkpoint(entry, uri), uri=uri)


def _install(tmp: Path, entry: Path) -> None:
    """Move a verified download into place; a concurrent puller that got there first wins."""
    if entry.exists() and _cache_ok(entry):
        return
    shutil.rmtree(entry, ignore_errors=True)
    try:
        os.replace(tmp, entry)
    except OSError:
        if not _cache_ok(entry):
            raise


def local_checkpoint(root: Path) -> Path:
    """A local checkpoint directory, or a downloaded MLflow pyfunc model holding one."""
    for candidate in (root, root / "artifacts" / "checkpoint"):
        if (candidate / CONFIG_FILE).is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate
    raise ValueError(f"{root}: no crossdim checkpoint ({CONFIG_FILE} + {WEIGHTS_FILE}) in this directory "
                     "or its artifacts/checkpoint")


def find_checkpoint(root: Path, uri: str) -> Path:
    """The shallowest directory under `root` holding config.json + model.safetensors."""
    candidates = sorted((p.parent for p in root.rglob(WEIGHTS_FILE) if (p.parent / CONFIG_FILE).is_file()),
                        key=lambda p: (len(p.parts), str(p)))
    if not candidates:
        raise ValueError(f"{uri}: no crossdim checkpoint ({CONFIG_FILE} + {WEIGHTS_FILE}) in the model artifacts")
    return candidates[0]


# ----------------------------------------------------------------------------- integrity
def recorded_checksums(directory: Path) -> dict[str, str]:
    """sha256 values the checkpoint itself records: checksums.json {file: sha256} and/or
    config.json `extra.sha256` ({file: sha256} or the weights' sha256 as a string)."""
    out: dict[str, str] = {}
    listed = directory / CHECKSUMS_FILE
    if listed.is_file():
        out.update(_json(listed))
    extra = _json(directory / CONFIG_FILE).get("extra") or {}
    value = extra.get("sha256") if isinstance(extra, dict) else None
    if isinstance(value, str):
        out.setdefault(WEIGHTS_FILE, value)
    elif isinstance(value, dict):
        for name, digest in value.items():
            out.setdefault(str(name), str(digest))
    return out


def verify_recorded(directory: Path) -> None:
    """Check the checkpoint's recorded checksums (ChecksumError naming the file when one differs)."""
    for name, expected in recorded_checksums(directory).items():
        _check(directory / name, expected)


def _check(path: Path, expected: str) -> None:
    if not path.is_file():
        raise ChecksumError(f"{path}: file listed in the checkpoint checksums is missing")
    actual = file_sha256(path)
    if actual != expected:
        raise ChecksumError(f"{path}: sha256 {actual[:12]}... does not match the recorded {expected[:12]}...")


def write_cache_record(root: Path, pinned: str) -> None:
    files = {str(p.relative_to(root)): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}
    (root / CACHE_RECORD).write_text(json.dumps({"pinned": pinned, "files": files}, indent=1, sort_keys=True))


def _cache_ok(entry: Path) -> bool:
    record = entry / CACHE_RECORD
    if not record.is_file():
        return False
    try:
        files = json.loads(record.read_text())["files"]
        for name, digest in files.items():
            _check(entry / name, digest)
        verify_recorded(find_checkpoint(entry, str(entry)))
    except (ChecksumError, ValueError, KeyError, OSError):
        return False
    return True


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data
