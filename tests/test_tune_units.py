"""Sweeps, the parts without Ray: search space, trial configs, resource checks, alias decision, summary."""

from __future__ import annotations

import csv
import io
import json

import pytest

from crossdim.config import ConfigError, ScalingConfig, TrainConfig, TuneConfig
from crossdim.tune.driver import SweepResourceError, check_resources, check_sweep, config_sha, min_epochs
from crossdim.tune.promote import ModelEvidence, comparison_problem, decide_alias
from crossdim.tune.space import (
    SearchSpaceError,
    candidate_configs,
    check_search_space,
    decode_params,
    expected_trials,
    field_error,
    param_space,
    trial_config,
)
from crossdim.tune.summary import TrialSummary, best_trial, rows, to_csv, to_markdown
from crossdim.tune.trial import one_line_reason

JOINT = "model.arch,data.patch_size"


def sweep(space: dict, **kw) -> TuneConfig:
    return TuneConfig.model_validate({"search_space": space, **kw})


# ----------------------------------------------------------------------------- search space
@pytest.mark.parametrize("space, fragment", [
    ({}, "search_space is empty"),
    ({"optim.lrr": {"values": [1e-3]}}, "'optim.lrr' is not a TrainConfig field (optim has name, lr"),
    ({"optim": {"values": [1]}}, "'optim' is a section"),
    ({"optim.lr.x": {"values": [1]}}, "goes below the leaf field 'optim.lr'"),
    ({"name": {"values": ["a"]}}, "'name' is set by the sweep"),
    ({"tracking.experiment": {"values": ["a"]}}, "set by the sweep"),
    ({"optim.lr": {"values": [-1.0]}}, "search_space['optim.lr']: value -1.0 is invalid: field 'optim.lr'"),
    ({"data.batch_size": {"low": 0, "high": 4, "integer": True}}, "value 0 is invalid"),
    ({"optim.lr": {"low": 0.0, "high": 1.0, "log": True}}, "log scale needs low > 0"),
    ({"model.arch": {"values": ["dxnet", "unet9000"]}}, "unknown architecture 'unet9000'"),
    ({"model.encoder": {"values": ["test_resnet", "no_such_net"]}}, "'no_such_net' is not a timm model name"),
    ({JOINT: {"values": [["omnianet"]]}}, "must be a list of 2 entries (model.arch, data.patch_size)"),
    ({JOINT: {"low": 1, "high": 2}}, "a joint dimension needs 'values'"),
    ({JOINT: {"values": [["dxnet", [32, 32, 32]]]}, "model.arch": {"values": ["dxnet"]}}, "appears in both"),
])
def test_invalid_search_space_is_one_line(space, fragment):
    with pytest.raises(SearchSpaceError) as info:
        check_search_space(sweep(space))
    message = str(info.value)
    assert fragment in message and "\n" not in message
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


def test_field_error_accepts_leaves_and_free_form_options():
    assert field_error("optim.lr") is None
    assert field_error("init.pretrained") is None
    assert field_error("model.options.drop_path_rate") is None  # inside a dict[str, Any] field
    assert field_error("data.augment.flip_prob") is None
    assert field_error("loss.dice_weight") is None


def test_grid_domains_and_trial_count():
    config = sweep({JOINT: {"values": [["omnianet", [32, 32]], ["dxnet", [32, 32, 32]]]},
                    "model.encoder": {"values": ["test_efficientnet", "test_resnet"]},
                    "optim.lr": {"low": 1e-4, "high": 1e-2, "log": True}}, search_alg="grid", num_samples=3)
    check_search_space(config)
    space = param_space(config)
    assert space[JOINT] == {"grid_search": ['["omnianet", [32, 32]]', '["dxnet", [32, 32, 32]]']}
    assert space["model.encoder"] == {"grid_search": ["test_efficientnet", "test_resnet"]}
    assert type(space["optim.lr"]).__name__ == "Float"  # ranges are sampled per grid point
    assert expected_trials(config) == 3 * 2 * 2
    assert expected_trials(config.model_copy(update={"search_alg": "random"})) == 3


