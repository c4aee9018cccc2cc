"""Distributed training on Ray Train, tracked in MLflow.

    from crossdim.train import run
    result = run(load_config(TrainConfig, "configs/demo.yaml"))

`run` checks everything first (TrainConfigError, one line), builds one TorchTrainer, trains,
logs the final model; `train_loop_per_worker` is the worker function (reused by Tune through
`prepare` + `build_trainer`). Importing this package starts nothing.
"""

from crossdim.train.errors import NonFiniteLossError, TrainConfigError

__all__ = [
    "NonFiniteLossError",
    "TrainConfigError",
    "TrainResult",
    "build_trainer",
    "finish",
    "prepare",
    "run",
    "start_tracking",
    "train_loop_per_worker",
]


def __getattr__(name: str):  # lazy: keep `import crossdim.train` light
    if name in ("TrainResult", "build_trainer", "prepare", "run", "start_tracking", "finish"):
        from crossdim.train import driver

        return getattr(driver, name)
    if name == "train_loop_per_worker":
        from crossdim.train.loop import train_loop_per_worker

        return train_loop_per_worker
    raise AttributeError(name)
