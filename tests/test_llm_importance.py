"""Width and depth importance of pk.llm against hand computations and brute force."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_llm_shrink import ids, tiny

import prunekit as pk

transformers = pytest.importorskip("transformers")


def norms(*parts: torch.Tensor) -> torch.Tensor:
    """Per-unit L2 norm over parts shaped ``(units, ...)``."""
    return sum(p.flatten(1).square().sum(1) for p in parts).sqrt()


def test_magnitude_is_the_l2_norm_of_every_weight_a_unit_owns() -> None:
    model = tiny("qwen2", layers=2)  # q/k/v biases too
    scores = pk.llm.width_importance(model, method="magnitude")
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    q = torch.cat([attn.q_proj.weight, attn.q_proj.bias[:, None]], 1).unflatten(0, (4, 8))
    heads = norms(q, attn.o_proj.weight.T.unflatten(0, (4, 8)))
    torch.testing.assert_close(scores.heads[1], heads)
    k = torch.cat([attn.k_proj.weight, attn.k_proj.bias[:, None]], 1).unflatten(0, (2, 8))
    v = torch.cat([attn.v_proj.weight, attn.v_proj.bias[:, None]], 1).unflatten(0, (2, 8))
    torch.testing.assert_close(scores.kv_heads[1], norms(k, v) + heads.view(2, 2).sum(1))
    neurons = norms(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight.T)
    torch.testing.assert_close(scores.neurons[1], neurons)
    columns = [
        model.model.embed_tokens.weight.T,
        model.lm_head.weight.T,
        model.model.norm.weight[:, None],
    ]
    for block in model.model.layers:
        a, m = block.self_attn, block.mlp
        columns += [a.q_proj.weight.T, a.k_proj.weight.T, a.v_proj.weight.T, a.o_proj.weight]
        columns += [m.gate_proj.weight.T, m.up_proj.weight.T, m.down_proj.weight]
        columns += [
            block.input_layernorm.weight[:, None],
            block.post_attention_layernorm.weight[:, None],
        ]
    torch.testing.assert_close(scores.hidden, norms(*columns))


def capture(model, modules, x, output=False):
    """Inputs (or outputs) of ``modules`` on one forward of ``x``."""
    seen = []

    def pre(m, args):
        seen.append(args[0].detach())

    def post(m, args, out):
        seen.append(out.detach())

    handles = [
        m.register_forward_hook(post) if output else m.register_forward_pre_hook(pre)
        for m in modules
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def test_activation_is_the_l2_over_samples_of_the_sequence_mean() -> None:
    """Minitron's (batch L2, sequence mean) aggregation, by hand from hooked activations."""
    model = tiny("llama", layers=2)
    x = ids(5, 9)
    scores = pk.llm.width_importance(model, x, method="activation", batch_size=2)
    block = model.model.layers[1]
    (mlp_in,) = capture(model, [block.mlp.down_proj], x)
    torch.testing.assert_close(scores.neurons[1], mlp_in.abs().mean(1).norm(dim=0))
    (heads_in,) = capture(model, [block.self_attn.o_proj], x)
    per_head = heads_in.unflatten(-1, (4, 8)).norm(dim=-1).mean(1).norm(dim=0)
    torch.testing.assert_close(scores.heads[1], per_head)
    torch.testing.assert_close(scores.kv_heads[1], per_head.view(2, 2).sum(1))
    normed = capture(
        model,
        [b.input_layernorm for b in model.model.layers]
        + [b.post_attention_layernorm for b in model.model.layers],
        x,
        output=True,
    )
    hidden = sum(h.abs().mean(1).norm(dim=0) for h in normed)
    torch.testing.assert_close(scores.hidden, hidden)


def test_activation_ignores_padded_positions() -> None:
    """A right-padded batch scores like its rows run unpadded, one by one."""
    model = tiny("llama", layers=2)
    long, short = ids(1, 10, seed=3), ids(1, 6, seed=4)
    padded = torch.cat([long, F.pad(short, (0, 4), value=7)])
    mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4])
    batched = pk.llm.width_importance(model, [{"input_ids": padded, "attention_mask": mask}])
    separate = pk.llm.width_importance(model, [long, short])
    for name in ("heads", "kv_heads", "neurons", "hidden"):
        torch.testing.assert_close(getattr(batched, name), getattr(separate, name))


def test_taylor_is_the_squared_sum_of_weight_times_gradient() -> None:
    model = tiny("llama", layers=2)
    x = ids(3, 8)
    scores = pk.llm.width_importance(model, [x], method="taylor")
    mlp = model.model.layers[0].mlp
    loss = model(x, labels=x).loss
    params = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    grads = torch.autograd.grad(loss, params)
    wg = sum(
        (w * g).flatten(1).sum(1) if i < 2 else (w * g).sum(0)
        for i, (w, g) in enumerate(zip(params, grads, strict=True))
    )
    torch.testing.assert_close(scores.neurons[0], wg.detach().square(), rtol=1e-4, atol=1e-9)
    assert all(p.requires_grad for p in model.parameters()) and all(
        p.grad is None for p in model.parameters()
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_removing_heads_and_neurons_equals_zeroing_their_outputs(arch: str) -> None:
    """Brute force: the shrunk model computes what the full model computes with the removed
    query heads' and neurons' outputs zeroed (no embedding channel removed)."""
    model = tiny(arch, layers=2)
    reference = copy.deepcopy(model)
    result = pk.llm.shrink(model, data=ids(), heads=2, kv_heads=1, intermediate=20)
    with torch.no_grad():
        for i, block in enumerate(reference.model.layers):
            for h in result.removed_heads[i]:
                block.self_attn.o_proj.weight[:, h * 8 : (h + 1) * 8] = 0
            block.mlp.down_proj.weight[:, result.removed_neurons[i]] = 0
            assert len(result.removed_neurons[i]) == 28 and len(result.removed_kv_heads[i]) == 1
            gone = result.removed_kv_heads[i][0]
            assert {2 * gone, 2 * gone + 1} <= set(result.removed_heads[i])
        x = ids(2, 7, seed=9)
        torch.testing.assert_close(model(x).logits, reference(x).logits, atol=1e-5, rtol=0)


def test_the_least_important_units_are_the_ones_removed() -> None:
    model = tiny("llama", layers=2)
    scores = pk.llm.width_importance(model, ids(), method="activation")
    result = pk.llm.shrink(model, data=ids(), intermediate=40, hidden=30)
    for i in range(2):
        lowest = torch.argsort(scores.neurons[i])[:8].sort().values.tolist()
        assert result.removed_neurons[i] == lowest
    assert result.removed_hidden == torch.argsort(scores.hidden)[:2].sort().values.tolist()