def test_random_domains_sample_inside_bounds():
    config = sweep({"optim.lr": {"low": 1e-4, "high": 1e-2, "log": True},
                    "data.batch_size": {"low": 1, "high": 3, "integer": True},
                    "optim.name": {"values": ["adamw", "nadam"]}})
    space = param_space(config)
    lrs = [space["optim.lr"].sample() for _ in range(200)]
    sizes = {space["data.batch_size"].sample() for _ in range(200)}
    assert 1e-4 <= min(lrs) and max(lrs) <= 1e-2
    assert sum(lr < 1e-3 for lr in lrs) > 60  # log-uniform: about half below the geometric middle
    assert sizes == {1, 2, 3}  # `high` is inclusive
    assert {space["optim.name"].sample() for _ in range(50)} == {"adamw", "nadam"}


def test_decode_params_and_trial_config_round_trip():
    config = sweep({JOINT: {"values": [["omnianet", [32, 32]]]}, "data.batch_size": {"low": 1, "high": 4, "integer": True},
                    "init.pretrained": {"values": [True, False]}},
                   train={"tracking": {"registered_model_name": "m", "alias": "champion"}})
    fields = decode_params(config, {JOINT: '["omnianet", [32, 32]]', "data.batch_size": 3.0, "init.pretrained": False})
    assert fields == {"model.arch": "omnianet", "data.patch_size": [32, 32], "data.batch_size": 3,
                      "init.pretrained": False}
    trial = trial_config(config.train, fields, "sweep_abc_00001", "http://mlflow:5000")
    assert (trial.name, trial.model.arch, trial.data.patch_size, trial.data.batch_size) == (
        "sweep_abc_00001", "omnianet", [32, 32], 3)
    assert trial.init.pretrained is False and trial.tracking.tracking_uri == "http://mlflow:5000"
    assert trial.tracking.registered_model_name is None and trial.tracking.alias is None  # the sweep registers
    assert config.train.model.arch == "dxnet"  # the base is not modified


def test_candidate_configs_cover_scaling_dimensions():
    config = sweep({"scaling.num_workers": {"values": [1, 3]}, "scaling.cpus_per_worker": {"low": 0.5, "high": 2.0}})
    combos = {(c.scaling.num_workers, c.scaling.cpus_per_worker) for c in candidate_configs(config)}
    assert combos == {(1, 0.5), (1, 2.0), (3, 0.5), (3, 2.0)}
    assert candidate_configs(sweep({"optim.lr": {"values": [1e-3]}})) == [TrainConfig()]


def test_optuna_suggests_points_of_the_space():
    from crossdim.tune.driver import tune_config

    config = sweep({JOINT: {"values": [["omnianet", [32, 32]], ["dxnet", [32, 32, 32]]]},
                    "optim.lr": {"low": 1e-4, "high": 1e-2, "log": True}},
                   search_alg="optuna", max_concurrent_trials=2, train={"epochs": 5})
    settings = tune_config(config)
    assert type(settings.search_alg).__name__ == "OptunaSearch" and settings.max_concurrent_trials == 2
    assert settings.scheduler._max_t == 4  # ASHA rungs stay before the last epoch
    assert settings.search_alg.set_search_properties(config.metric, config.mode, param_space(config))
    for n in range(3):
        fields = decode_params(config, settings.search_alg.suggest(f"t{n}"))
        assert [fields["model.arch"], fields["data.patch_size"]] in [["omnianet", [32, 32]], ["dxnet", [32, 32, 32]]]
        assert 1e-4 <= fields["optim.lr"] <= 1e-2


def test_grid_search_limits_concurrency_in_its_generator():
    from crossdim.tune.driver import tune_config

    settings = tune_config(sweep({"optim.lr": {"values": [1e-3, 1e-2]}}, search_alg="grid", max_concurrent_trials=3,
                                 scheduler="none"))
    assert settings.search_alg.max_concurrent == 3 and settings.max_concurrent_trials is None  # Tune ignores it here
    assert settings.scheduler is None


