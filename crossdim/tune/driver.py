"""The sweep driver: checks, one Tuner (new or restored), MLflow parent run, summary, registration.

`run(config)`:
1. checks before any work (one line each): the search space (`space.check_search_space`), the
   scheduler against the epochs, the metric; then the base training config's own pre-flight
   (manifest readable, tracking reachable, storage writable) and, once Ray is up, the per-trial
   resources against every node (`check_resources`);
2. the MLflow parent run (found again by the sweep's key when resumed);
3. a Tuner over `trial.run_trial` (`tune.with_resources(..., {"CPU": 0.01})`: the trial's Ray Train
   workers ask for their own resources, `scaling.*` of the trial's config) - or, when
   `<storage_path>/<name>` holds a Tune experiment, `Tuner.restore` of it: finished trials are
   kept, unfinished ones resumed (their Train runs continue from their checkpoints), errored ones
   stay errored;
4. the summary (CSV, markdown, PNG) on the parent run; the best finished trial's model registered
   under `registered_model_name`, the alias moved per `promote.decide_alias`.

An interrupted sweep (Ctrl+C / SIGINT to the driver: Tune saves its state) returns status
"interrupted" without registering; re-running the same config and name continues it. A sweep
name must be reused only for the same sweep: a changed configuration is refused.

ASHA: `time_attr="training_iteration"` (one Tune result per epoch), `max_t` = the smallest
`epochs` - 1 with `stop_last_trials=False`, so rungs fall before a trial's last epoch and no trial
is stopped while it logs its final model. Results without the metric (validation skipped that
epoch, a NaN stop) are allowed (Tune's strict metric check is off during `fit`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Any, Iterator, Sequence

from crossdim import storage
from crossdim.config import ConfigError, TrainConfig, TuneConfig
from crossdim.tune.conclude import conclude
from crossdim.tune.results import CONFIG_SHA_TAG, SweepPlan, SweepResult
from crossdim.tune.space import SearchSpaceError, candidate_configs, check_search_space, expected_trials, key_fields

TRIAL_CPU = 0.01  # the trial function itself (Ray rejects 0)
RAY_DATA_SPARE_CPUS = 1.0  # as crossdim.train: Ray Data's read tasks need a CPU beside the workers
KNOWN_METRICS = ("loss", "best_val_dice")


class SweepResourceError(ConfigError):
    """Per-trial resources that no node (or the whole cluster) can provide."""


# ----------------------------------------------------------------------------- checks
def check_sweep(config: TuneConfig) -> None:
    """Pure checks of the sweep settings (SearchSpaceError / ConfigError, one line)."""
    check_search_space(config)
    if not (config.metric in KNOWN_METRICS or config.metric.startswith("val_")):
        raise ConfigError(f"metric '{config.metric}' is not reported by training (use val_dice, val_dice_<class>, "
                          f"val_hd95_<class>, best_val_dice or loss)")
    if config.scheduler == "asha" and config.grace_period >= min_epochs(config):
        raise ConfigError(f"grace_period={config.grace_period} must be below train.epochs={min_epochs(config)}: "
                          "ASHA stops trials only before their last epoch (or set scheduler: none)")


def min_epochs(config: TuneConfig) -> int:
    """The fewest epochs any trial trains: `epochs` searched alone or in a joint dimension (pure)."""
    for key, dim in config.search_space.items():
        fields = key_fields(key)
        if "epochs" not in fields:
            continue
        if dim.values is None:
            return int(dim.low)  # type: ignore[arg-type]
        at = fields.index("epochs")
        return int(min(v[at] if len(fields) > 1 else v for v in dim.values))
    return config.train.epochs


def preflight(config: TuneConfig) -> SweepPlan:
    """The base training config's pre-flight (TrainConfigError naming the field)."""
    from crossdim.train.driver import check_amp, check_storage, check_tracking, local_or_uri, read_data

    check_amp(config.train)
    manifest, _, _ = read_data(config.train)
    uri = check_tracking(config.train)
    check_storage(config.train)
    path = local_or_uri(config.train.storage_path)
    return SweepPlan(tracking_uri=uri, storage_path=path, experiment_path=storage.join(path, config.name),
                     fingerprint=str(manifest.get("fingerprint", "")), manifest=config.train.data.manifest)


