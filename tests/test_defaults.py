"""One set of safe defaults (issue 14, item 3): the output layer and the embeddings stay
dense unless ``include_output`` / ``include_embeddings``, the same in ``pk.prune``, the
Pruner, ``pk.sparsity`` and recipes, with one scope default (local) and reports that say
what they count."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import assert_unchanged, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit as pk
from prunekit import recipes
from prunekit.errors import NoLayersError, PruningError
from prunekit.masks import get_mask
from prunekit.recipes import plans
from prunekit.zoo import LeNet300100

OUTPUT = "output layer; include_output=True prunes it"
EMBEDDING = "embedding; include_embeddings=True prunes it"


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 8)
    )


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv2(torch.relu(self.conv1(x))).mean((2, 3)))


class Tagger(nn.Module):
    """Token embedding, a hidden layer and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.hidden = nn.Embedding(50, 16), nn.Linear(16, 16)
        self.out = nn.Linear(16, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(self.embed(ids))))


def zeros(module: nn.Module) -> int:
    return int((module.weight == 0).sum())


def plain(text: object) -> str:
    return " ".join(str(text).split())


def test_the_classifier_of_an_mlp_stays_dense_and_the_others_are_exact() -> None:
    model = mlp()
    head = model[4].weight.detach().clone()
    report = pk.prune(model, 0.5)
    assert [r.name for r in report.layers] == ["0", "2"]
    assert zeros(model[0]) == 32 * 64 // 2 and zeros(model[2]) == 64 * 16 // 2
    assert get_mask(model[4]) is None and torch.equal(model[4].weight, head)
    assert report.skipped == [("4", OUTPUT)] and report.skipped_numel == 16 * 8
    assert report.sparsity == 0.5  # over the layers it counts
    assert f"not counted: 4 ({OUTPUT})" in plain(report)


def test_include_output_prunes_the_classifier_too() -> None:
    model = mlp()
    report = pk.prune(model, 0.5, include_output=True)
    assert [r.name for r in report.layers] == ["0", "2", "4"] and report.skipped == []
    assert zeros(model[4]) == 16 * 8 // 2
    assert "not counted" not in str(report)


def test_the_fc_of_a_cnn_stays_dense_under_structured_pruning_too() -> None:
    model = CNN()
    report = pk.prune(model, 0.5, granularity="filter", criterion="l2")
    assert [r.name for r in report.layers] == ["conv1", "conv2"]
    assert int((model.conv1.weight.flatten(1) == 0).all(1).sum()) == 4
    assert int((model.conv2.weight.flatten(1) == 0).all(1).sum()) == 8
    assert get_mask(model.fc) is None and dict(report.skipped) == {"fc": OUTPUT}


def test_embeddings_stay_dense_unless_included() -> None:
    model = Tagger()
    report = pk.prune(model, 0.5)
    assert [r.name for r in report.layers] == ["hidden"]
    assert dict(report.skipped) == {"embed": EMBEDDING, "out": OUTPUT}
    assert get_mask(model.embed) is None and get_mask(model.out) is None
    report = pk.prune(Tagger(), 0.5, include_embeddings=True)
    assert [r.name for r in report.layers] == ["embed", "hidden"]
    both = Tagger()
    pk.prune(both, 0.5, include_embeddings=True, include_output=True)
    assert zeros(both.embed) == 50 * 16 // 2 and zeros(both.out) == 16 * 5 // 2


def tiny_llama(tie: bool) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_a_causal_lm_keeps_embed_tokens_and_lm_head_dense(tie: bool) -> None:
    model = tiny_llama(tie)
    report = pk.prune(model, 0.5)
    blocks = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    assert [r.name for r in report.layers] == blocks
    assert all(r.after == 0.5 for r in report.layers)
    assert [n for n, _ in report.skipped] == ["model.embed_tokens", "lm_head"]
    assert get_mask(model.lm_head) is None and get_mask(model.model.embed_tokens) is None
    assert zeros(model.lm_head) == 0 and zeros(model.model.embed_tokens) == 0
    counted = pk.sparsity(model)
    assert [r.name for r in counted.layers] == blocks and counted.total == 0.5
    assert list(counted.skipped) == ["model.embed_tokens", "lm_head"]


def test_a_tied_lm_head_is_pruned_only_with_both_flags() -> None:
    model = tiny_llama(tie=True)
    report = pk.prune(model, 0.5, include_output=True)  # the tensor is also the embedding
    reason = dict(report.skipped)["lm_head"]
    assert "tied to embedding 'model.embed_tokens'" in reason
    assert "include_embeddings=True and include_output=True prune it" in reason
    assert get_mask(model.lm_head) is None
    untied = tiny_llama(tie=False)
    pk.prune(untied, 0.5, include_output=True)
    assert zeros(untied.lm_head) == 64 * 16 // 2 and get_mask(untied.model.embed_tokens) is None


def test_pk_sparsity_agrees_with_the_llm_report() -> None:
    model = tiny_llama(tie=False)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    report = pk.llm.prune(model, ids, sparsity=0.5, method="magnitude", progress=False)
    counted = pk.sparsity(model)
    assert counted.numel == report.numel and counted.total == pytest.approx(report.sparsity)
    assert "the embeddings and the output layer are not pruned nor counted" in report.summary()


def test_pruner_and_prune_give_the_same_masks_with_the_same_defaults() -> None:
    spec = pk.PruneSpec(granularity="row", criterion="l1")
    for settings_ in ({}, {"spec": spec}, {"scope": "global"}):
        a, b = mlp(), mlp()
        pruner = pk.Pruner(a, 0.6, **settings_)
        assert pruner.spec.scope == settings_.get("scope", "local")  # no other default
        pruner.step()
        pk.prune(b, 0.6, **settings_)
        for x, y in zip(a, b, strict=True):
            mx, my = get_mask(x), get_mask(y)
            assert (mx is None and my is None) or torch.equal(mx, my)
        assert get_mask(a[4]) is None


