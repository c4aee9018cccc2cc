"""`crossdim doctor`: is this machine ready to run crossdim jobs?

Checks the installed stack (torch/CUDA, timm, ray, mlflow, monai), the Ray cluster (RAY_ADDRESS),
the MLflow tracking server, S3 credentials/endpoint and the storage URI, and prints one table row
per check: check | status (ok, warn, fail) | detail | how to fix. Exit code 1 when any check fails.

Every network probe is bounded by `timeout` seconds (TCP connects, HTTP requests, MLflow retries
off, boto3 connect/read timeouts, the instance-metadata lookup, a killed-on-timeout subprocess for
Ray). Nothing is started: without RAY_ADDRESS the Ray check reports local mode. Secrets are never
printed: an access key id shows only its last 4 characters, and every detail is scrubbed of the
values of the secret environment variables and of passwords in URLs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata as metadata
import json
import math
import os
import re
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Literal
from urllib.parse import urlparse

Status = Literal["ok", "warn", "fail"]

# Same default as crossdim.infer.registry: a local sqlite store in the working directory.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PACKAGES = ("timm", "ray", "mlflow", "monai")
SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID",
                   "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "RAY_AUTH_TOKEN")
RAY_PROBE_MARK = "CROSSDIM_RAY_PROBE "


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


# ----------------------------------------------------------------------------- entry points
def run_doctor(ray_address: str | None = None, tracking_uri: str | None = None,
               storage_uri: str | None = None, timeout: float = 5) -> list[Check]:
    """Run every check; `None` arguments fall back to RAY_ADDRESS / MLFLOW_TRACKING_URI."""
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    with probe_environment(timeout):
        checks = [*check_versions(), *check_ray(ray_address, timeout),
                  *check_mlflow(tracking_uri, timeout), *check_s3(storage_uri, timeout)]
    return [redact_check(c) for c in checks]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS; none: local mode)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                        f"else {DEFAULT_TRACKING_URI})")
    parser.add_argument("--storage", help="storage URI to check, e.g. the storage_path you train with "
                        "(s3://bucket/prefix or a local directory)")
    parser.add_argument("--config", "-c", help="a train config: its storage_path and tracking URI are checked")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of --config (repeatable)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per network probe (default 5)")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON instead of a table")


def main(args: argparse.Namespace) -> int:
    storage, tracking = args.storage, args.tracking_uri
    if getattr(args, "config", None):
        from crossdim.config import TrainConfig, load_config

        config = load_config(TrainConfig, args.config, args.overrides)
        storage = storage or config.storage_path
        tracking = tracking or config.tracking.tracking_uri
    checks = run_doctor(args.ray_address, tracking, storage, timeout=args.timeout)
    print(json.dumps([asdict(c) for c in checks], indent=2) if args.json else format_table(checks))
    return 1 if any(c.status == "fail" for c in checks) else 0


# ----------------------------------------------------------------------------- table
def format_table(checks: list[Check], detail_width: int = 64, fix_width: int = 56) -> str:
    """A plain-text table (cells wrapped to the widths) and a one-line summary."""
    header = Check("check", "ok", "detail", "how to fix")
    rows = [_cells(c, detail_width, fix_width) for c in [header, *checks]]
    rows[0][1] = ["status"]
    widths = [max(len(line) for row in rows for line in row[i]) for i in range(4)]
    lines: list[str] = []
    for index, row in enumerate(rows):
        height = max(len(cell) for cell in row)
        for k in range(height):
            parts = [(cell[k] if k < len(cell) else "").ljust(w) for cell, w in zip(row, widths)]
            lines.append("  ".join(parts).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    counts = {s: sum(c.status == s for c in checks) for s in ("ok", "warn", "fail")}
    lines.append(f"\n{counts['ok']} ok, {counts['warn']} warn, {counts['fail']} fail")
    return "\n".join(lines)


def _cells(check: Check, detail_width: int, fix_width: int) -> list[list[str]]:
    return [[check.name], [check.status], textwrap.wrap(check.detail, detail_width) or [""],
            textwrap.wrap(check.fix, fix_width) or [""]]


# ----------------------------------------------------------------------------- redaction
def redact(text: str) -> str:
    """Remove secret env values and URL passwords from a message."""
    for var in SECRET_ENV_VARS:
        value = os.environ.get(var)
        if value and len(value) >= 6:  # shorter values would mangle ordinary words
            text = text.replace(value, "***")
    return re.sub(r"(://[^/\s:@]+):[^@/\s]+@", r"\1:***@", text)


def redact_check(check: Check) -> Check:
    return Check(check.name, check.status, redact(check.detail), redact(check.fix))


def key_hint(key_id: str) -> str:
    """Only the last 4 characters of an access key id."""
    return f"...{key_id[-4:]}" if len(key_id) > 4 else "..."


@contextlib.contextmanager
def probe_environment(timeout: float) -> Iterator[None]:
    """Short timeouts and no retries for MLflow's HTTP client and the AWS metadata lookup."""
    seconds = str(max(1, math.ceil(timeout)))
    settings = {"MLFLOW_HTTP_REQUEST_TIMEOUT": seconds, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                "AWS_METADATA_SERVICE_TIMEOUT": str(max(1, min(2, math.ceil(timeout)))),
                "AWS_METADATA_SERVICE_NUM_ATTEMPTS": "1"}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ----------------------------------------------------------------------------- versions
