"""Tests for the ``prunekit`` command line (the demo has its own file, test_demo.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import prunekit
from prunekit import zoo
from prunekit.cli import main


def test_profile_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--model", "lenet5"]) == 0
    out = capsys.readouterr().out
    assert "conv1" in out and "total" in out and "Latency" in out


def test_bad_sparsity_is_one_red_line_and_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["prune", "--model", "lenet300", "--dataset", "mnist5k", "--sparsity", "1.5"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "sparsity=1.5" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_unknown_model_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--model", "lenet6"]) == 2
    assert "'lenet6'" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert prunekit.__version__ in capsys.readouterr().out


def test_python_dash_m_prunekit() -> None:
    src = str(Path(prunekit.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src}
    done = subprocess.run(
        [sys.executable, "-m", "prunekit", "--version"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0 and prunekit.__version__ in done.stdout


def test_shrink_command_saves_a_loadable_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["shrink", "--model", "vgg", "--ratio", "0.5", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "prunekit shrink" in out and "faster" in out
    loaded = prunekit.load_shrunk(zoo.build_model("vgg"), tmp_path)
    assert loaded.features[0].out_channels == 8


def test_shrink_command_bad_ratio_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shrink", "--model", "vgg", "--ratio", "1.5"]) == 2
    assert "ratio" in capsys.readouterr().err