@pytest.mark.parametrize(
    ("build", "layers", "message"),
    [
        (mlp, ["4"], r"layer '4' is kept dense by default as the output layer; "
                     r"Fix: include_output=True"),
        (Tagger, nn.Embedding, r"layer 'embed' is kept dense by default as an embedding; "
                               r"Fix: include_embeddings=True"),
    ],
)  # fmt: skip
def test_explicit_layers_that_are_all_kept_dense_are_an_error(build, layers, message) -> None:
    model = build()
    pk.prune(model, 0.3, include_output=True, include_embeddings=True)
    before = snapshot(model)
    with pytest.raises(NoLayersError, match=message):
        pk.prune(model, 0.5, layers=layers)
    with pytest.raises(NoLayersError, match=message):
        pk.Pruner(model, 0.5, layers=layers)
    assert_unchanged(model, before)


def test_explicit_layers_with_some_kept_dense_prune_the_others_and_say_so() -> None:
    model = mlp()
    report = pk.prune(model, 0.5, layers=["2", "4"])
    assert [r.name for r in report.layers] == ["2"] and report.skipped == [("4", OUTPUT)]
    report = pk.prune(mlp(), 0.5, layers=["2", "4"], include_output=True)
    assert [r.name for r in report.layers] == ["2", "4"]


@pytest.mark.parametrize("flag", ["include_output", "include_embeddings"])
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_the_flags_are_booleans(flag: str, value: object) -> None:
    model = mlp()
    pk.prune(model, 0.3)
    before = snapshot(model)
    pattern = rf"{flag}={value!r} is not true or false; Fix: pass true \| false"
    with pytest.raises(PruningError, match=pattern):
        pk.prune(model, 0.5, **{flag: value})
    with pytest.raises(PruningError, match=pattern):
        pk.Pruner(model, 0.5, **{flag: value})
    with pytest.raises(PruningError, match=pattern):
        pk.sparsity(model, **{flag: value})
    assert_unchanged(model, before)


def test_pk_sparsity_states_what_it_counts() -> None:
    model = Tagger()
    pk.prune(model, 0.5, include_output=True, include_embeddings=True)
    counted = pk.sparsity(model)
    assert [r.name for r in counted.layers] == ["hidden"] and counted.total == 0.5
    assert counted.skipped == {"embed": EMBEDDING, "out": OUTPUT}
    assert f"not counted: embed ({EMBEDDING}), out ({OUTPUT})" in plain(render(counted))
    every = pk.sparsity(model, include_output=True, include_embeddings=True)
    assert [r.name for r in every.layers] == ["embed", "hidden", "out"] and every.total == 0.5
    assert every.skipped == {} and "not counted" not in render(every)


def render(report: object) -> str:
    from rich.console import Console

    console = Console(width=200, color_system=None, record=True)
    with console.capture() as capture:
        console.print(report)
    return capture.get()


@settings(max_examples=20, deadline=None)
@given(
    widths=st.lists(st.integers(2, 12), min_size=3, max_size=7),
    sparsity=st.floats(0.05, 0.95),
    scope=st.sampled_from(["local", "global"]),
)
def test_the_last_layer_of_any_mlp_is_never_masked_by_default(widths, sparsity, scope) -> None:
    layers = [nn.Linear(a, b) for a, b in itertools.pairwise(widths)]
    model = nn.Sequential(*layers)
    report = pk.prune(model, sparsity, scope=scope)
    assert get_mask(layers[-1]) is None and zeros(layers[-1]) == 0
    assert all(get_mask(layer) is not None for layer in layers[:-1])
    assert report.skipped == [(str(len(layers) - 1), OUTPUT)]


def test_a_single_layer_model_has_no_separate_output_layer() -> None:
    layer = nn.Linear(8, 4)
    assert pk.prune(layer, 0.5).skipped == [] and zeros(layer) == 16


def test_an_allocation_naming_the_output_layer_prunes_the_others() -> None:
    model = mlp()
    report = pk.prune(model, allocation={"0": 0.25, "2": 0.5, "4": 0.75})
    assert [(r.name, r.after) for r in report.layers] == [("0", 0.25), ("2", 0.5)]
    assert get_mask(model[4]) is None and report.skipped == [("4", OUTPUT)]


def test_a_layer_tied_to_the_output_layer_stays_dense_with_it() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    model[0].weight = model[2].weight
    report = pk.prune(model, 0.5)
    assert [r.name for r in report.layers] == ["1"]
    assert dict(report.skipped)["0"].startswith("layer tied to output layer '2'")


def _recipe(extra: str) -> recipes.Recipe:
    return recipes.loads(
        "name: d\nmodel: {spec: lenet300, kwargs: {in_features: 64}}\ntrain: {epochs: 0}\n"
        f"finetune: {{epochs: 0}}\nprune: {{sparsity: 0.5{extra}}}\n",
        "d.yaml",
    )


def test_recipes_take_the_same_defaults_and_flags() -> None:
    model = LeNet300100(in_features=64)
    default = plans.prune_plan(_recipe(""), model, None, None)
    assert [ly.name for ly in default.layers] == ["fc1", "fc2"]
    assert default.spec.scope == "local" and dict(default.skipped) == {"fc3": OUTPUT}
    every = plans.prune_plan(_recipe(", include_output: true"), model, None, None)
    assert [ly.name for ly in every.layers] == ["fc1", "fc2", "fc3"]
    with pytest.raises(pk.errors.RecipeError, match=r"d.yaml:5: prune.include_output = 'no'"):
        _recipe(", include_output: 'no'")