def worker_bundle(config: TrainConfig) -> dict[str, float]:
    sc = config.scaling
    return {"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if sc.use_gpu else {})}


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items())) or "nothing"


def check_resources(configs: Sequence[TrainConfig], nodes: Sequence[dict[str, float]]) -> None:
    """Each trial's workers fit on the cluster's nodes (SweepResourceError, one line) (pure)."""
    for config in configs:
        bundle, workers = worker_bundle(config), config.scaling.num_workers
        per_node = [min((int(node.get(k, 0.0) / v + 1e-9) if v > 0 else workers) for k, v in bundle.items())
                    for node in nodes]
        largest = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)), default={})
        if not any(per_node):
            raise SweepResourceError(f"scaling: one Ray Train worker needs {_fmt(bundle)} but no Ray node has that much "
                                     f"(largest node: {_fmt({k: largest.get(k, 0.0) for k in ('CPU', 'GPU')})})")
        if sum(per_node) < workers:
            raise SweepResourceError(f"scaling: {workers} workers x ({_fmt(bundle)}) do not fit on the cluster's nodes "
                                     f"(room for {sum(per_node)}); lower scaling.num_workers or per-worker resources")
        need_cpu = workers * bundle["CPU"] + RAY_DATA_SPARE_CPUS + TRIAL_CPU
        have_cpu = sum(node.get("CPU", 0.0) for node in nodes)
        if need_cpu > have_cpu + 1e-9:
            raise SweepResourceError(f"scaling: a trial needs CPU {need_cpu:g} ({workers} workers, 1 for Ray Data, "
                                     f"{TRIAL_CPU:g} for the trial) but the cluster has CPU {have_cpu:g}")


def node_resources() -> list[dict[str, float]]:
    import ray

    return [dict(node.get("Resources", {})) for node in ray.nodes() if node.get("Alive")]


def config_sha(config: TuneConfig) -> str:
    """Hash of what defines the trials (resuming under a changed configuration is refused) (pure)."""
    keys = ("train", "search_space", "search_alg", "num_samples", "metric", "mode", "scheduler", "grace_period",
            "reduction_factor")
    return hashlib.sha256(json.dumps(config.model_dump(mode="json", include=set(keys)), sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- MLflow parent run
def open_parent(config: TuneConfig, plan: SweepPlan) -> tuple[str, dict[str, str]]:
    from crossdim.tune.runs import client, start_or_resume_parent

    sha = config_sha(config)
    tags = {CONFIG_SHA_TAG: sha, "crossdim.fingerprint": plan.fingerprint, "crossdim.metric": config.metric,
            "crossdim.mode": config.mode, "crossdim.search_alg": config.search_alg}
    parent_id, prior = start_or_resume_parent(plan.tracking_uri, config.train.tracking.experiment, plan.storage_path,
                                              config.name, tags)
    if prior and prior.get(CONFIG_SHA_TAG) not in (None, sha):
        client(plan.tracking_uri).set_terminated(parent_id, status="FAILED")
        raise ConfigError(f"sweep '{config.name}' exists ({plan.experiment_path}) with another configuration; "
                          "give a changed sweep a new name")
    log_parent_setup(plan.tracking_uri, parent_id, config)
    return parent_id, prior


def log_parent_setup(uri: str, run_id: str, config: TuneConfig) -> None:
    """The sweep's settings as params (those not logged yet: a resumed sweep adds none) + config/tune.json."""
    from mlflow.entities import Param

    from crossdim.tracking import redact_tree
    from crossdim.tune.runs import client

    params = {"search_alg": config.search_alg, "num_samples": config.num_samples, "metric": config.metric,
              "mode": config.mode, "scheduler": config.scheduler, "grace_period": config.grace_period,
              "reduction_factor": config.reduction_factor, "max_concurrent_trials": config.max_concurrent_trials,
              "expected_trials": expected_trials(config)}
    params.update({"search." + k.replace(",", "/"): json.dumps(v.model_dump(exclude_defaults=True))
                   for k, v in config.search_space.items()})
    mlflow = client(uri)
    logged = mlflow.get_run(run_id).data.params
    items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in logged]
    if items:
        mlflow.log_batch(run_id, params=items)
    mlflow.log_dict(run_id, redact_tree(config.model_dump(mode="json")), "config/tune.json")


# ----------------------------------------------------------------------------- Tune
def tune_config(config: TuneConfig) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    scheduler = None
    if config.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=min_epochs(config) - 1,
                                  grace_period=config.grace_period, reduction_factor=config.reduction_factor,
                                  stop_last_trials=False)
    limit = config.max_concurrent_trials
    if config.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg: Any = OptunaSearch(seed=config.train.seed)
    else:  # Tune ignores max_concurrent_trials for a given BasicVariantGenerator: it takes the limit itself
        search_alg, limit = BasicVariantGenerator(random_state=config.train.seed, max_concurrent=limit or 0), None
    return tune.TuneConfig(metric=config.metric, mode=config.mode, search_alg=search_alg, scheduler=scheduler,
                           num_samples=config.num_samples, max_concurrent_trials=limit, reuse_actors=False)


