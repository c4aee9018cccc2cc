"""Typed configs: YAML + dotted overrides, one-line errors naming file and field."""

import pytest

from crossdim.config import ConfigError, PreprocessConfig, TrainConfig, TuneConfig, flatten, load_config


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: run1\nmodel:\n  arch: dsnet\noptim:\n  lr: 0.01\n")
    cfg = load_config(TrainConfig, f, ["optim.lr=3e-4", "data.patch_size=[16,16,16]", "scaling.use_gpu=true"])
    assert cfg.name == "run1" and cfg.model.arch == "dsnet"
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.data.patch_size == [16, 16, 16]
    assert cfg.scaling.use_gpu is True
    assert cfg.model.encoder == "test_efficientnet"  # default kept


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["optim.lr=-1"], "field 'optim.lr'"),
        (["optim.nope=1"], "field 'optim.nope': unknown field"),
        (["optim.name=sgd9"], "field 'optim.name'"),
        (["nokeyvalue"], "expected key=value"),
    ],
)
def test_bad_values_name_the_field(overrides, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(TrainConfig, None, overrides)
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(TrainConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(TrainConfig, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(TrainConfig, lst)


def test_search_space_validation():
    cfg = load_config(TuneConfig, None, ["search_space={optim.lr: {low: 1e-4, high: 1e-2, log: true}}"])
    assert cfg.search_space["optim.lr"].log
    with pytest.raises(ConfigError, match="search_space"):
        load_config(TuneConfig, None, ["search_space={optim.lr: {low: 1, high: 0.1}}"])
    with pytest.raises(ConfigError, match="search_space"):
        load_config(TuneConfig, None, ["search_space={model.arch: {values: []}}"])


def test_flatten_and_preprocess_defaults():
    flat = flatten(TrainConfig().model_dump())
    assert flat["optim.lr"] == 1e-3 and "scaling.num_workers" in flat
    pre = PreprocessConfig(format="msd", input="in", output="out")
    assert pre.target_spacing == "median" and pre.image_dtype == "float16"
