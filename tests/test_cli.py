"""Tests for the ``prunekit`` command line and the demo behind ``prunekit demo``."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prunekit
from prunekit import demo, zoo
from prunekit.cli import main


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def test_demo_quick_writes_markdown_and_csv(demo_dir: Path) -> None:
    with (demo_dir / "demo.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {row["model"] for row in rows} == {"lenet300", "lenet5"}
    kinds = {(row["model"], row["granularity"], row["criterion"]) for row in rows}
    for model in ("lenet300", "lenet5"):
        assert (model, "dense", "-") in kinds
        assert (model, "element", "random") in kinds
    for row in rows:
        pruned = row["granularity"] != "dense"
        assert (int(row["nonzero"]) < int(row["params"])) == pruned
        assert float(row["latency_ms"]) > 0
    markdown = (demo_dir / "demo.md").read_text()
    assert "| lenet5 | dense | - |" in markdown
    assert "| lenet300 | element | random | 0.90 |" in markdown
    assert "do not make dense kernels faster" in markdown


@pytest.mark.parametrize("plan", demo.PLANS, ids=lambda plan: plan.name)
def test_every_full_demo_setting_prunes(plan: demo.ModelPlan) -> None:
    runs = demo.settings(plan)
    assert runs[:2] == [demo.DENSE, demo.RANDOM]
    shape = (784,) if plan.flat else (1, 28, 28)
    calibration = [(torch.randn(8, *shape), torch.randint(0, 10, (8,)))]
    for setting in runs[1:]:
        report = demo.prune(zoo.build_model(plan.name), setting, calibration, seed=0)
        assert report.sparsity > 0, setting
        if setting.granularity in demo.KEEP_CLASSIFIER:
            assert demo.CLASSIFIER not in {r.name for r in report.layers}


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