def storage_args(path: str) -> tuple[str, Any]:
    """(path, filesystem) for Tune: S3 through an explicit filesystem and a scheme-less path."""
    if not storage.is_s3(path):
        return path, None
    fs, inner = storage.filesystem(path)
    return inner, fs


def trainable(config: TuneConfig, plan: SweepPlan, parent_id: str) -> Any:
    from ray import tune

    from crossdim.tune.trial import TrialContext, run_trial

    context = TrialContext(sweep=config, parent_run_id=parent_id, tracking_uri=plan.tracking_uri,
                           storage_path=plan.storage_path)
    return tune.with_resources(tune.with_parameters(run_trial, context=context), {"CPU": TRIAL_CPU})


def build_tuner(config: TuneConfig, plan: SweepPlan, parent_id: str, callbacks: Sequence[Any]) -> Any:
    """A new Tuner, or the restored one when the experiment directory holds this sweep."""
    from ray import tune

    from crossdim.tune.outcomes import TrialOutcomes
    from crossdim.tune.space import param_space

    fn = trainable(config, plan, parent_id)
    exp_path, fs = storage_args(plan.experiment_path)
    if tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        return tune.Tuner.restore(exp_path, trainable=fn, resume_unfinished=True, storage_filesystem=fs)
    path, fs = storage_args(plan.storage_path)
    outcomes = TrialOutcomes(plan.tracking_uri, config.train.tracking.experiment, plan.storage_path, parent_id,
                             config.name)
    run_config = tune.RunConfig(name=config.name, storage_path=path, storage_filesystem=fs,
                                callbacks=[outcomes, *callbacks], failure_config=tune.FailureConfig(max_failures=0),
                                verbose=1)
    return tune.Tuner(fn, param_space=param_space(config), tune_config=tune_config(config), run_config=run_config)


@contextlib.contextmanager
def lenient_metrics() -> Iterator[None]:
    """Let results lack the metric during `fit` (see the module docstring)."""
    key = "TUNE_DISABLE_STRICT_METRIC_CHECKING"
    saved = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


# ----------------------------------------------------------------------------- run
def run(config: TuneConfig, callbacks: Sequence[Any] = ()) -> SweepResult:
    """Run (or resume) the sweep `config.name`; see the module docstring.

    `callbacks`: extra Tune callbacks of a new sweep (a resumed sweep keeps those it started with)."""
    from crossdim.train.driver import check_shared_storage, ensure_ray
    from crossdim.tune.runs import client

    check_sweep(config)
    plan = preflight(config)
    ensure_ray()
    nodes = node_resources()
    check_shared_storage(config.train, len(nodes), plan.tracking_uri)
    check_resources(candidate_configs(config), nodes)
    parent_id, prior = open_parent(config, plan)
    try:
        with lenient_metrics():
            build_tuner(config, plan, parent_id, callbacks).fit()
    except Exception:
        client(plan.tracking_uri).set_terminated(parent_id, status="FAILED")
        raise
    return conclude(config, plan, parent_id, prior)


__all__ = ["SearchSpaceError", "SweepPlan", "SweepResourceError", "SweepResult", "check_resources", "check_sweep", "run"]
