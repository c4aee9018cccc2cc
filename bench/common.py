"""What every benchmark shares: figures and goals, options, timing, child processes with
process-tree memory sampling, a moto S3 endpoint, a Ray session, machine/version facts.

A benchmark module exposes `run(opts: BenchOptions) -> list[Figure]`; `emit` prints each figure
as one line `name: value (goal ...)`, with `MISSED` appended when its goal is missed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RESULT_MARKER = "BENCH_RESULT "
REPO_ROOT = Path(__file__).resolve().parent.parent
QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TQDM_DISABLE": "1",
    "MPLBACKEND": "Agg",
    "MPLCONFIGDIR": os.path.join(tempfile.gettempdir(), "crossdim-mpl"),
    "PYTHONWARNINGS": "ignore",
}


class BenchError(RuntimeError):
    """A benchmark that could not produce its figures; the message is one line."""


class BenchOptions(BaseModel):
    """Options shared by every benchmark (from `python -m bench.run_all` arguments)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    quick: bool = False  # tiny sizes: a smoke run, the figures mean little
    workdir: str = Field(default_factory=lambda: os.path.join(tempfile.gettempdir(), "crossdim-bench"))
    threads: int = Field(1, ge=1)  # torch intra-op threads, the same on both sides of every figure
    patch96: bool = False  # model cost at 96^3 (the GPU patch) instead of 64^3 on CPU


# ----------------------------------------------------------------------------- figures
@dataclass(frozen=True)
class Goal:
    op: Literal[">=", "<="]
    target: float

    def met(self, value: float) -> bool:
        return value >= self.target if self.op == ">=" else value <= self.target


@dataclass(frozen=True)
class Figure:
    """One reported number; `goal` None means information only."""

    name: str
    value: float | None
    unit: str = ""
    goal: Goal | None = None
    note: str = ""  # shown after the value, e.g. "not reached within 300 steps"

    @property
    def missed(self) -> bool:
        return self.goal is not None and (self.value is None or not self.goal.met(self.value))

    def to_dict(self) -> dict[str, Any]:
        goal = None if self.goal is None else {"op": self.goal.op, "target": self.goal.target}
        return {"name": self.name, "value": self.value, "unit": self.unit, "goal": goal, "note": self.note}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Figure":
        goal = data.get("goal")
        return cls(data["name"], data["value"], data.get("unit", ""), Goal(**goal) if goal else None,
                   data.get("note", ""))

    def line(self) -> str:
        value = "n/a" if self.value is None else f"{fmt(self.value)}{self.unit}"
        if self.note:
            value = f"{value} [{self.note}]"
        goal = "info" if self.goal is None else f"goal {self.goal.op} {fmt(self.goal.target)}{self.unit}"
        return f"{self.name}: {value} ({goal}){' MISSED' if self.missed else ''}"


def fmt(value: float) -> str:
    """Three significant figures, no exponent for the magnitudes seen here (pure)."""
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def ratio(numerator: float, denominator: float, what: str) -> float:
    if denominator <= 0:
        raise BenchError(f"{what}: denominator is {denominator}, cannot form a ratio")
    return numerator / denominator


def emit(figures: Sequence[Figure]) -> list[Figure]:
    for figure in figures:
        print(figure.line(), flush=True)
    return list(figures)


