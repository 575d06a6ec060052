"""Every example recipe runs end to end with ``--quick`` and reports what it promised."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from prunekit import recipes
from prunekit.errors import RecipeError

EXAMPLES = sorted((Path(__file__).parents[1] / "examples" / "recipes").glob("*.yaml"))

# name -> total sparsity of the prunable layers after the run (None: physically shrunk).
SPARSITY = {
    "criteria-taylor": 0.9,
    "frequency-iterative": 0.95,
    "granularity-filter": None,
    "lottery-ticket": 0.7,  # the rate per round is derived from the target (fc3 kept dense)
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

    criterion = "criterion: l2, " if method == "soft-filter" else ""  # slimming ranks by |gamma|
    text = (
        "name: s\nmodel: lenet5\ndata: {dataset: digits}\ntrain: {epochs: 1, optimizer: sgd}\n"
        f"prune: {{granularity: filter, {criterion}sparsity: 0.5}}\n"
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


class _NewBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage an aten op creates (views share their
    input's storage and are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                if isinstance(t, torch.Tensor)}  # fmt: skip
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.bytes += t.untyped_storage().nbytes()
        return out


def test_llm_recipe_validation_adds_no_model_sized_memory() -> None:
    transformers = pytest.importorskip("transformers")
    from prunekit.recipes import llm

    config = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 20e6 < model_bytes < 50e6
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 4096, (8, 64))
    text = "name: l\nkind: llm\nmodel: char-llama\nllm: {method: sparsegpt, sparsity: '2:4'}\n"
    recipe = recipes.loads(text, "l.yaml")
    with _NewBytes() as counter:
        model.model.layers[0].mlp.down_proj.weight.abs()  # the counter sees a weight's copy
    assert counter.bytes >= 256 * 688 * 4
    with _NewBytes() as counter:
        llm.check(recipe, model, ids)
    assert counter.bytes < 0.05 * model_bytes, counter.bytes
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_llm_recipe_validation_names_the_llm_line() -> None:
    transformers = pytest.importorskip("transformers")
    from prunekit.recipes import llm

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=36, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    text = "name: l\nkind: llm\nmodel: char-llama\nllm: {method: wanda, sparsity: '4:8'}\n"
    with pytest.raises(RecipeError) as info:
        llm.check(recipes.loads(text, "l.yaml"), model, torch.randint(0, 64, (2, 8)))
    assert str(info.value).startswith("l.yaml:4: llm = 'wanda' fails on the model: layer ")
    with pytest.raises(RecipeError, match="outside the model's vocabulary"):
        llm.check(recipes.loads(text.replace("'4:8'", "0.5")), model, torch.tensor([[70, 1]]))


def test_dry_run_plans_without_touching_the_model() -> None:
    from torch.nn.utils import parametrize

    from prunekit.recipes import pipeline

    text = (
        "name: d\nmodel: {spec: lenet300, kwargs: {in_features: 64}}\ndata: {dataset: digits}\n"
        "prune: {sparsity: 0.9, include_output: true, scope: global}\nschedule: {kind: iterative}\n"
        "materialize: {mode: bake}\nexport: {formats: [csr]}\n"
    )
    run = pipeline.prepare(recipes.loads(text, "d.yaml"), True, Console(file=io.StringIO()))
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    pipeline.dry_run(run)
    assert not any(parametrize.is_parametrized(m) for m in run.model.modules())
    assert all(torch.equal(run.model.state_dict()[k], v) for k, v in before.items())
    dense_fc3 = text.replace("scope: global}", "exclude: [fc3]}")  # fc3 stays dense: no CSR
    run = pipeline.prepare(recipes.loads(dense_fc3, "d.yaml"), True, Console(file=io.StringIO()))
    with pytest.raises(RecipeError) as info:
        pipeline.dry_run(run)
    assert str(info.value).startswith("d.yaml:6: materialize = {'mode': 'bake'")
    assert "layer 'fc3' is 0.0% sparse" in str(info.value)


def test_a_lottery_recipe_prunes_the_classifier_at_half_rate_with_include_output(
    tmp_path: Path,
) -> None:
    text = (
        "name: t\nmodel: {spec: lenet300, kwargs: {in_features: 64}}\ndata: {dataset: digits}\n"
        "train: {epochs: 1}\nprune: {sparsity: 0.75, include_output: true}\n"
        "schedule: {kind: iterative, rounds: 2}\ntiming: {when: before, method: lottery}\n"
    )
    assert recipes.loads(text.replace(", include_output: true", "")).config.include_output is False
    folder = recipes.run(recipes.loads(text, "t.yaml"), out_dir=tmp_path, quick=True,
                         console=Console(file=io.StringIO()))  # fmt: skip
    results = json.loads((folder / "results.json").read_text())
    layers = {r["name"]: r["sparsity"] for r in _section(results, "Cost")["rows"]}
    # two rounds of 1 - 0.25 ** (1 / 2) = 50%; the classifier at 25% (Frankle & Carbin)
    assert layers["fc1"] == pytest.approx(0.75, abs=1e-3)
    assert layers["fc3"] == pytest.approx(1 - 0.75**2, abs=2e-3)
