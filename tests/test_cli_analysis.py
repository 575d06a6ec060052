"""Tests for ``prunekit sensitivity`` and ``prunekit sweep`` (prunekit.cli_analysis)."""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from test_cli_data import user_module

from prunekit import cli
from prunekit.cli_analysis import HANDLERS, add_parsers, parse_method
from prunekit.errors import PruningError, SweepError

FAST = ["--model", "lenet300", "--dataset", "digits", "--epochs", "1"]


def run(argv: list[str]) -> str:
    """Parse ``argv`` with a parser built by ``add_parsers`` and run its handler."""
    parser = argparse.ArgumentParser(prog="prunekit")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    console = Console(file=io.StringIO(), width=160)
    HANDLERS[args.command](args, console)
    return console.file.getvalue()


def test_sensitivity_writes_table_plot_and_allocation(tmp_path: Path) -> None:
    out = run(
        [
            "sensitivity",
            *FAST,
            "--sparsities",
            "0.5,0.9",
            "--target",
            "0.3",
            "--budget",
            "0.5",
            "--out",
            str(tmp_path),
        ]
    )
    folder = tmp_path / "sensitivity-lenet300-digits"
    assert f"report: {folder / 'report.html'}" in out and "fc1" in out
    html = (folder / "report.html").read_text()
    assert html.count('<img src="data:image/png;base64,') == 1
    assert (folder / "figures" / "sensitivity.svg").exists()
    with (folder / "sensitivity.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["layer"] for r in rows] == ["fc1", "fc2"]  # the classifier fc3 is kept dense
    assert all(0 <= float(r["0.9"]) <= 1 for r in rows)
    allocation = json.loads((folder / "results.json").read_text())["sections"][1]["rows"]
    sizes = {"fc1": 64 * 300, "fc2": 300 * 100}  # the layers analysed and allocated
    assert sorted(r["layer"] for r in allocation) == sorted(sizes)
    total = sum(r["sparsity"] * sizes[r["layer"]] for r in allocation) / sum(sizes.values())
    assert total == pytest.approx(0.3)


def test_sweep_writes_curves_latency_and_table(tmp_path: Path) -> None:
    out = run(
        [
            "sweep",
            *FAST,
            "--methods",
            "magnitude-global,l2-row",
            "--sparsities",
            "0.5,0.8",
            "--seeds",
            "0,1",
            "--exclude",
            "fc3",
            "--materialize",
            "shrink",
            "--out",
            str(tmp_path),
        ]
    )
    folder = tmp_path / "sweep-lenet300-digits"
    assert "magnitude-global" in out and "l2-row" in out and "random" in out
    html = (folder / "report.html").read_text()
    assert "materialize=&#x27;shrink&#x27;" in html
    assert html.count('<img src="data:image/png;base64,') == 2
    with (folder / "accuracy-vs-sparsity.csv").open() as f:
        rows = list(csv.DictReader(f))
    methods = {r["method"] for r in rows}
    assert methods == {"dense", "magnitude-global", "l2-row", "random"}
    assert all(r["seeds"] == "2" for r in rows)
    per_seed = json.loads((folder / "results.json").read_text())["sections"][1]["rows"]
    assert len(per_seed) == 2 * (1 + 3 * 2)


def test_parse_method() -> None:
    assert parse_method("magnitude-global") == {"criterion": "magnitude", "scope": "global"}
    assert parse_method("l2-filter-local") == {
        "criterion": "l2",
        "granularity": "filter",
        "scope": "local",
    }
    for bad in ("l2-row-column", "magnitude-", "l2-global-local"):
        with pytest.raises(SweepError, match="criterion"):
            parse_method(bad)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["sweep", "--model", "nope", "--dataset", "digits"], "model 'nope' does not exist"),
        (["sweep", "--model", "lenet300", "--dataset", "nope"], "unknown dataset"),
        (["sweep", *FAST, "--methods", "nope"], "unknown criterion"),
        (["sweep", *FAST, "--sparsities", "0.5,1.5"], "sparsit"),
        (["sweep", *FAST, "--sparsities", "half"], "--sparsities"),
        (["sweep", *FAST, "--seeds", ""], "--seeds"),
        (["sweep", *FAST, "--methods", "l2-kernel"], "kernel"),
        (["sensitivity", *FAST, "--granularity", "kernel"], "kernel"),
        (["sensitivity", "--model", "lenet5", "--dataset", "digits"], "does not accept"),
    ],
)
def test_bad_input_raises_pruning_error_before_training(
    tmp_path: Path, argv: list[str], match: str
) -> None:
    with pytest.raises(PruningError, match=match):
        run([*argv, "--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


def test_main_exits_2_with_a_red_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["sweep", *FAST, "--sparsities", "2"]) == 2
    assert "error:" in capsys.readouterr().err


FACTORY = """
from torch import nn


def mlp(hidden=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
"""


@pytest.fixture
def factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    return f"{user_module(FACTORY, tmp_path, monkeypatch)}:mlp"


def test_sensitivity_and_sweep_take_a_factory_model_with_kwargs(
    factory: str, tmp_path: Path
) -> None:
    common = ["--model", factory, "--model-kwargs", '{"hidden": 12}', "--dataset", "digits",
              "--epochs", "1", "--out", str(tmp_path), "--device", "cpu"]  # fmt: skip
    out = run(["sensitivity", *common, "--sparsities", "0.5", "--target", "0.3", "--budget", "1"])
    rows = (tmp_path / "sensitivity-mlp-digits" / "sensitivity.csv").read_text().splitlines()
    # the output layer "3" is kept dense by default, so only "1" is analysed
    assert "report:" in out and [r.split(",")[0] for r in rows[1:]] == ["1"]
    assert rows[1].split(",")[2] == str(64 * 12)  # the factory's kwargs were used
    run(["sweep", *common, "--sparsities", "0.5", "--seeds", "0"])
    assert (tmp_path / "sweep-mlp-digits" / "report.html").exists()


@pytest.mark.parametrize("command", ["sensitivity", "sweep"])
def test_help_shows_defaults_and_device_choices(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--device {cpu,cuda,mps}" in text and "(default: cpu)" in text
    assert "package.module:factory" in text and "(default: 3)" in text


DATA_MODULE = """
from torch.utils.data import DataLoader, TensorDataset

from prunekit import zoo


def loaders():
    d = zoo.load_dataset("digits")
    train = DataLoader(TensorDataset(d.x_train, d.y_train), batch_size=64, shuffle=True)
    return {"train": train, "eval": DataLoader(TensorDataset(d.x_test, d.y_test), batch_size=256)}


def wrong():
    return [1, 2]
"""


@pytest.fixture
def data_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    return user_module(DATA_MODULE, tmp_path, monkeypatch)


def test_user_loaders_from_a_data_function(factory: str, data_module: str, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    common = ["--model", factory, "--dataset", f"{data_module}:loaders", "--epochs", "5",
              "--out", str(out_dir)]  # fmt: skip
    run(["sensitivity", *common, "--sparsities", "0.5", "--target", "0.3", "--budget", "1"])
    results = json.loads((out_dir / "sensitivity-mlp-loaders" / "results.json").read_text())
    dense = float(results["sections"][0]["text"].split()[2].rstrip(";"))
    assert dense > 0.5  # trained on the user's DataLoader, scored on theirs
    run(["sweep", *common, "--sparsities", "0.5", "--seeds", "0", "--methods", "l2-row"])
    assert (out_dir / "sweep-mlp-loaders" / "report.html").exists()
    with pytest.raises(PruningError, match=r"returned list \[1, 2\], not a mapping with keys"):
        run(["sweep", *common[:2], "--dataset", f"{data_module}:wrong", "--out", str(out_dir)])
    with pytest.raises(PruningError, match="data 'nope_xyz:f': module 'nope_xyz' does not"):
        run(["sweep", *common[:2], "--dataset", "nope_xyz:f", "--out", str(out_dir)])