def say(text: str) -> None:
    """Progress text (not a figure), to stderr so stdout holds only figures."""
    print(f"  [bench] {text}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- environment
def quiet_environment() -> None:
    """Telemetry off, caches in /tmp, no progress bars; call before importing mlflow/monai/ray."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def median(values: Sequence[float]) -> float:
    if not values:
        raise BenchError("no timings were collected")
    return float(statistics.median(values))


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- process-tree memory
def _parent_of(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2 :].split()[1])


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (scans /proc; this kernel has no task/*/children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = _parent_of(entry)
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


@dataclass(frozen=True)
class Memory:
    """Memory of one process (or a sum over processes) in KiB, from /proc/<pid>/smaps_rollup.

    `private` = Pss_Anon + Pss_Shmem: heap, arrays, tensors and shared-memory segments, split
    between the forked processes that share them (DataLoader workers, copy-on-write caches), never
    with unrelated processes. Library pages (Pss_File) are left out of it: their PSS depends on how
    many other processes on the machine map the same files. `pss` and `rss` include everything.
    """

    private: int = 0
    pss: int = 0
    rss: int = 0

    def __add__(self, other: "Memory") -> "Memory":
        return Memory(self.private + other.private, self.pss + other.pss, self.rss + other.rss)

    def peak(self, other: "Memory") -> "Memory":
        return Memory(max(self.private, other.private), max(self.pss, other.pss), max(self.rss, other.rss))


ROLLUP_FIELDS = ("Pss_Anon:", "Pss_Shmem:", "Pss:", "Rss:")


def process_memory(pid: int) -> Memory:
    """Memory of one process; all zero once it is gone."""
    values = dict.fromkeys(ROLLUP_FIELDS, 0)
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in values:
                    values[parts[0]] = int(parts[1])
    except OSError:
        pass
    return Memory(values["Pss_Anon:"] + values["Pss_Shmem:"], values["Pss:"], values["Rss:"])


def own_private_mib() -> float:
    """This process's private memory now (a side's baseline after its imports)."""
    return process_memory(os.getpid()).private / 1024


class TreeMemorySampler:
    """Samples the memory of a process tree (summed) every `interval` s; keeps the peaks."""

    def __init__(self, root: int, interval: float = 0.1) -> None:
        self.root, self.interval = root, interval
        self.peak_kib = Memory()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "TreeMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        total = Memory()
        for pid in process_tree(self.root):
            total = total + process_memory(pid)
        self.peak_kib = self.peak_kib.peak(total)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


@dataclass(frozen=True)
class ChildResult:
    result: Any
    peak_private_mib: float  # peaks summed over the child's process tree, see Memory
    peak_pss_mib: float
    wall_s: float


def child_env(threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(QUIET_ENV)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)  # torch's intra-op default
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    env.update(extra or {})
    return env


def run_child(target: str, kwargs: dict[str, Any], threads: int, timeout: float = 900,
              env: dict[str, str] | None = None) -> ChildResult:
    """Run `bench.child` on `target` ("module.function") in a fresh process; sample its memory.

    The function's JSON-able return value comes back in `result`.
    """
    cmd = [sys.executable, "-m", "bench.child", target, json.dumps(kwargs)]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO_ROOT,
                                env=child_env(threads, env))
        with TreeMemorySampler(proc.pid) as sampler:
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop_process(proc)
                raise BenchError(f"{target}: no result within {timeout:.0f} s") from None
        wall = time.perf_counter() - start
        err.seek(0)
        stderr = err.read()
    if proc.returncode != 0:
        raise BenchError(f"{target}: child exited with {proc.returncode}: {last_line(stderr)}")
    lines = [line for line in out.splitlines() if line.startswith(RESULT_MARKER)]
    if not lines:
        raise BenchError(f"{target}: child printed no result: {last_line(stderr)}")
    peak = sampler.peak_kib
    return ChildResult(json.loads(lines[-1][len(RESULT_MARKER) :]), peak.private / 1024, peak.pss / 1024, wall)


def stream_child(target: str, kwargs: dict[str, Any], threads: int, timeout: float, grace: float = 60) -> Any:
    """Run `target` like `run_child`, but pass its stdout through as it comes (stderr is inherited).

    The child gets its own session; after `timeout` seconds without a result its process group is
    terminated (Ray's daemons of a hung benchmark go with it) and BenchError is raised. Once the
    result is in, the child has `grace` seconds to exit (e.g. shut Ray down) before it is stopped.
    """
    cmd = [sys.executable, "-m", "bench.child", target, json.dumps(kwargs)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=child_env(threads),
                            start_new_session=True)
    expired = threading.Event()
    timers = [threading.Timer(timeout, lambda: (expired.set(), stop_group(proc)))]
    timers[0].start()
    result: Any = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(RESULT_MARKER) and result is None:
                result = json.loads(line[len(RESULT_MARKER) :])
                timers[0].cancel()
                timers.append(threading.Timer(grace, stop_group, args=(proc,)))
                timers[-1].start()
            elif not line.startswith(RESULT_MARKER):
                print(line, end="", flush=True)
        proc.wait()
    finally:
        for timer in timers:
            timer.cancel()
    if result is not None:
        return result
    if expired.is_set():
        raise BenchError(f"{target}: stopped after {timeout:.0f} s (timeout)")
    raise BenchError(f"{target}: exited with {proc.returncode} without a result (see its stderr above)")


def stop_group(proc: subprocess.Popen) -> None:
    """Terminate the process group led by `proc` (started with start_new_session), then kill it."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def run_benchmark(module: str, opts: dict[str, Any]) -> list[dict[str, Any]]:
    """Child side of run_all: one benchmark module's `run` (bench.child shuts Ray down after it)."""
    return [figure.to_dict() for figure in importlib.import_module(module).run(BenchOptions(**opts))]


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


# ----------------------------------------------------------------------------- S3 endpoint (moto)
@dataclass(frozen=True)
class S3Endpoint:
    endpoint: str
    bucket: str
    env: dict[str, str]

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix.strip('/')}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"server for {url} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise BenchError(f"{url} not up after {timeout:.0f} s")


