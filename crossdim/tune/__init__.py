"""Hyper-parameter sweeps on Ray Tune, tracked in MLflow, the best model registered under an alias.

    from crossdim.tune import run
    result = run(load_config(TuneConfig, "configs/sweep_demo.yaml"))

Each trial runs the training job of `crossdim train` (`crossdim.tune.trial`); the sweep driver
(`crossdim.tune.driver`) checks, runs or resumes the Tuner, summarises and registers. Importing
this package starts nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from crossdim.config import TuneConfig
    from crossdim.tune.results import SweepResult

__all__ = ["SweepResult", "TrialSummary", "run"]


def run(config: "TuneConfig", callbacks: Sequence[Any] = ()) -> "SweepResult":
    """Run (or resume, same `config.name`) the sweep; see crossdim.tune.driver."""
    from crossdim.tune.driver import run as run_sweep

    return run_sweep(config, callbacks)


def __getattr__(name: str) -> Any:  # lazy: keep `import crossdim.tune` light
    if name == "SweepResult":
        from crossdim.tune.results import SweepResult

        return SweepResult
    if name == "TrialSummary":
        from crossdim.tune.summary import TrialSummary

        return TrialSummary
    raise AttributeError(name)