def check_versions() -> list[Check]:
    return [check_packages(), check_torch()]


def check_packages() -> Check:
    found, missing = [], []
    for name in PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        return Check("packages", "fail", f"not installed: {', '.join(missing)}; found {', '.join(found)}",
                     "pip install -c constraints.txt -e . (or use the crossdim image)")
    return Check("packages", "ok", ", ".join(found))


def check_torch() -> Check:
    try:
        import torch
    except ImportError as exc:
        return Check("torch/CUDA", "fail", f"torch does not import ({exc})",
                     "pip install -c constraints.txt -e .")
    if not torch.cuda.is_available():
        return Check("torch/CUDA", "ok", f"torch {torch.__version__} (CUDA build {torch.version.cuda}); "
                     "no GPU on this machine: it trains on CPU, GPU nodes are checked via Ray")
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    return Check("torch/CUDA", "ok", f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
                 f"{torch.cuda.device_count()} GPU(s): {', '.join(names)}")


# ----------------------------------------------------------------------------- network helpers
def tcp_probe(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection opens within `timeout`, else the reason."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.timeout:
        return f"no answer within {timeout:g}s"
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def http_get(url: str, timeout: float) -> tuple[int | None, str]:
    """(status, reason): status None when no HTTP answer came back."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.reason or ""
    except urllib.error.HTTPError as exc:
        return exc.code, str(exc.reason)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return None, getattr(reason, "strerror", None) or str(reason) or type(exc).__name__


def host_port(url: str, default_port: int) -> tuple[str, int]:
    parsed = urlparse(url if "://" in url else f"tcp://{url}")
    if not parsed.hostname:
        raise ValueError(f"{url!r}: no host in address")
    try:
        port = parsed.port
    except ValueError:
        raise ValueError(f"{url!r}: invalid port") from None
    if port is None:
        port = {"http": 80, "https": 443}.get(parsed.scheme, default_port)
    return parsed.hostname, port


# ----------------------------------------------------------------------------- Ray
RAY_FIX = ("start the cluster or fix RAY_ADDRESS; cluster launcher: `ray dashboard ray_cluster.yaml` "
           "then RAY_ADDRESS=http://127.0.0.1:8265; KubeRay: kubectl port-forward svc/crossdim-head-svc 8265")


def check_ray(address: str | None, timeout: float) -> list[Check]:
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        return [Check("ray", "ok", "local mode: RAY_ADDRESS is not set, each job starts a local Ray "
                      "on this machine", "set RAY_ADDRESS=http://<head>:8265 to submit to a cluster")]
    if address in ("auto", "local"):
        return [_ray_cluster_check(address, timeout)]
    try:
        host, port = host_port(address, 6379)
    except ValueError as exc:
        return [Check("ray", "fail", f"RAY_ADDRESS {exc}", "use http://<head>:8265, <head>:6379 or ray://<head>:10001")]
    reason = tcp_probe(host, port, timeout)
    if reason is not None:
        return [Check("ray", "fail", f"{address}: cannot connect to {host}:{port} ({reason})", RAY_FIX)]
    return [_ray_cluster_check(address, timeout)]


def _ray_cluster_check(address: str, timeout: float) -> Check:
    try:
        info = ray_cluster_info(address, timeout)
    except RuntimeError as exc:
        return Check("ray", "fail", f"{address}: reachable but the cluster did not answer ({exc})",
                     "check the head is healthy (`ray status` on it); with token auth set "
                     "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (`ray get-auth-token` on the head)")
    return summarize_ray(address, info)


def summarize_ray(address: str, info: dict) -> Check:
    """Turn the probe's {version, nodes, resources} into a row (pure)."""
    res = info.get("resources", {})
    gpus, cpus = res.get("GPU", 0), res.get("CPU", 0)
    detail = f"{address}: Ray {info.get('version')}, {info.get('nodes')} node(s), CPU {cpus:g}, GPU {gpus:g}"
    local = _installed_version("ray")
    if info.get("version") and local and info["version"] != local:
        return Check("ray", "warn", f"{detail}; this machine has Ray {local}",
                     f"install ray=={info['version']} here (client and cluster Ray must match)")
    if not gpus:
        return Check("ray", "warn", f"{detail}; no GPUs right now",
                     "GPU workers may still autoscale up on demand; for CPU training set scaling.use_gpu=false")
    return Check("ray", "ok", detail)


RAY_PROBE = """
import json, sys
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_nodes
address, timeout = sys.argv[1], int(sys.argv[2])
client = JobSubmissionClient(address)  # checks the connection and reads the cluster's Ray version
version = getattr(client, "_server_ray_version", None)
nodes = [n for n in list_nodes(address=address, timeout=timeout, raise_on_missing_output=False)
         if n.state == "ALIVE"]
total = {}
for node in nodes:
    for key, value in (node.resources_total or {}).items():
        total[key] = total.get(key, 0) + value
print("%s%s" % (sys.argv[3], json.dumps({"version": version, "nodes": len(nodes), "resources": total})))
"""


def ray_cluster_info(address: str, timeout: float) -> dict:
    """Ray version, alive nodes and total resources, asked in a subprocess killed after a deadline
    (Ray's clients retry for long; nothing of Ray is imported or started in this process)."""
    env = dict(os.environ, RAY_ADDRESS=address, RAY_USAGE_STATS_ENABLED="0")
    deadline = timeout + 20  # + importing Ray in the child
    cmd = [sys.executable, "-c", RAY_PROBE, address, str(max(1, math.ceil(timeout))), RAY_PROBE_MARK]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=deadline, env=env)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"no answer within {deadline:g}s") from None
    for line in done.stdout.splitlines():
        if line.startswith(RAY_PROBE_MARK):
            return json.loads(line[len(RAY_PROBE_MARK):])
    errors = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
    raise RuntimeError(errors[-1][:300] if errors else f"probe exited with code {done.returncode}")


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- MLflow
def check_mlflow(tracking_uri: str | None, timeout: float) -> list[Check]:
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        return [check_mlflow_http(uri, timeout)]
    if scheme == "sqlite":
        return [check_mlflow_sqlite(uri)]
    if scheme in ("", "file"):
        return [check_local_dir("mlflow", uri[len("file://"):] if scheme == "file" else uri)]
    return [Check("mlflow", "warn", f"{uri}: '{scheme}' tracking URIs are not checked by doctor",
                  "use an http(s):// tracking server or sqlite:///path")]