# ----------------------------------------------------------------------------- sweep checks
def test_check_sweep_metric_and_asha_bounds():
    ok = {"optim.lr": {"values": [1e-3]}}
    check_sweep(sweep(ok, train={"epochs": 4}, grace_period=3))
    with pytest.raises(ConfigError, match=r"grace_period=4 must be below train.epochs=4"):
        check_sweep(sweep(ok, train={"epochs": 4}, grace_period=4))
    check_sweep(sweep(ok, train={"epochs": 4}, grace_period=4, scheduler="none"))
    with pytest.raises(ConfigError, match="metric 'accuracy' is not reported"):
        check_sweep(sweep(ok, metric="accuracy"))
    assert min_epochs(sweep({"epochs": {"values": [6, 3, 9]}})) == 3


def test_config_sha_ignores_registration_but_not_the_space():
    a = sweep({"optim.lr": {"values": [1e-3]}})
    assert config_sha(a) == config_sha(a.model_copy(update={"registered_model_name": "x", "max_concurrent_trials": 3}))
    assert config_sha(a) != config_sha(sweep({"optim.lr": {"values": [1e-2]}}))


# ----------------------------------------------------------------------------- resources
def scaled(**kw) -> TrainConfig:
    return TrainConfig(scaling=ScalingConfig(**kw))


def test_resources_fit_fractional_gpus_across_nodes():
    nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    check_resources([scaled(num_workers=4, use_gpu=True, gpus_per_worker=0.5, cpus_per_worker=2)], nodes)
    check_resources([scaled(num_workers=1, cpus_per_worker=0.5)], [{"CPU": 2.0}])


@pytest.mark.parametrize("config, nodes, fragment", [
    (scaled(use_gpu=True, gpus_per_worker=1), [{"CPU": 16.0}], "needs CPU 1, GPU 1 but no Ray node has that much"),
    (scaled(cpus_per_worker=32), [{"CPU": 16.0}, {"CPU": 16.0}], "needs CPU 32 but no Ray node"),
    (scaled(num_workers=3, use_gpu=True, gpus_per_worker=1), [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}],
     "3 workers x (CPU 1, GPU 1) do not fit on the cluster's nodes (room for 2)"),
    (scaled(num_workers=2, cpus_per_worker=1), [{"CPU": 2.0}], "a trial needs CPU 3.01"),
])
def test_resources_no_node_can_satisfy(config, nodes, fragment):
    with pytest.raises(SweepResourceError) as info:
        check_resources([config], nodes)
    assert fragment in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- alias decision
def evidence(version: str, value: float | None, fingerprint: str | None = "f" * 64, fold: int | None = 0,
             metric: str | None = "val_dice") -> ModelEvidence:
    return ModelEvidence(version=version, metric=metric, value=value, fingerprint=fingerprint, fold=fold)


def test_alias_moves_only_to_a_better_model_on_the_same_split():
    assert decide_alias(evidence("2", 0.8), None, "champion", "max").move
    better = decide_alias(evidence("2", 0.8), evidence("1", 0.7), "champion", "max")
    assert better.move and "beats @champion v1 0.7000" in better.reason
    worse = decide_alias(evidence("2", 0.6), evidence("1", 0.7), "champion", "max")
    assert not worse.move and "does not beat" in worse.reason
    assert not decide_alias(evidence("2", 0.7), evidence("1", 0.7), "champion", "max").move  # a tie keeps it
    assert decide_alias(evidence("2", 0.3), evidence("1", 0.7), "champion", "min").move  # e.g. a loss


