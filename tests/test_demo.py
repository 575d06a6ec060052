"""Tests for ``prunekit demo``: the chapter's practice as one command and one report."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from test_report import PNG_SIGNATURE, assert_renders, needs_browser

from prunekit import cli
from prunekit.analysis.profile import nm_bytes
from prunekit.analysis.sensitivity import LayerSensitivity, SensitivityReport
from prunekit.demo import criteria, run, timing
from prunekit.demo.context import FULL, QUICK

FIGURES = {
    "granularity",
    "conv-mask-3d",
    "weights-histogram",
    "sensitivity",
    "density-local",
    "density-global",
    "density-sensitivity",
    "accuracy-vs-sparsity",
    "latency-vs-macs",
}
HEADINGS = [
    "Dense models",
    "Granularity",
    "Criteria",
    "Scope and allocation",
    "Accuracy vs sparsity",
    "One-shot vs iterative",
    "When to prune",
    "Lottery ticket",
    "Structured shrinking",
    "N:M (2:4) storage",
]
LENET300 = {"fc1": 784 * 300, "fc2": 300 * 100, "fc3": 100 * 10}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The quick demo run once through the command line: its folder and terminal output."""
    out = tmp_path_factory.mktemp("demo")
    terminal = Console(file=io.StringIO(), width=160)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "wide_console", lambda: terminal)
        assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    return out / "demo", terminal.file.getvalue()


def _sections(folder: Path) -> dict[str, list[dict]]:
    data = json.loads((folder / "results.json").read_text())
    return {s["heading"]: s["rows"] for s in data["sections"]}


def test_every_section_is_in_the_report_and_on_the_terminal(demo: tuple[Path, str]) -> None:
    folder, terminal = demo
    assert list(_sections(folder)) == HEADINGS
    for heading in HEADINGS:
        assert heading in terminal
        assert f"## {heading}" in (folder / "report.md").read_text()
    assert terminal.rstrip().endswith(f"report: {(folder / 'report.html').resolve()}")
    assert {p.stem for p in (folder / "figures").glob("*.png")} == FIGURES
    for stem in FIGURES:
        assert (folder / "figures" / f"{stem}.png").read_bytes().startswith(PNG_SIGNATURE)
        assert (folder / "figures" / f"{stem}.svg").stat().st_size > 0
    assert (folder / "granularity.csv").read_text().startswith("model,granularity,sparsity")
    protocol = json.loads((folder / "results.json").read_text())["protocol"]
    assert protocol["seed"] == "0" and protocol["data"].startswith("mnist5k: 600 training")


def test_pruned_sparsities_are_the_requested_ones(demo: tuple[Path, str]) -> None:
    sections = _sections(demo[0])
    for row in sections["Granularity"]:
        # 50% of every layer, except channel groups of uneven size in LeNet-5.
        assert row["sparsity"] == pytest.approx(0.5, abs=0.002), row
    for row in sections["Criteria"]:
        assert row["sparsity"] == pytest.approx(0.9 if row["granularity"] == "element" else 0.5)
    local, global_, allocated = sections["Scope and allocation"]
    assert [local[f"{n} sparsity"] for n in LENET300] == pytest.approx([0.95] * 3, abs=1e-4)
    assert global_["sparsity"] == pytest.approx(0.95, abs=1e-4)
    assert global_["fc1 sparsity"] > 0.95 > global_["fc3 sparsity"]  # the big layer pays most
    assert allocated["allocation"].startswith("sensitivity (drop <= ")
    assert allocated["sparsity"] == pytest.approx(0.95, abs=1e-3)  # whole weights per layer
    for row in sections["When to prune"]:
        if row["model"] == "lenet300":
            assert row["sparsity"] == pytest.approx(timing.TARGET, abs=1e-4), row
    iterative = [r for r in sections["One-shot vs iterative"] if r["method"] == "iterative"]
    assert [r["sparsity"] for r in iterative] == pytest.approx(
        [1 - 0.03 ** (k / 3) for k in (1, 2, 3)], abs=1e-4
    )


