"""Depth importance of pk.llm: Block Influence, angular distance, loss when dropped."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_llm_shrink import ids, tiny

import prunekit as pk
from prunekit.errors import PruningError, UnknownChoiceError

transformers = pytest.importorskip("transformers")


def boundary_states(model, x):
    """x_0 .. x_{L-1}: the input of every block (transformers' hidden_states without the
    last, which has the final norm applied)."""
    with torch.no_grad():
        return model(x, output_hidden_states=True).hidden_states[:-1]


def identity(model, index: int) -> None:
    """Make block ``index`` return its input: zero what it writes to the residual stream."""
    block = model.model.layers[index]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()


def test_block_influence_is_one_minus_the_mean_token_cosine() -> None:
    model = tiny("llama", layers=4)
    x = ids(3, 10)
    bi = pk.llm.block_influence(model, x, batch_size=2)
    states = boundary_states(model, x)
    for layer in range(3):
        cos = F.cosine_similarity(states[layer], states[layer + 1], dim=-1)
        assert float(bi[layer]) == pytest.approx(1 - float(cos.mean()), abs=1e-6)
    assert bi.shape == (4,)


def test_angular_distance_uses_the_last_real_token() -> None:
    model = tiny("llama", layers=4)
    x = ids(2, 8)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    d = pk.llm.angular_distance(model, [{"input_ids": x, "attention_mask": mask}], n=2)
    assert d.shape == (3,)
    with torch.no_grad():
        states = model(x, attention_mask=mask, output_hidden_states=True).hidden_states
    for start in range(2):  # x_{start + 2} is a block input (not the normed last state)
        a, b = states[start], states[start + 2]
        cos = torch.stack(
            [F.cosine_similarity(a[0, 7], b[0, 7], 0), F.cosine_similarity(a[1, 4], b[1, 4], 0)]
        )
        want = (torch.arccos(cos.clamp(-1, 1)) / math.pi).mean()
        assert float(d[start]) == pytest.approx(float(want), abs=1e-5)


@pytest.mark.parametrize("method", ["bi", "angular"])
def test_similarity_criteria_drop_a_block_that_does_nothing(method: str) -> None:
    model = tiny("llama", layers=4)
    identity(model, 2)
    assert pk.llm.choose_layers(model, 1, ids(), method=method) == (2,)
    assert float(pk.llm.block_influence(model, ids())[2]) == pytest.approx(0, abs=1e-6)


def test_loss_criterion_drops_the_blocks_whose_removal_costs_least() -> None:
    """(A random model may even improve without a block: the least increase is chosen.)"""
    model = tiny("llama", layers=4)
    identity(model, 2)
    increase = pk.llm.drop_loss(model, ids())
    assert float(increase[2]) == pytest.approx(0, abs=1e-6)
    chosen = pk.llm.choose_layers(model, 2, ids(), method="loss")
    assert chosen == tuple(sorted(torch.argsort(increase)[:2].tolist()))


def test_angular_picks_the_contiguous_run_with_the_least_distance() -> None:
    model = tiny("llama", layers=5)
    identity(model, 1)
    identity(model, 2)
    assert pk.llm.choose_layers(model, 2, ids(), method="angular") == (1, 2)


def test_drop_loss_is_the_loss_increase_with_the_block_skipped() -> None:
    model = tiny("gpt2", layers=3)
    x = ids(2, 9)
    increase = pk.llm.drop_loss(model, x)
    with torch.no_grad():
        base = float(model(x, labels=x).loss)
        pk.llm.drop_layers(model, [1])
        without = float(model(x, labels=x).loss)
    assert float(increase[1]) == pytest.approx(without - base, abs=1e-5)


def test_depth_errors() -> None:
    model = tiny("llama", layers=3)
    with pytest.raises(UnknownChoiceError, match="depth importance"):
        pk.llm.choose_layers(model, 1, ids(), method="cosine")
    with pytest.raises(PruningError, match=r"n=4 is not an int 1\.\.3"):
        pk.llm.angular_distance(model, ids(), n=4)
    with pytest.raises(PruningError, match="leaving at least one"):
        pk.llm.drop_layers(model, [0, 1, 2])
    assert len(model.model.layers) == 3


def test_gpt2_scaled_by_layer_index_refuses_depth_pruning() -> None:
    model = tiny("gpt2", layers=3)
    model.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(pk.errors.IncompatibleLayerError, match="scale_attn_by_inverse_layer_idx"):
        pk.llm.drop_layers(model, [1])
    assert len(model.transformer.h) == 3