def check_mlflow_http(uri: str, timeout: float) -> Check:
    status, reason = http_get(uri.rstrip("/") + "/health", timeout)
    if status is None:
        return Check("mlflow", "fail", f"{uri}: not reachable ({reason})",
                     "start the tracking server (infra/local-stack: docker compose up -d) "
                     "or fix MLFLOW_TRACKING_URI")
    if status != 200:
        return Check("mlflow", "fail", f"{uri}/health answered HTTP {status} {reason}",
                     "is MLFLOW_TRACKING_URI the MLflow server itself (not a proxy path)?")
    return _list_experiments("mlflow", uri, f"{uri}: healthy")


def check_mlflow_sqlite(uri: str) -> Check:
    path = Path(uri[len("sqlite:///"):]).expanduser()
    if not path.exists():
        dir_check = check_local_dir("mlflow", str(path.parent))
        if dir_check.status != "ok":
            return dir_check
        return Check("mlflow", "ok", f"{uri}: local store, created on first run in {path.parent.resolve()}",
                     "set MLFLOW_TRACKING_URI to share runs through a tracking server")
    if not os.access(path, os.W_OK):
        return Check("mlflow", "fail", f"{uri}: {path} is not writable", f"fix the permissions of {path}")
    return _list_experiments("mlflow", uri, f"{uri}: local store")