@pytest.mark.parametrize("holder, fragment", [
    (evidence("1", None), "records no metric"),
    (evidence("1", 0.1, metric="val_hd95_1"), "records val_hd95_1, not val_dice"),
    (evidence("1", 0.1, fingerprint=None), "no dataset fingerprint/fold"),
    (evidence("1", 0.1, fingerprint="a" * 64), "other data"),
    (evidence("1", 0.1, fold=1), "other validation fold (1 vs 0)"),
])
def test_alias_stays_when_models_cannot_be_compared(holder, fragment):
    decision = decide_alias(evidence("2", 0.9), holder, "champion", "max")
    assert not decision.move and fragment in decision.reason and "cannot compare" in decision.reason


def test_fingerprints_compare_on_the_mlflow_digest_prefix():
    full = "0123456789abcdef" * 4
    assert comparison_problem(evidence("2", 0.9, fingerprint=full), evidence("1", 0.1, fingerprint=full[:36])) is None


# ----------------------------------------------------------------------------- summary
def trial(tid: str, status: str, metric: float | None, model: bool = True, **params) -> TrialSummary:
    return TrialSummary(trial_id=tid, run_id=f"run{tid}", status=status, params=params, metric=metric, epochs=3,
                        model_uri=f"runs:/run{tid}/model" if model else None)


def test_best_trial_is_a_finished_one_with_a_model():
    trials = [trial("a", "finished", 0.5), trial("b", "stopped_early", 0.9, model=False), trial("c", "finished", 0.7),
              trial("d", "failed", None, model=False), trial("e", "finished", 0.95, model=False)]
    assert best_trial(trials, "max").trial_id == "c"
    assert best_trial(trials, "min").trial_id == "a"
    assert best_trial([trial("b", "stopped_early", 0.9)], "max") is None


def test_summary_tables_hold_every_trial():
    trials = [trial("b", "failed", None, model=False, **{"model.encoder": "test_nfnet"}),
              trial("a", "finished", 0.61234, **{"model.encoder": "test_resnet", "data.patch_size": [32, 32]})]
    trials[0].reason = "InflationError: no 3D rule | for reshape_as"
    table = rows(trials, ["model.encoder", "data.patch_size"], "val_dice")
    parsed = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert [r["trial_id"] for r in parsed] == ["a", "b"]
    assert parsed[0]["val_dice"] == "0.6123" and json.loads(parsed[0]["data.patch_size"]) == [32, 32]
    assert parsed[1]["status"] == "failed" and parsed[1]["reason"].startswith("InflationError")
    md = to_markdown(table).splitlines()
    assert len(md) == 4 and md[0].startswith("| trial_id | status | model.encoder")
    assert "\\|" in md[3]  # a pipe inside a cell does not break the table


def test_one_line_reason_finds_the_worker_error():
    text = ("Training failed due to worker errors:\n[Rank 0]\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
            "crossdim.models.inflate.InflationError: cannot inflate reshape_as at stem_conv1\n")
    assert one_line_reason(RuntimeError(text)) == "InflationError: cannot inflate reshape_as at stem_conv1"
    assert one_line_reason(ValueError("plain message\nmore")) == "ValueError: plain message"
    assert one_line_reason(KeyError()) == "KeyError"


# ----------------------------------------------------------------------------- MLflow runs (local sqlite)
class FakeTrial:
    def __init__(self, trial_id: str, last_result: dict | None = None, error_file: str | None = None,
                 config: dict | None = None) -> None:
        self.trial_id, self.last_result, self.error_file, self.config = trial_id, last_result, error_file, config or {}


