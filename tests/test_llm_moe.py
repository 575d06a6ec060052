"""Fused MoE experts (issue 15, item 3): each expert of a transformers-5 Mixtral /
Qwen2-MoE block is pruned on the tokens routed to it, reaches the target, and an expert
that got no token falls back to magnitude and is reported."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from prunekit import llm
from prunekit.criteria.activation import wanda_scores
from prunekit.inputs import pad
from prunekit.llm.calibration import calibration_batches
from prunekit.llm.engine import capture_inputs, sequential
from prunekit.llm.experts import find_experts
from prunekit.selection import row_mask

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, EXPERTS = 64, 4


def tiny_moe(arch: str) -> nn.Module:
    torch.manual_seed(0)
    moe = {
        "mixtral": {"num_local_experts": EXPERTS},
        "qwen2_moe": {"num_experts": EXPERTS, "moe_intermediate_size": 32,
                      "shared_expert_intermediate_size": 48},
    }[arch]  # fmt: skip
    config = transformers.AutoConfig.for_model(
        arch, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, num_hidden_layers=2, num_experts_per_tok=2, **moe,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config)


def ids(samples: int = 4, seq_len: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (samples, seq_len), generator=torch.Generator().manual_seed(0))


def expert_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        key: param[e].detach().clone()
        for i, block in enumerate(model.model.layers)
        for ex in find_experts(block, f"model.layers.{i}")
        for key, param, e in ex.matrices()
    }


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_expert_reaches_the_target(arch: str, method: str) -> None:
    model = tiny_moe(arch)
    report = llm.prune(model, ids(), method=method, sparsity=0.5, progress=False)
    weights = expert_weights(model)
    assert len(weights) == 2 * 2 * EXPERTS  # 2 blocks x (gate_up, down) x experts
    for key, w in weights.items():
        assert (w == 0).sum().item() == w.numel() // 2, key
    records = {r.name: r for r in report.layers}
    assert all(records[k].sparsity == 0.5 and 0 <= records[k].error < 1 for k in weights)
    assert report.sparsity == 0.5 and not report.notes
    assert report.skipped == [(f"model.layers.{i}.mlp.gate.weight", report.skipped[i][1])
                              for i in range(2)]  # fmt: skip  # the routers stay dense
    for block in report.blocks:
        assert block.sparsity == 0.5 and "mlp.gate.weight" in block.dense
        assert block.pruned_numel + sum(
            p.numel() for n, p in model.get_submodule(block.name).named_parameters()
            if n in block.dense
        ) == block.numel  # fmt: skip
    assert "mlp.experts.down_proj" not in str(report.skipped)


def test_two_four_on_every_expert() -> None:
    model = tiny_moe("mixtral")
    llm.prune(model, ids(), method="sparsegpt", sparsity="2:4", progress=False)
    for key, w in expert_weights(model).items():
        assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all(), key


def routed_reference(model: nn.Module, calibration: torch.Tensor) -> dict[str, torch.Tensor]:
    """Brute force, token by token: ||X_j|| of every expert matrix over the tokens the
    router sent to it, in full forwards of the dense model."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def pre(module: nn.Module, args: tuple) -> None:
            hidden, index = args[0], args[1]
            for t in range(hidden.shape[0]):
                for e in index[t].tolist():
                    x = hidden[t]
                    gate, up = F.linear(x, module.gate_up_proj[e]).chunk(2)
                    h = module.act_fn(gate) * up
                    for param, v in (("gate_up_proj", x), ("down_proj", h)):
                        key = f"{name}.{param}.{e}"
                        sums[key] = sums.get(key, 0) + v.double().square()

        return pre

    handles = [
        ex.module.register_forward_pre_hook(hook(ex.name))
        for i, block in enumerate(model.model.layers)
        for ex in find_experts(block, f"model.layers.{i}")
    ]
    with torch.no_grad():
        model(input_ids=calibration)
    for handle in handles:
        handle.remove()
    return {k: v.sqrt().float() for k, v in sums.items()}


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_wanda_statistics_per_expert_equal_a_brute_force_reference(arch: str) -> None:
    model = tiny_moe(arch).eval()
    calibration = ids()
    reference = routed_reference(model, calibration)
    found: dict[str, torch.Tensor] = {}

    def visit(index: int, layers: list, stats: dict) -> bool:  # statistics only: no pruning
        found.update({k: st.norms.norms for k, st in stats.items() if ".experts." in k})
        return False

    with torch.no_grad():
        inputs = capture_inputs(
            model, model.model.layers[0], calibration_batches(calibration, model, 4)
        )
        norms = frozenset({"norms"})
        layers = model.model.layers
        sequential(layers, "model.layers", inputs, visit, needs=norms, description="",
                   progress=False, measure=False)  # fmt: skip
    assert len(found) == 2 * 2 * EXPERTS and found.keys() >= reference.keys()
    for key, norms in found.items():
        expected = reference.get(key, torch.zeros_like(norms))
        torch.testing.assert_close(norms, expected, rtol=1e-5, atol=1e-6, msg=key)
    pruned = copy.deepcopy(model)
    llm.prune(pruned, calibration, method="wanda", sparsity=0.5, batch_size=4, progress=False)
    dense, after = expert_weights(model), expert_weights(pruned)
    for key in expert_weights(model):
        if key.startswith("model.layers.0."):  # block 0 sees the dense model's tokens
            keep = row_mask(wanda_scores(dense[key], found[key]), 0.5)
            assert torch.equal(after[key] != 0, keep), key