def test_lottery_keeps_the_geometric_fraction(demo: tuple[Path, str]) -> None:
    rows = _sections(demo[0])["Lottery ticket"]
    assert [r["round"] for r in rows] == list(range(QUICK.lottery_rounds + 1))
    assert rows[0]["random re-init"] is None
    for r in rows:
        rates = {"fc1": 0.6, "fc2": 0.6, "fc3": 0.3}  # the classifier at half the rate
        kept = sum(n * (1 - rates[k]) ** r["round"] for k, n in LENET300.items())
        assert r["weights left"] == pytest.approx(kept / sum(LENET300.values()), abs=1e-4)
        assert r["round"] == 0 or 0 <= r["random re-init"] <= 1


def test_shrink_removes_parameters_and_masking_does_not(demo: tuple[Path, str]) -> None:
    rows = _sections(demo[0])["Structured shrinking"]
    dense = rows[0]
    assert dense["method"] == "dense" and dense["speed-up"] == 1
    masked = [r for r in rows if r["method"] == "masked filters"]
    shrunk = [r for r in rows if r["method"] == "pk.shrink"]
    assert [r["ratio"] for r in masked] == [r["ratio"] for r in shrunk] == [0.25, 0.5, 0.75]
    for m, s in zip(masked, shrunk, strict=True):
        assert m["params"] == dense["params"] and m["MACs"] == dense["MACs"]  # same shapes
        assert m["nonzero"] < dense["params"] and m["eff. MACs"] < dense["MACs"]
        assert s["params"] == s["nonzero"] < dense["params"] and s["MACs"] < dense["MACs"]
    assert [s["params"] for s in shrunk] == sorted((s["params"] for s in shrunk), reverse=True)


def test_nm_bytes_are_the_compressed_format(demo: tuple[Path, str]) -> None:
    rows = _sections(demo[0])["N:M (2:4) storage"]
    assert [r["layer"] for r in rows] == list(LENET300)
    for row, numel in zip(rows, LENET300.values(), strict=True):
        assert row["sparsity"] == 0.5
        assert row["dense bytes"] == 4 * numel
        # values (half the weights) + 2-bit positions: 0.5 + 1/32 of fp32
        assert row["2:4 bytes"] == nm_bytes(numel, 4) == 2 * numel + math.ceil(numel / 8)
        assert row["CSR bytes"] > row["dense bytes"]


def test_accuracy_curve_has_the_random_baseline(demo: tuple[Path, str]) -> None:
    rows = _sections(demo[0])["Accuracy vs sparsity"]
    methods = {r["method"] for r in rows}
    assert methods == {"dense", "magnitude (global)", "L2 rows (local)", "random"}
    for r in rows:
        if r["method"] == "magnitude (global)":
            assert r["compression"] == pytest.approx(1 / (1 - r["sparsity"]), rel=0.02)


@needs_browser
def test_the_demo_report_renders_in_a_browser(demo: tuple[Path, str], tmp_path: Path) -> None:
    assert_renders(demo[0] / "report.html", tmp_path, run.TITLE, images=len(FIGURES))


def test_cubic_schedule_ends_inside_training() -> None:
    for budget in (QUICK, FULL):
        n = budget.train_images
        ctx = SimpleNamespace(budget=budget, data=(torch.zeros(n, 1), torch.zeros(n)))
        schedule = timing._cubic(ctx)  # type: ignore[arg-type]
        steps = budget.train_epochs * math.ceil(n / timing.BATCH)
        assert schedule.milestones()[-1] == schedule.end == 8 * schedule.every
        assert schedule.end <= steps < schedule.end + 5 * schedule.every


def test_sensitivity_allocation_takes_the_tightest_budget_that_reaches_the_target() -> None:
    layers = [
        LayerSensitivity("big", "Linear", 900, (0.9, 0.89, 0.85)),  # drops 0, .01, .05
        LayerSensitivity("small", "Linear", 100, (0.8, 0.5, 0.2)),  # drops .1, .4, .7
    ]
    report = SensitivityReport("element", "magnitude", 0.9, (0.5, 0.9, 0.99), layers)
    for target, tightest in ((0.8, 0.01), (0.95, 0.4)):
        budget, alloc = criteria.sensitivity_allocation(report, target)
        assert budget == pytest.approx(tightest)
        assert (900 * alloc["big"] + 100 * alloc["small"]) / 1000 == pytest.approx(target)
