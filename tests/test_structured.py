"""Structured pruning: the shrunk model computes what the group-masked model computes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from structured_models import (
    assert_equivalent,
    assert_trains,
    hf_model,
    masked_and_shrunk,
    params,
    randomize_norms,
)
from torch import nn

import prunekit as pk
from prunekit.cost import count_macs
from prunekit.structured import build, plan, score
from prunekit.zoo import MODELS, build_model, example_input
from prunekit.zoo.hf import TRANSFORMERS


@pytest.mark.parametrize("ratio", [0.25, 0.5])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_zoo_models_shrink_exactly(name: str, ratio: float) -> None:
    model = randomize_norms(build_model(name)).eval()
    x = example_input(name, batch_size=2)
    masked, small, decisions = masked_and_shrunk(model, x, ratio)
    assert_equivalent(masked, small, x)
    assert params(small) < params(model)
    assert count_macs(small, x) < count_macs(model, x)
    for d in decisions:  # local scope: floor(ratio * n) groups of every family go
        assert len(d.removed) == min(math.floor(ratio * d.total), d.total - 1)
    assert_trains(small, x)


@pytest.mark.parametrize("ratio", [0.25, 0.5])
@pytest.mark.parametrize("name", sorted(TRANSFORMERS))
def test_transformers_models_shrink_exactly(name: str, ratio: float) -> None:
    torch.manual_seed(0)
    model, inputs = hf_model(name)
    masked, small, _ = masked_and_shrunk(model, inputs, ratio)
    assert_equivalent(masked, small, inputs)
    assert params(small) < params(model)
    assert count_macs(small, inputs) < count_macs(model, inputs)
    assert_trains(small, inputs)


def test_attention_heads_and_config_follow() -> None:
    model, inputs = hf_model("llama-gqa")
    report = pk.shrink(model, inputs, ratio=0.5)
    heads = [f for f in report.families if f.kind == "heads"]
    # grouped-query attention: a group is one key/value head with its 2 query heads
    assert [(f.total, f.kept) for f in heads] == [(4, 2), (4, 2)]
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 4 * attn.head_dim
    assert attn.k_proj.out_features == 2 * attn.head_dim
    assert model.config.num_attention_heads == 4
    assert model.config.num_key_value_heads == 2
    assert model.config.intermediate_size == 32
    assert report.params_after < report.params_before
    assert report.macs_after < report.macs_before


def test_global_scope_ranks_across_families() -> None:
    model = build_model("vgg").eval()
    x = example_input("vgg")
    graph = build(model, x)
    params = dict(model.named_parameters())
    with torch.no_grad():  # 8 tiny channels in the first family: global takes them all
        for group in graph.families[0].groups[:8]:
            for m in group.members:
                if m.name in params:
                    params[m.name].index_fill_(m.dim, m.index, 1e-6)
    decisions = plan(graph, score(model, graph, "l1"), 0.3, scope="global")
    total = sum(d.total for d in decisions)
    assert sum(len(d.removed) for d in decisions) == math.floor(0.3 * total)
    by_name = {d.name: d for d in decisions}
    assert all(d.kept >= 1 for d in decisions)
    local = plan(graph, score(model, graph, "l1"), 0.3, scope="local")
    assert [len(d.removed) for d in decisions] != [len(d.removed) for d in local]
    assert by_name["features.0"].removed == tuple(range(8))


def test_round_to_keeps_multiples() -> None:
    model = build_model("resnet20").eval()
    report = pk.shrink(model, example_input("resnet20"), ratio=0.4, round_to=8)
    for fam in report.families:
        assert fam.kept % 8 == 0 or fam.kept == fam.total
    assert model.conv1.out_channels % 8 == 0


def test_per_family_ratios_and_ignore() -> None:
    model = build_model("vgg").eval()
    x = example_input("vgg")
    report = pk.shrink(model, x, ratio={"features.4": 0.5}, ignore=["features.0"])
    kept = {f.name: (f.kept, f.total) for f in report.families}
    assert kept == {"features.4": (16, 32), "features.8": (64, 64)}
    assert model.features[0].out_channels == 16


@pytest.mark.parametrize("ignore", ["features.0", nn.Conv2d], ids=["name", "type"])
def test_ignore_takes_one_name_or_type_as_a_list_of_one(ignore: object) -> None:
    """``ignore="features.0"`` is that module (not its letters), ``ignore=nn.Conv2d`` that type."""
    x = example_input("vgg")
    alone, listed = (torch.manual_seed(0) and build_model("vgg").eval() for _ in range(2))
    one = pk.shrink(alone, x, ratio=0.5, ignore=ignore)  # type: ignore[arg-type]
    assert one.families == pk.shrink(listed, x, ratio=0.5, ignore=[ignore]).families


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm", "lamp", "random", "bn_scale"])
def test_every_criterion_shrinks_exactly(criterion: str) -> None:
    model = randomize_norms(build_model("resnet20", blocks_per_stage=1)).eval()
    x = example_input("resnet20", 2)
    masked, small, decisions = masked_and_shrunk(model, x, 0.5, criterion)
    assert_equivalent(masked, small, x)
    assert any(d.removed for d in decisions)


def test_bn_scale_removes_the_smallest_gammas() -> None:
    model = randomize_norms(build_model("vgg")).eval()
    with torch.no_grad():
        model.features[1].weight[[3, 7, 11]] = 1e-4
    x = example_input("vgg")
    graph = build(model, x)
    first = plan(graph, score(model, graph, "bn_scale"), 3 / 16)[0]
    assert first.name == "features.0" and first.removed == (3, 7, 11)


def test_taylor_uses_data_and_custom_criteria_are_callables() -> None:
    model = build_model("lenet300").eval()
    x, y = torch.randn(8, 784), torch.randint(0, 10, (8,))
    with pytest.raises(pk.MissingDataError, match="taylor"):
        pk.shrink(copy.deepcopy(model), x, ratio=0.5, criterion="taylor")
    report = pk.shrink(copy.deepcopy(model), x, ratio=0.5, criterion="taylor", data=[(x, y)])
    assert [f.kept for f in report.families] == [150, 50]
    # custom: the same function contract as masks, f(weight) -> scores summed per group
    custom = pk.shrink(model, x, ratio=0.5, criterion=lambda w: w.abs())
    assert [f.kept for f in custom.families] == [150, 50]


def test_mask_then_shrink() -> None:
    """Prune filters with masks (e.g. while fine-tuning), then remove them physically."""
    model = randomize_norms(build_model("vgg")).eval()
    x = example_input("vgg", 2)
    pk.prune(model, 0.5, granularity="filter", criterion="l2", layers=["features.0"])
    group_masked = copy.deepcopy(model)
    pk.bake(group_masked)
    report = pk.shrink(model, x, ratio=None)
    assert model.features[0].out_channels == 8
    assert report.families[0].kept == 8
    # the BatchNorm shift of a removed channel goes too: zero it to compare
    dead = (group_masked.features[0].weight.flatten(1).abs().sum(1) == 0).nonzero().flatten()
    with torch.no_grad():
        group_masked.features[1].bias[dead] = 0
        group_masked.features[1].weight[dead] = 0
    assert_equivalent(group_masked, model, x)


def test_depthwise_multiplier_and_grouped_convs() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 16, 3, padding=1, groups=8),  # depthwise, multiplier 2
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 1, groups=4),  # grouped
        nn.ReLU(),
        nn.Conv2d(16, 4, 1),
    )
    randomize_norms(model).eval()
    x = torch.randn(2, 3, 8, 8)
    masked, small, _ = masked_and_shrunk(model, x, 0.5)
    assert_equivalent(masked, small, x)
    assert small[1].groups == small[1].in_channels == 4
    assert small[1].out_channels == 8
    assert small[4].groups == 4 and small[4].in_channels == 8


def test_tied_embeddings_stay_tied() -> None:
    model, inputs = hf_model("gpt2")
    graph = build(model, inputs)
    # the tied embedding / LM head dimension is the residual stream: never removable
    assert all("wte" not in m.name for g in graph.groups() for m in g.members)
    pk.shrink(model, inputs, ratio=0.5)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_rnn_is_kept_whole() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 8)
            self.rnn = nn.GRU(8, 8, batch_first=True)
            self.fc = nn.Linear(8, 6)
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            y, _ = self.rnn(torch.relu(self.inp(x)))
            return self.out(torch.relu(self.fc(y)))

    model = Net().eval()
    x = torch.randn(2, 5, 4)
    masked, small, decisions = masked_and_shrunk(model, x, 0.5)
    assert [d.name for d in decisions] == ["fc"]  # the GRU's input channels stay
    assert_equivalent(masked, small, x)


def test_llm_heads_and_neurons_by_taylor() -> None:
    """Structured LLM pruning: whole GQA head groups and MLP neurons, ranked by the loss."""
    model, inputs = hf_model("llama-gqa")
    batch = {**inputs, "labels": inputs["input_ids"]}
    report = pk.shrink(
        model, inputs, ratio=0.5, criterion="taylor",
        data=[(batch, None)], loss_fn=lambda out, _: out.loss,
    )  # fmt: skip
    assert {f.kind for f in report.families} == {"heads", "channels"}
    assert model.config.num_key_value_heads == 2 and model.config.intermediate_size == 32


class AttentionBlock(nn.Module):
    """Self-attention and an MLP: ``nn.MultiheadAttention`` runs a fused kernel when no
    gradient is needed, which ``FlopCounterMode`` cannot see into."""

    def __init__(self, d: int = 32, heads: int = 4, classes: int = 5) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(x + self.fc2(torch.relu(self.fc1(x))))


def attention_block_macs(batch: int, length: int, d: int, inner: int, mlp: int) -> int:
    """Analytic MACs of :class:`AttentionBlock`: projections per token (q, k, v to
    ``inner`` wide, out back to ``d``), ``Q K^T`` and ``A V`` per sequence
    (``length^2 * inner`` each), the MLP and the 5-class head per token."""
    tokens = batch * length
    projections = tokens * (3 * d * inner + inner * d + 2 * d * mlp + d * 5)
    return projections + batch * length * length * 2 * inner


def test_macs_before_and_after_come_from_one_counter() -> None:
    torch.manual_seed(0)
    model, x = AttentionBlock().eval(), torch.randn(2, 10, 32)
    dense = copy.deepcopy(model)
    report = pk.shrink(model, x, ratio=0.5)  # 4 heads -> 2 (inner 32 -> 16), MLP 128 -> 64
    assert model.attn.num_heads == 2
    before = attention_block_macs(2, 10, 32, inner=32, mlp=128)
    after = attention_block_macs(2, 10, 32, inner=16, mlp=64)
    assert report.macs_before == count_macs(dense, x) == before
    assert report.macs_after == count_macs(model, x) == after
    assert report.macs_ratio == after / before
    for grad in (False, True):  # fused kernel (no grad) or not: counted the same
        with torch.set_grad_enabled(grad):
            assert count_macs(dense, x) == before


def test_fused_attention_is_counted_on_every_kernel() -> None:
    """``scaled_dot_product_attention`` costs ``B * Hq * Lq * Lk * (E + Ev)`` MACs (grouped
    keys and values included), as its explicit matmuls do."""

    class Fused(nn.Module):
        def forward(self, q, k, v):
            return nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    class Explicit(nn.Module):
        def forward(self, q, k, v):
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            return torch.softmax(q @ k.transpose(-1, -2), -1) @ v

    q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 6)
    expected = 2 * 4 * 10 * 7 * (8 + 6)
    assert count_macs(Fused(), (q, k, v)) == count_macs(Explicit(), (q, k, v)) == expected


def test_global_normalize_mean_none_and_auto() -> None:
    """Global scope is one ranking; normalize says whether family scores are divided by
    their mean first ("mean", the default for l1/l2) or ranked raw ("none", as pk.prune)."""
    model = build_model("vgg").eval()
    x = example_input("vgg")
    graph = build(model, x)
    scores = score(model, graph, "l1")
    raw = plan(graph, scores, 0.3, scope="global", normalize="none")
    pooled = sorted((float(v), f.name, i) for f in graph.families
                    for i, v in enumerate(scores[f.name].tolist()))  # fmt: skip
    cut = {(name, i) for _, name, i in pooled[: math.floor(0.3 * len(pooled))]}
    assert {(d.name, i) for d in raw for i in d.removed} == cut  # no family hits its floor here
    mean = plan(graph, scores, 0.3, scope="global", normalize="mean")
    assert [d.removed for d in mean] != [d.removed for d in raw]
    auto = pk.shrink(copy.deepcopy(model), x, 0.3, scope="global", criterion="l1")
    assert [f.kept for f in auto.families] == [d.kept for d in mean]
    lamp = pk.shrink(copy.deepcopy(model), x, 0.3, scope="global", criterion="lamp")
    lamp_scores = score(model, graph, "lamp")
    none = plan(graph, lamp_scores, 0.3, scope="global", normalize="none")
    assert [f.kept for f in lamp.families] == [d.kept for d in none]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(pk.UnknownChoiceError, match="normalize"):
        pk.shrink(model, x, 0.3, scope="global", normalize="max")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