def test_child_run_is_found_again_and_adopted_by_the_training_job(local_mlflow, tmp_path):
    from crossdim.tracking import start_or_resume_run
    from crossdim.tune.runs import PARENT_TAG, find_or_create_child, start_or_resume_parent

    storage = str(tmp_path / "results")
    parent, prior = start_or_resume_parent(local_mlflow, "exp", storage, "sw", {"crossdim.metric": "val_dice"})
    assert prior == {}
    again, prior = start_or_resume_parent(local_mlflow, "exp", storage, "sw", {})
    assert again == parent and prior["crossdim.metric"] == "val_dice"
    child = find_or_create_child(local_mlflow, "exp", parent, "sw", "t_00001", "sw_t_00001", storage, {"optim.lr": 0.1})
    assert find_or_create_child(local_mlflow, "exp", parent, "sw", "t_00001", "sw_t_00001", storage, {}) == child
    run_id, resumed = start_or_resume_run(local_mlflow, "exp", storage, "sw_t_00001")  # what crossdim.train does
    assert (run_id, resumed) == (child, True)
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(local_mlflow).get_run(child).data.tags
    assert tags[PARENT_TAG] == parent and json.loads(tags["crossdim.trial_params"]) == {"optim.lr": 0.1}


def test_outcomes_callback_records_stopped_and_failed_trials(local_mlflow, tmp_path):
    from mlflow.tracking import MlflowClient

    from crossdim.tune.outcomes import TrialOutcomes
    from crossdim.tune.runs import (
        child_by_trial,
        find_or_create_child,
        mark_trial,
        note_failure,
        start_or_resume_parent,
    )

    storage = str(tmp_path / "results")
    parent, _ = start_or_resume_parent(local_mlflow, "exp", storage, "sw", {})
    callback = TrialOutcomes(local_mlflow, "exp", storage, parent, "sw")
    client = MlflowClient(local_mlflow)

    stopped = find_or_create_child(local_mlflow, "exp", parent, "sw", "a", "sw_a", storage, {})
    callback.on_trial_complete(0, [], FakeTrial("a", {"epoch": 1.0}))
    run = client.get_run(stopped)
    assert run.info.status == "KILLED" and run.data.tags["crossdim.trial_status"] == "stopped_early"
    assert run.data.tags["crossdim.stopped_after_epochs"] == "2"

    done = find_or_create_child(local_mlflow, "exp", parent, "sw", "b", "sw_b", storage, {})
    mark_trial(local_mlflow, done, "finished")
    callback.on_trial_complete(0, [], FakeTrial("b", {"epoch": 0.0}))  # ended by the trial itself: unchanged
    assert client.get_run(done).data.tags["crossdim.trial_status"] == "finished"

    # a trial that raised while the scheduler stopped it noted a reason: still stopped_early, reason dropped
    torn_down = find_or_create_child(local_mlflow, "exp", parent, "sw", "d", "sw_d", storage, {})
    note_failure(local_mlflow, torn_down, "RayTaskError: interrupted")
    callback.on_trial_complete(0, [], FakeTrial("d", {"epoch": 0.0}))
    run = client.get_run(torn_down)
    assert run.info.status == "KILLED" and run.data.tags["crossdim.trial_status"] == "stopped_early"
    assert "crossdim.failure_reason" not in run.data.tags

    # a trial that failed noted its reason; the callback ends the run FAILED with it
    noted = find_or_create_child(local_mlflow, "exp", parent, "sw", "e", "sw_e", storage, {})
    note_failure(local_mlflow, noted, "ValueError: cannot inflate test_nfnet")
    assert client.get_run(noted).info.status == "RUNNING"
    callback.on_trial_error(0, [], FakeTrial("e", error_file=str(tmp_path / "missing.txt")))
    run = client.get_run(noted)
    assert run.info.status == "FAILED" and run.data.tags["crossdim.trial_status"] == "failed"
    assert run.data.tags["crossdim.failure_reason"] == "ValueError: cannot inflate test_nfnet"

    error_file = tmp_path / "error.txt"
    error_file.write_text("Traceback (most recent call last):\n  ...\nray.exceptions.RayActorError: The actor died\n")
    callback.on_trial_error(0, [], FakeTrial("c", error_file=str(error_file), config={"optim.lr": 0.5}))
    failed = child_by_trial(local_mlflow, "exp", storage, parent, "c")  # created: the trial never opened one
    assert failed.info.status == "FAILED"
    assert failed.data.tags["crossdim.failure_reason"] == "RayActorError: The actor died"
