"""Every example recipe runs end to end with ``--quick`` and reports what it promised."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from prunekit import recipes
from prunekit.errors import RecipeError

EXAMPLES = sorted((Path(__file__).parents[1] / "examples" / "recipes").glob("*.yaml"))

# name -> total sparsity of the prunable layers after the run (None: physically shrunk).
SPARSITY = {
    "criteria-taylor": 0.9,
    "frequency-iterative": 0.95,
    "granularity-filter": None,
    "lottery-ticket": 0.7,  # the rate per round is derived from the target (fc3: half rate)
    "nm-2-4-export": 0.5,
    "scope-erk": 0.9,
    "timing-before-snip": 0.9,
    "timing-during-cubic": 0.9,
    "timing-soft-filter": None,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _section(results: dict, heading: str) -> dict:
    return next(s for s in results["sections"] if s["heading"] == heading)


def test_every_chapter_section_has_an_example() -> None:
    names = {recipes.load(path).name for path in EXAMPLES}
    assert names == {*SPARSITY, "llm-wanda"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_recipe_runs_quick(path: Path, tmp_path: Path) -> None:
    recipe = recipes.load(path)
    console = Console(file=io.StringIO(), width=160)
    folder = recipes.run(recipe, out_dir=tmp_path, quick=True, console=console)
    assert folder == tmp_path / recipe.name
    html = (folder / "report.html").read_text()
    assert recipe["description"] in html and (folder / "report.md").exists()
    results = json.loads((folder / "results.json").read_text())
    settings = {r["setting"]: r["value"] for r in _section(results, "Recipe")["rows"]}
    assert settings["name"] == recipe.name
    if recipe["kind"] == "llm":
        rows = _section(results, "Perplexity")["rows"]
        dense, pruned = rows[0]["perplexity"], rows[1]["perplexity"]
        assert 1 < dense <= pruned  # pruning 50% without retraining never helps
        layers = _section(results, "Layers")["rows"]
        assert all(r["sparsity"] == pytest.approx(0.5, abs=0.01) for r in layers)
        return
    accuracy = _section(results, "Accuracy")["rows"]
    assert accuracy and all(0 <= r["accuracy"] <= 1 for r in accuracy)
    assert (folder / "figures" / "density.png").exists()
    total = _section(results, "Cost")["rows"][-1]
    expected = SPARSITY[recipe.name]
    if expected is None:  # shrunk: fewer weights, none of them zero by pruning
        assert total["macs"] < 0.9 * _dense_macs(recipe)
    else:
        assert total["sparsity"] == pytest.approx(expected, abs=0.02)
    for fmt in recipe["export"]["formats"]:
        assert any(r["format"] == fmt for r in _section(results, "Export")["rows"])


def _dense_macs(recipe: recipes.Recipe) -> int:
    from prunekit import zoo
    from prunekit.analysis.profile import count_macs

    return count_macs(zoo.build_model(recipe["model"]["spec"]), zoo.example_input("lenet5"))


def test_model_specific_error_comes_before_training(tmp_path: Path) -> None:
    text = (
        "name: slim\nmodel: {spec: lenet300, kwargs: {in_features: 64}}\ndata: {dataset: digits}\n"
        "prune: {granularity: filter, sparsity: 0.5}\ntiming: {when: during, method: slimming}\n"
    )
    recipe = recipes.loads(text, "slim.yaml")
    with pytest.raises(RecipeError) as info:
        recipes.run(recipe, out_dir=tmp_path, console=Console(file=io.StringIO()))
    assert str(info.value).startswith("slim.yaml:4: prune = {'granularity': 'filter'")
    assert "LeNet300100 has no affine BatchNorm to slim" in str(info.value)
    assert not any(tmp_path.iterdir())


def test_recipe_without_data_prunes_and_exports(tmp_path: Path) -> None:
    text = (
        "name: no-data\nmodel: lenet5\ntrain: {epochs: 0}\nfinetune: {epochs: 0}\n"
        "prune: {sparsity: 0.5, granularity: row, criterion: l1}\n"
        "export: {formats: [safetensors]}\n"
    )
    folder = recipes.run(recipes.loads(text), out_dir=tmp_path, console=Console(file=io.StringIO()))
    results = json.loads((folder / "results.json").read_text())
    assert _section(results, "Accuracy")["rows"] == []
    assert _section(results, "Cost")["rows"][-1]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert (folder / "export" / "model.safetensors").exists()


@pytest.mark.parametrize("method", ["soft-filter", "slimming"])
def test_structural_methods_train_with_the_recipe_optimizer(method: str, monkeypatch) -> None:
    from types import SimpleNamespace

    from prunekit.recipes import pipeline

    text = (
        "name: s\nmodel: lenet5\ndata: {dataset: digits}\ntrain: {epochs: 1, optimizer: sgd}\n"
        f"prune: {{granularity: filter, criterion: l2, sparsity: 0.5}}\n"
        f"timing: {{when: during, method: {method}}}\n"
    )
    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        return SimpleNamespace(pruned_accuracy=0.5, final_accuracy=0.5)

    monkeypatch.setattr(pipeline.training, "soft_filter_pruning", fake)
    monkeypatch.setattr(pipeline.training, "network_slimming", fake)
    run = SimpleNamespace(recipe=recipes.loads(text), model=None, data=None, example=None,
                          quick=False, console=Console(file=io.StringIO()), stages={})  # fmt: skip
    run.epochs = lambda section: run.recipe[section]["epochs"]
    pipeline._structural(run)
    assert seen["optimizer"] == "sgd" and seen["lr"] == 1e-3 and seen["ratio"] == 0.5
