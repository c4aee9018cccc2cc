"""The `crossdim` command: every stage listed, bad input -> one line and a non-zero exit."""

import subprocess
import sys

from crossdim.cli import STAGES, main


def test_help_lists_every_stage(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for stage in STAGES:
        assert stage in out


def test_bad_config_file_is_one_line(tmp_path, capsys):
    rc = main(["train", "--config", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err == f"crossdim train: error: {tmp_path / 'nope.yaml'}: config file not found"


def test_bad_override_is_one_line(capsys):
    rc = main(["train", "--set", "optim.lr=abc"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("crossdim train: error:") and "optim.lr" in err
    assert len(err.splitlines()) == 1


def test_pipeline_module_takes_same_arguments(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipelines.train", "--config", str(tmp_path / "x.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("x.yaml: config file not found")