def _list_experiments(name: str, uri: str, prefix: str) -> Check:
    from mlflow.tracking import MlflowClient

    try:
        found = MlflowClient(tracking_uri=uri).search_experiments(max_results=100)
    except Exception as exc:  # noqa: BLE001 - any client failure becomes a row
        return Check(name, "fail", f"{prefix}, but listing experiments failed: {_first_line(exc)}",
                     _mlflow_fix(str(exc)))
    more = "+" if len(found) == 100 else ""
    return Check(name, "ok", f"{prefix}; {len(found)}{more} experiment(s) listed")


def _mlflow_fix(message: str) -> str:
    if "timed out" in message.lower() or "timeout" in message.lower():
        return ("the server is up but its API answered too slowly: retry with a larger --timeout, "
                "then check the server's backend store (database) and load")
    if "403" in message:
        return ("the server refused this client: for a remote server start it with --allowed-hosts "
                "<its host name>; with auth, check MLFLOW_TRACKING_USERNAME/PASSWORD")
    if "401" in message:
        return "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
    if "schema" in message.lower() or "upgrade" in message.lower():
        return "upgrade the store: mlflow db upgrade <tracking uri>"
    return "check the server logs; MLflow client and server versions should match"


def check_local_dir(name: str, path: str) -> Check:
    """A local directory is usable when it, or its nearest existing parent, is writable."""
    target = Path(path).expanduser().absolute()
    existing = next((p for p in [target, *target.parents] if p.exists()), None)
    if existing is None or not existing.is_dir():
        return Check(name, "fail", f"{target}: {existing} is not a directory", "fix the path")
    if not os.access(existing, os.W_OK | os.X_OK):
        return Check(name, "fail", f"{target}: {existing} is not writable", f"fix the permissions of {existing}")
    state = "exists" if existing == target else f"will be created under {existing}"
    return Check(name, "ok", f"{target}: {state}, writable")


# ----------------------------------------------------------------------------- S3
S3_CREDENTIALS_FIX = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (MinIO: its access/secret key), "
                      "or run on a node with an IAM instance profile / IRSA role")


def check_s3(storage_uri: str | None, timeout: float) -> list[Check]:
    from crossdim import storage

    uses_s3 = bool(storage_uri and storage.is_s3(storage_uri))
    endpoint = storage.s3_endpoint()
    if not uses_s3 and not endpoint and not os.environ.get("AWS_ACCESS_KEY_ID"):
        rows = [Check("s3", "ok", "not used: no s3:// storage URI and no AWS_ENDPOINT_URL")]
    else:
        rows = [check_s3_credentials(required=uses_s3), check_s3_endpoint(endpoint, timeout)]
    if storage_uri is None:
        rows.append(Check("storage", "ok", "no storage URI given: not checked",
                          "pass --storage <the storage_path you train with> or --config"))
    elif not uses_s3:
        rows.append(check_local_dir("storage", storage_uri[len("file://"):] if storage_uri.startswith("file://")
                                    else storage_uri))
    elif all(r.status != "fail" for r in rows):
        rows.append(check_s3_storage(storage_uri, endpoint, timeout))
    return rows


