"""Tests for ``prunekit demo``: the chapter's practice as one command."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

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