def test_expert_without_tokens_falls_back_to_magnitude_and_is_reported() -> None:
    model = tiny_moe("mixtral")

    def never_three(module: nn.Module, args: tuple) -> tuple:  # the router never picks 3
        hidden, index, weights = args
        return hidden, index.masked_fill(index == 3, 0), weights

    for block in model.model.layers:
        block.mlp.experts.register_forward_pre_hook(never_three)
    dense = expert_weights(model)
    report = llm.prune(model, ids(), method="wanda", sparsity=0.5, progress=False)
    fallen = [name for name, _ in report.notes]
    assert fallen == [f"model.layers.{i}.mlp.experts.{p}.3" for i in range(2)
                      for p in ("gate_up_proj", "down_proj")]  # fmt: skip
    assert all("no calibration token" in note and "magnitude" in note for _, note in report.notes)
    for key in fallen:
        w, d = expert_weights(model)[key], dense[key]
        threshold = d.abs().flatten().sort().values[d.numel() // 2 - 1]
        assert torch.equal(w != 0, d.abs() > threshold), key  # layer-wide magnitude


def test_padded_calibration_gives_identical_expert_masks() -> None:
    model = tiny_moe("mixtral")
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (10, 6, 3)]
    masks = []
    for calibration in ([torch.tensor([r]) for r in rows], [pad(rows, "left")], [pad(rows)]):
        pruned = copy.deepcopy(model)
        llm.prune(pruned, calibration, method="wanda", progress=False)
        masks.append({k: w != 0 for k, w in expert_weights(pruned).items()})
    for other in masks[1:]:
        assert all(torch.equal(other[k], masks[0][k]) for k in masks[0])


def test_nan_expert_is_refused_before_anything_changes() -> None:
    from conftest import assert_unchanged, snapshot

    from prunekit.errors import InvalidWeightError

    model = tiny_moe("mixtral")
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[2, 0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(InvalidWeightError, match=r"'model.layers.1.mlp.experts.down_proj'"):
        llm.prune(model, ids(), method="wanda", progress=False)
    assert_unchanged(model, before)


def test_report_lists_pruned_and_dense_parameters_per_block() -> None:
    report = llm.prune(tiny_moe("qwen2_moe"), ids(), method="wanda", progress=False)
    table = report.block_table()
    assert [c.header for c in table.columns] == [
        "block", "pruned tensors", "sparsity", "share of block", "left dense"
    ]  # fmt: skip
    block = report.blocks[0]
    assert block.pruned == ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                            "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                            "mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                            "mlp.shared_expert.gate_proj.weight",
                            "mlp.shared_expert.up_proj.weight",
                            "mlp.shared_expert.down_proj.weight",
                            "mlp.shared_expert_gate.weight")  # fmt: skip
    assert block.dense == ("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                           "self_attn.v_proj.bias", "mlp.gate.weight",
                           "input_layernorm.weight", "post_attention_layernorm.weight")  # fmt: skip
    assert 0.98 < block.share < 1 and f"{report.share:.1%} of the block" in report.summary()
