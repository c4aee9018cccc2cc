"""Shared test setup: quiet, local-only environment; servers are started by fixtures in tests/servers.py."""

from __future__ import annotations

import os
import tempfile

# Set before anything imports mlflow/monai/ray.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(tempfile.gettempdir(), "crossdim-mpl"))
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: the suite runs Ray workers beside the test process on 2 cores, and
# oversubscribed BLAS threads were measured 5x slower on the DS-Net forward+backward.
torch.set_num_threads(1)

pytest_plugins = ["tests.servers"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
