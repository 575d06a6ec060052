"""The memory-lean paths of the one-shot engine give the same bits as the plain ones:
early baking and in-place SparseGPT (``measure_error=False``), the chunked row sort, the
consuming output pass, repeated block arguments held once, the ``where`` mask."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunekit import llm, selection
from prunekit.llm.calibration import calibration_batches
from prunekit.llm.engine import capture_inputs, run_block
from prunekit.llm.sparsegpt import sparsegpt
from prunekit.masks import WeightMask, apply_mask

transformers = pytest.importorskip("transformers")


def ids(samples: int = 6, seq_len: int = 12) -> torch.Tensor:
    return torch.randint(0, 64, (samples, seq_len), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_measure_error_false_prunes_the_same_bits(method: str, sparsity: float | str) -> None:
    measured, lean = tiny_llama(), tiny_llama()
    options = {"method": method, "sparsity": sparsity, "batch_size": 2, "progress": False}
    a = llm.prune(measured, ids(), **options)
    b = llm.prune(lean, ids(), measure_error=False, **options)
    for (name, x), y in zip(measured.state_dict().items(), lean.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert [r.sparsity for r in a.layers] == [r.sparsity for r in b.layers]
    assert all(r.sparsity == pytest.approx(0.5) for r in b.layers)
    assert all(math.isfinite(r.error) for r in a.layers)  # every layer measured
    assert all(math.isnan(r.error) for r in b.layers)  # none measured


def test_measure_error_false_with_keep_masks_keeps_the_masks() -> None:
    kept, lean = tiny_llama(), tiny_llama()
    llm.prune(kept, ids(), method="wanda", sparsity=0.5, progress=False, keep_masks=True)
    llm.prune(
        lean, ids(), method="wanda", sparsity=0.5, progress=False, keep_masks=True,
        measure_error=False,
    )  # fmt: skip
    up = lean.model.layers[1].mlp.up_proj
    assert isinstance(up.parametrizations.weight[0], WeightMask)
    assert torch.equal(up.weight, kept.model.layers[1].mlp.up_proj.weight)


@pytest.mark.parametrize("measure", [True, False])
def test_a_block_weight_tied_outside_the_blocks_ends_plain_and_still_tied(measure: bool) -> None:
    """Baked at the end (the meter) or early: the same plain, tied weights either way."""
    model = tiny_llama(vocab=32)
    model.lm_head.weight = model.model.layers[1].self_attn.o_proj.weight
    ids32 = ids() % 32
    llm.prune(model, ids32, method="wanda", sparsity=0.5, progress=False, measure_error=measure)
    o_proj = model.model.layers[1].self_attn.o_proj
    assert not hasattr(model.lm_head, "parametrizations")
    assert not hasattr(o_proj, "parametrizations")
    assert model.lm_head.weight is o_proj.weight
    assert float((o_proj.weight == 0).float().mean()) == pytest.approx(0.5)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 12),
    chunk=st.integers(1, 40),
    sparsity=st.floats(0, 0.95),
    seed=st.integers(0, 2**16),
)
def test_row_mask_sorted_in_chunks_equals_one_sort(
    rows: int, cols: int, chunk: int, sparsity: float, seed: int
) -> None:
    scores = torch.randint(0, 4, (rows, cols), generator=torch.Generator().manual_seed(seed))
    scores = scores.float()  # many ties: the lower index must go first, chunked or not
    n_prune = round(sparsity * cols)
    order = torch.sort(scores, dim=1, stable=True).indices[:, :n_prune]
    expected = torch.ones(rows, cols, dtype=torch.bool).scatter_(1, order, False)
    original = selection.SORT_CHUNK
    selection.SORT_CHUNK = chunk
    try:
        mask = selection.row_mask(scores, sparsity)
        assert torch.equal(mask, expected)
    finally:
        selection.SORT_CHUNK = original
    assert torch.equal((~mask).sum(1), torch.full((rows,), n_prune))  # n_prune in every row


@pytest.mark.parametrize("target", [0.5, 0.7])
def test_sparsegpt_in_place_gives_the_same_bits_in_the_weights_storage(target: float) -> None:
    torch.manual_seed(0)
    weight, x = torch.randn(24, 40), torch.randn(200, 40)
    hessian = 2 * x.T @ x / 200
    copy_w, copy_keep = sparsegpt(weight, hessian.clone(), target, overwrite=True)
    mine = weight.clone()
    new, keep = sparsegpt(mine, hessian.clone(), target, overwrite=True, in_place=True)
    assert new.data_ptr() == mine.data_ptr()
    assert torch.equal(new, copy_w) and torch.equal(keep, copy_keep)
    half = weight.half()  # not fp32: a working copy, the caller's tensor untouched
    new, _ = sparsegpt(half, hessian.clone(), target, overwrite=True, in_place=True)
    assert new.data_ptr() != half.data_ptr() and torch.equal(half, weight.half())


def test_sparsegpt_overwrite_retries_in_float64_when_the_second_cholesky_fails(monkeypatch):
    """The fp32 Cholesky of ``H^-1`` (the second one) failing: the in-place path retries in
    float64 from the damped ``H``, as the copying one does, with the same bits."""
    torch.manual_seed(0)
    weight, x = torch.randn(24, 40), torch.randn(200, 40)
    hessian = 2 * x.T @ x / 200
    real = torch.linalg.cholesky

    def failing(a, *args, upper=False, **kwargs):
        if upper and a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("not positive-definite")
        return real(a, *args, upper=upper, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky", failing)
    copy_w, copy_keep = sparsegpt(weight, hessian.clone(), 0.5)
    given = hessian.clone()
    new, keep = sparsegpt(weight, given, 0.5, overwrite=True)
    assert torch.equal(new, copy_w) and torch.equal(keep, copy_keep)
    assert not torch.equal(given, hessian)  # it was damped in place


def test_repeated_block_arguments_are_held_once_and_outputs_match_when_consumed() -> None:
    model = tiny_llama().eval()
    blocks = model.model.layers
    with torch.no_grad():
        inputs = capture_inputs(model, blocks[0], calibration_batches(ids(6, 12), model, 2))
        first, later = inputs.kwargs[0], inputs.kwargs[2]
        assert later["position_embeddings"][0] is first["position_embeddings"][0]
        expected = run_block(blocks[0], inputs)
        kept = list(inputs.hidden)
        consumed = run_block(blocks[0], inputs, consume=True)
        assert inputs.hidden == [] and len(kept) == 3
        assert all(torch.equal(a, b) for a, b in zip(expected, consumed, strict=True))
        inputs.hidden = kept
        assert run_block(blocks[0], inputs, keep=False) is None and inputs.hidden == kept


def test_weight_mask_zeroes_non_finite_pruned_entries_and_passes_the_masked_gradient() -> None:
    layer = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
        layer.weight[1, 2] = float("inf")
    keep = torch.ones(3, 4, dtype=torch.bool)
    keep[0, 0] = keep[1, 2] = keep[2, 3] = False
    apply_mask(layer, keep)
    assert layer.weight[~keep].eq(0).all() and torch.isfinite(layer.weight).all()
    layer(torch.ones(2, 4)).sum().backward()
    grad = layer.parametrizations.weight.original.grad
    assert torch.equal(grad != 0, keep)
