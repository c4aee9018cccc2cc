"""Sweeps end to end on a local Ray cluster: Tune + Ray Train trials, MLflow parent/child runs, registry.

Tiny blob volumes (32^3, 4 cases, shards written directly), tiny timm encoders, 1 Ray Train worker
at 0.5 CPU per trial; the main sweep runs 1 trial at a time (see `main_sweep`), the worse one 2.
The tests share one Ray cluster and one MLflow store and run in order: bad input -> the 4-trial
sweep (interrupted, then resumed) -> a worse sweep.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from ray import tune

from crossdim.config import ConfigError, TuneConfig
from crossdim.data.shards import CaseArrays, case_record, encode_case, make_splits, shard_name, write_manifest, write_shard

MODEL_NAME = "tune-test-model"
JOINT = "model.arch,data.patch_size"
EPOCHS = 4


# ----------------------------------------------------------------------------- data and cluster
def blob_case(index: int, size: int = 32, seed: int = 0) -> CaseArrays:
    """A bright ball (label 1) in noise: learnable in a few steps."""
    rng = np.random.default_rng([seed, index])
    grid = np.indices((size,) * 3).astype(np.float32)
    centre, radius = rng.uniform(size * 0.35, size * 0.65, 3), rng.uniform(size * 0.18, size * 0.28)
    label = (((grid - centre[:, None, None, None]) ** 2).sum(0) < radius**2).astype(np.uint8)
    image = (2.0 * label + rng.normal(0.0, 0.6, label.shape)).astype(np.float32)[None]
    return CaseArrays(id=f"case_{index:03d}", image=image, label=label, spacing=(1.0, 1.0, 1.0), affine=np.eye(4))


def write_blobs(out: str, cases: int = 4) -> dict:
    rows = [encode_case(blob_case(i), "float32") for i in range(cases)]
    entry = write_shard(out, shard_name(0), rows)
    manifest = {
        "format_version": 1, "fingerprint": entry["sha256"], "cases": [case_record(r, entry["file"]) for r in rows],
        "quarantined": [], "splits": make_splits([r["id"] for r in rows], 2, 0), "shards": [entry], "preprocess": {},
        "dataset": {"format": "msd", "name": "Blobs", "modality": "MR", "channel_names": ["MR"],
                    "channel_modalities": ["MR"], "labels": {"0": "background", "1": "blob"}, "regions": {},
                    "spatial_dims": 3, "label_convention": ""},
    }
    write_manifest(out, manifest)
    return manifest


@dataclass
class Env:
    root: Path
    data: str
    fingerprint: str
    tracking_uri: str


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("tune")
    manifest = write_blobs(str(root / "data"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("RAY_ADDRESS", raising=False)
        # Ray Data (2.60) starts 32 FooterReader actors (32 processes) per Parquet read by default;
        # with one shard file per split, one is enough (inherited by the workers ray.init starts).
        mp.setenv("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            yield Env(root, str(root / "data"), manifest["fingerprint"], uri)
        finally:
            ray.shutdown()


def sweep_config(env: Env, name: str, space: dict, train: dict | None = None, **kw) -> TuneConfig:
    base = {
        "storage_path": str(env.root / "results"),
        "model": {"arch": "dxnet", "encoder": "test_resnet"},
        "data": {"manifest": env.data, "patch_size": [32, 32, 32], "batch_size": 2, "foreground_ratio": 0.5},
        "optim": {"name": "adamw", "lr": 3e-3, "schedule": "constant"},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "validation": {"hd95": False, "sw_batch_size": 4},
        "tracking": {"experiment": "tune-test"},
        "epochs": EPOCHS, "steps_per_epoch": 8, "max_failures": 0,
    }
    base.update(train or {})
    settings = {"name": name, "search_alg": "grid", "num_samples": 1, "scheduler": "asha", "grace_period": 1,
                "reduction_factor": 2, "max_concurrent_trials": 2, "registered_model_name": MODEL_NAME}
    settings.update(kw)
    return TuneConfig.model_validate({**settings, "search_space": space, "train": base})


def mlflow_client(env: Env):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=env.tracking_uri, registry_uri=env.tracking_uri)


def runs_of(env: Env, filter_string: str = "") -> list:
    client = mlflow_client(env)
    exp = client.get_experiment_by_name("tune-test")
    return [] if exp is None else client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=1000)


class InterruptOnce(tune.Callback):
    """Ctrl+C (SIGINT to the driver) once `after` trials have ended (finished or stopped); once (marker)."""

    def __init__(self, marker: str, after: int) -> None:
        self.marker, self.after, self.ended = marker, after, 0

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.ended += 1
        if self.ended >= self.after and not os.path.exists(self.marker):
            Path(self.marker).write_text(trial.trial_id)
            signal.raise_signal(signal.SIGINT)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_fails_in_one_line_before_any_work(env, tmp_path, capsys):
    from crossdim.cli import main
    from crossdim.tune import run
    from crossdim.tune.driver import SweepResourceError
    from crossdim.tune.space import SearchSpaceError

    empty = tmp_path / "empty.yaml"
    empty.write_text(f"name: empty\ntrain:\n  data: {{manifest: {env.data}}}\n")
    assert main(["tune", "--config", str(empty)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("crossdim tune: error: search_space is empty") and "\n" not in err

    with pytest.raises(SearchSpaceError, match=r"'model.encodr' is not a TrainConfig field"):
        run(sweep_config(env, "bad-key", {"model.encodr": {"values": ["test_resnet"]}}))
    with pytest.raises(SearchSpaceError, match=r"search_space\['data.batch_size'\]: value 0 is invalid"):
        run(sweep_config(env, "bad-value", {"data.batch_size": {"values": [2, 0]}}))
    gpu = {"scaling": {"num_workers": 1, "use_gpu": True, "gpus_per_worker": 1, "cpus_per_worker": 0.5}}
    with pytest.raises(SweepResourceError, match=r"needs CPU 0.5, GPU 1 but no Ray node has that much"):
        run(sweep_config(env, "no-gpu", {"optim.lr": {"values": [1e-3]}}, train=gpu))
    with pytest.raises(SweepResourceError, match=r"9 workers x \(CPU 0.5\) do not fit on the cluster's nodes \(room for 8\)"):
        run(sweep_config(env, "too-many", {"scaling.num_workers": {"values": [1, 9]}}))
    assert runs_of(env) == []  # no parent run, no trial
    assert not any((env.root / "results" / name).exists() for name in ("bad-key", "bad-value", "no-gpu", "too-many"))


# ----------------------------------------------------------------------------- the sweep
@pytest.fixture(scope="module")
def main_sweep(env):
    """The 4-trial grid (2 architectures x 2 encoders), interrupted when its first trial ends, then resumed.

    Why ASHA's outcome does not depend on timing: one trial runs at a time, so trials start in grid
    order (the first key varies fastest): T0 dxnet/test_resnet, T1 omnianet/test_resnet, then
    T2 dxnet/test_efficientnet and T3 omnianet/test_efficientnet. The encoder dimension is joint
    with the learning rate: the test_efficientnet arm trains at lr 1e-6, i.e. it validates as an
    untrained net (val Dice 0.0-0.18 measured over 4 runs; 0.11 is the all-foreground level on
    these blobs), far below test_resnet at 3e-3 after one 8-step epoch (0.78-0.93 measured;
    crossdim.train does not seed the model's initialisation, so values vary from run to run).
    The sweep is interrupted as T0 ends; Tune does not restore a scheduler's state, so after the
    resume T1 is the first trial ASHA sees and runs to the end, and T2 and T3 each reach rung 1
    below the rung's median (T1's value; then the mean of T1's and T2's) -> stopped. (Were the
    scheduler restored, T1 could be stopped too; T0 stays finished either way.) What is left to
    timing is only whether a stop lands before the stopped trial could finish its other epochs:
    Ray Train hands the trial one report per 2 s health-check poll, which leaves > 6 s per stopped
    trial, for a stop that acts within a second or two."""
    from crossdim.tune import run

    space = {JOINT: {"values": [["dxnet", [32, 32, 32]], ["omnianet", [32, 32]]]},
             "model.encoder,optim.lr": {"values": [["test_resnet", 3e-3], ["test_efficientnet", 1e-6]]}}
    config = sweep_config(env, "main", space, max_concurrent_trials=1)
    marker = str(env.root / "interrupted")
    first = run(config, callbacks=[InterruptOnce(marker, after=1)])
    before = {t.trial_id: history(env, t.run_id) for t in first.trials if t.status in ("finished", "stopped_early")}
    second = run(config)
    return config, first, before, second


def history(env: Env, run_id: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in mlflow_client(env).get_metric_history(run_id, "val_dice")]


def test_interrupted_sweep_resumes_without_rerunning_or_duplicating(env, main_sweep):
    _, first, before, second = main_sweep
    assert first.status == "interrupted" and first.registered_version is None
    assert before  # the trial that ended first
    assert len(first.trials) < 4 or any(t.status == "unfinished" for t in first.trials)
    assert second.status == "finished" and second.parent_run_id == first.parent_run_id
    children = runs_of(env, f"tags.`mlflow.parentRunId` = '{second.parent_run_id}'")
    trial_ids = [r.data.tags["crossdim.trial_id"] for r in children]
    assert len(children) == 4 and len(set(trial_ids)) == 4  # one child per trial, none duplicated
    for trial_id, old in before.items():  # finished before the interruption: not trained again
        run_id = next(t.run_id for t in second.trials if t.trial_id == trial_id)
        assert history(env, run_id) == old
    parents = runs_of(env, "tags.`crossdim.sweep` = 'main' and tags.`crossdim.sweep_key` != ''")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def test_asha_stops_a_weak_trial_early(env, main_sweep):
    _, _, _, result = main_sweep
    by_status = {s: [t for t in result.trials if t.status == s] for s in ("finished", "stopped_early", "failed")}
    assert by_status["stopped_early"], [(t.trial_id, t.status, t.epochs, t.metric) for t in result.trials]
    # see main_sweep: the lr-1e-6 arm falls below the rung-1 median; T0 (dxnet/test_resnet) finished first
    assert {t.params["model.encoder"] for t in by_status["stopped_early"]} == {"test_efficientnet"}
    finished = {(t.params["model.arch"], t.params["model.encoder"]) for t in by_status["finished"]}
    assert ("dxnet", "test_resnet") in finished
    assert all(t.epochs < EPOCHS for t in by_status["stopped_early"])
    assert all(t.epochs == EPOCHS and t.model_uri for t in by_status["finished"]) and by_status["finished"]
    assert not by_status["failed"]
    client = mlflow_client(env)
    for t in by_status["stopped_early"]:
        run = client.get_run(t.run_id)
        assert run.info.status == "KILLED" and run.data.tags["crossdim.trial_status"] == "stopped_early"


def test_children_hold_params_metrics_and_the_summary(env, main_sweep):
    config, _, _, result = main_sweep
    client = mlflow_client(env)
    for t in result.trials:
        run = client.get_run(t.run_id)
        assert run.data.params["model.encoder"] == t.params["model.encoder"]  # the trial's flattened config
        assert json.loads(run.data.params["data.patch_size"]) == t.params["data.patch_size"]
        assert len(history(env, t.run_id)) == t.epochs >= 1  # one val_dice per epoch
        assert 0.0 <= t.metric <= 1.0
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["crossdim.fingerprint"] == env.fingerprint
    assert parent.data.metrics["trials_stopped_early"] + parent.data.metrics["trials_finished"] == 4
    table = list(csv.DictReader(io.StringIO(Path(client.download_artifacts(
        result.parent_run_id, "summary/trials.csv", str(env.root / "dl"))).read_text())))
    assert sorted(r["trial_id"] for r in table) == sorted(t.trial_id for t in result.trials)
    assert {r["model.arch"] for r in table} == {"omnianet", "dxnet"}
    png = Path(client.download_artifacts(result.parent_run_id, "summary/val_dice_per_trial.png", str(env.root / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_best_model_is_registered_with_the_alias_and_loads(env, main_sweep):
    import torch

    from crossdim.infer.pull import pull
    from crossdim.models import load_model

    _, _, _, result = main_sweep
    best = max((t for t in result.trials if t.status == "finished"), key=lambda t: t.metric)
    assert result.best_trial_id == best.trial_id and result.best_metric == pytest.approx(best.metric)
    assert result.alias_moved and result.registered_version == "1"
    client = mlflow_client(env)
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(version.version) == "1" and version.run_id == best.run_id
    assert float(version.tags["crossdim.metric_value"]) == pytest.approx(best.metric)
    assert (version.tags["crossdim.fingerprint"], version.tags["crossdim.fold"]) == (env.fingerprint, "0")
    with pytest.MonkeyPatch.context() as mp:  # the inference helper's loader: pull by alias, verified cache
        mp.setenv("CROSSDIM_CACHE_DIR", str(env.root / "cache"))
        pulled = pull(f"models:/{MODEL_NAME}@champion")
    assert pulled.version == "1" and pulled.run_id == best.run_id
    model = load_model(str(pulled.directory)).eval()
    patch = best.params["data.patch_size"]
    with torch.no_grad():
        out = model(torch.zeros(1, 1, *patch))
    assert out.shape == (1, 2, *patch)  # background + blob logits, same spatial size


# ----------------------------------------------------------------------------- a worse sweep
def test_worse_sweep_leaves_the_alias_and_reports_a_failed_inflation(env, main_sweep):
    from crossdim.tune import run

    champion = main_sweep[3]
    space = {"model.encoder": {"values": ["test_resnet", "test_nfnet"]}}  # test_nfnet: reshape_as has no 3D rule
    config = sweep_config(env, "worse", space, train={"epochs": 1, "steps_per_epoch": 1, "optim": {
        "name": "adamw", "lr": 1e-7, "schedule": "constant"}}, scheduler="none")
    result = run(config)
    assert result.status == "finished"
    failed = [t for t in result.trials if t.status == "failed"]
    assert [t.params["model.encoder"] for t in failed] == ["test_nfnet"]
    assert "cannot inflate" in failed[0].reason and "\n" not in failed[0].reason
    run_info = mlflow_client(env).get_run(failed[0].run_id)
    assert run_info.info.status == "FAILED" and run_info.data.tags["crossdim.failure_reason"] == failed[0].reason
    assert result.best_metric < champion.best_metric
    assert result.registered_version == "2" and not result.alias_moved
    assert "does not beat @champion v1" in result.alias_reason
    assert str(mlflow_client(env).get_model_version_by_alias(MODEL_NAME, "champion").version) == "1"


# ----------------------------------------------------------------------------- pure
def test_asha_horizon_reads_epochs_from_a_joint_dimension():
    from crossdim.tune.driver import check_sweep, min_epochs

    def sweep(space: dict) -> TuneConfig:
        return TuneConfig.model_validate({"name": "s", "search_space": space, "grace_period": 2,
                                          "train": {"epochs": 9, "data": {"manifest": "m"}}})

    assert min_epochs(sweep({"optim.lr": {"values": [1e-3]}})) == 9
    assert min_epochs(sweep({"epochs": {"values": [6, 3]}})) == 3
    assert min_epochs(sweep({"epochs": {"low": 4, "high": 8, "integer": True}})) == 4
    joint = sweep({"model.encoder,epochs": {"values": [["test_resnet", 7], ["test_efficientnet", 2]]}})
    assert min_epochs(joint) == 2
    with pytest.raises(ConfigError, match=r"grace_period=2 must be below train.epochs=2"):
        check_sweep(joint)