@contextlib.contextmanager
def patched_environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def moto_s3(workdir: str) -> Iterator[S3Endpoint]:
    """A moto S3 server on 127.0.0.1 (as tests/servers.py starts it), AWS_* set while it runs."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        raise BenchError("moto_server not found: install the dev extras (pip install -e '.[dev]')")
    os.makedirs(workdir, exist_ok=True)
    endpoint = f"http://127.0.0.1:{free_port()}"
    with open(os.path.join(workdir, "moto.log"), "wb") as log:
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", endpoint.rsplit(":", 1)[1]],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(endpoint + "/moto-api/", 30, proc)
            env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
            bucket = f"crossdim-bench-{uuid.uuid4().hex[:8]}"
            with patched_environ(env):
                _create_bucket(endpoint, bucket, env)
                yield S3Endpoint(endpoint, bucket, env)
        finally:
            stop_process(proc)


def _create_bucket(endpoint: str, bucket: str, env: dict[str, str]) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                 region_name=env["AWS_DEFAULT_REGION"]).create_bucket(Bucket=bucket)


# ----------------------------------------------------------------------------- Ray
def ensure_ray() -> None:
    """A local Ray with this machine's CPUs (kept for the rest of the run; run_all shuts it down)."""
    quiet_environment()
    import ray

    if not ray.is_initialized():
        _init_ray(ray)
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        for name in ("ray", "ray.data", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _init_ray(ray: Any, attempts: int = 3) -> None:
    """ray.init, retried: on a saturated machine the node can time out while starting (Ray waits 30 s)."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception on a start-up timeout
            ray.shutdown()
            if attempt == attempts:
                raise BenchError(f"ray.init failed {attempts} times: {last_line(str(exc))}") from None
            say(f"ray.init failed ({last_line(str(exc))}); retrying")


def shutdown_ray() -> None:
    if "ray" not in sys.modules:
        return
    import ray

    if ray.is_initialized():
        ray.shutdown()


# ----------------------------------------------------------------------------- machine facts
VERSIONED = ("torch", "timm", "monai", "ray", "mlflow", "pyarrow", "numpy", "moto")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def git_revision() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine_header(opts: BenchOptions, command: str) -> list[str]:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return [
        f"command: {command}",
        f"date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
        f"machine: nproc {os.cpu_count()}, load average (1/5/15 min) {load}, {platform.machine()}, "
        f"torch threads per process {opts.threads}",
        f"code: git {git_revision()}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
    ]