def check_s3_credentials(required: bool) -> Check:
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if bool(key) != bool(secret):
        missing = "AWS_SECRET_ACCESS_KEY" if key else "AWS_ACCESS_KEY_ID"
        return Check("s3 credentials", "fail", f"{missing} is not set but its pair is", S3_CREDENTIALS_FIX)
    if key:
        return Check("s3 credentials", "ok", f"access key {key_hint(key)} from the environment")
    found = _credential_chain()
    if found is not None:
        return Check("s3 credentials", "ok", f"access key {key_hint(found[0])} from {found[1]}")
    return Check("s3 credentials", "fail" if required else "warn",
                 "no S3 credentials found (environment, AWS profile, instance profile)", S3_CREDENTIALS_FIX)


def _credential_chain() -> tuple[str, str] | None:
    """(access key id, source) from boto3's chain (profile, container/instance role), or None."""
    import boto3

    try:
        creds = boto3.Session().get_credentials()
    except Exception:  # noqa: BLE001 - a broken profile reads as "no credentials"
        return None
    if creds is None or not creds.access_key:
        return None
    return creds.access_key, creds.method


def check_s3_endpoint(endpoint: str | None, timeout: float) -> Check:
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "not set"
    mlflow_s3 = os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    extra = f"; MLFLOW_S3_ENDPOINT_URL {mlflow_s3}" if mlflow_s3 else ""
    if not endpoint and region == "not set":
        return Check("s3 endpoint", "warn", f"AWS S3, region not set{extra}", "set AWS_DEFAULT_REGION")
    if not endpoint:
        return Check("s3 endpoint", "ok", f"AWS S3, region {region}{extra}")
    try:
        host, port = host_port(endpoint, 443)
    except ValueError as exc:
        return Check("s3 endpoint", "fail", f"AWS_ENDPOINT_URL {exc}", "use http(s)://host:port")
    reason = tcp_probe(host, port, timeout)
    if reason is not None:
        return Check("s3 endpoint", "fail", f"{endpoint}: cannot connect ({reason})",
                     "start the S3 store (infra/local-stack: docker compose up -d) or fix AWS_ENDPOINT_URL")
    return Check("s3 endpoint", "ok", f"{endpoint} reachable, region {region}{extra}")


def check_s3_storage(uri: str, endpoint: str | None, timeout: float) -> Check:
    bucket = urlparse(uri).netloc
    if not bucket:
        return Check("storage", "fail", f"{uri}: no bucket in the URI", "use s3://bucket/prefix")
    problem = _head_bucket(bucket, endpoint, timeout)
    if problem is not None:
        return Check("storage", "fail", f"{uri}: {problem[0]}", problem[1])
    from crossdim import storage

    try:
        storage.check_writable(uri)
    except OSError as exc:
        return Check("storage", "fail", f"{uri}: bucket exists but is not writable ({_first_line(exc)})",
                     f"grant s3:PutObject and s3:DeleteObject on arn:aws:s3:::{bucket}/*")
    return Check("storage", "ok", f"{uri}: bucket exists, a probe object was written and deleted")


def _head_bucket(bucket: str, endpoint: str | None, timeout: float) -> tuple[str, str] | None:
    """None when the bucket answers HEAD, else (problem, fix)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    config = Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1, "mode": "standard"})
    client = boto3.client("s3", endpoint_url=endpoint or None, config=config)
    try:
        client.head_bucket(Bucket=bucket)
        return None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        return _bucket_problem(bucket, code, endpoint)
    except BotoCoreError as exc:
        return f"cannot reach S3 ({_first_line(exc)})", "check AWS_ENDPOINT_URL and the network"


def _bucket_problem(bucket: str, code: str, endpoint: str | None) -> tuple[str, str]:
    where = f" --endpoint-url {endpoint}" if endpoint else ""
    if code in ("404", "NoSuchBucket", "NotFound"):
        return f"bucket '{bucket}' does not exist", f"create it (aws s3 mb s3://{bucket}{where}) or fix the storage URI"
    if code in ("403", "AccessDenied", "Forbidden"):
        return (f"access to bucket '{bucket}' denied for these credentials",
                f"grant s3:ListBucket on arn:aws:s3:::{bucket} (and Get/Put/DeleteObject on its objects)")
    return f"HEAD bucket '{bucket}' failed ({code or 'unknown error'})", "check the credentials and the endpoint"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="crossdim doctor")
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
