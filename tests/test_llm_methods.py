"""Per-layer math of the LLM methods: Wanda closed form, SparseGPT, OWL, reconstruction order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit import llm
from prunekit.criteria.activation import wanda_scores
from prunekit.criteria.second_order import HessianAccumulator
from prunekit.errors import InvalidSparsityError
from prunekit.granularity import NM
from prunekit.llm.engine import LayerStats
from prunekit.llm.methods import take_hessian
from prunekit.llm.owl import outlier_ratio, owl_sparsities
from prunekit.llm.sparsegpt import sparsegpt
from prunekit.masks import get_mask as _get_mask
from prunekit.selection import row_mask as wanda_row_mask


def get_mask(module: nn.Module) -> torch.Tensor:
    """The module's keep-mask as bool (``masks.get_mask`` hands back 0/1 uint8)."""
    return _get_mask(module).bool()


class OneLinear(nn.Module):
    """Embedding -> a ModuleList holding one block with one Linear: the smallest LLM shape."""

    def __init__(self, vocab: int = 40, width: int = 16, out: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(width, out))])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for block in self.layers:
            hidden = block(hidden)
        return hidden

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed


def correlated_inputs(tokens: int, width: int, seed: int = 0) -> torch.Tensor:
    """Rows with correlated features and very different per-feature scales."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=gen) / width**0.5
    scale = torch.logspace(-1, 1, width)[torch.randperm(width, generator=gen)]
    base = torch.randn(tokens, width, generator=gen)
    return (base + 0.8 * base @ mix) * scale


def reconstruction_error(w: torch.Tensor, w_new: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - w_new) @ x.T).norm() / (w @ x.T).norm())


def test_wanda_equals_closed_form_on_one_linear() -> None:
    torch.manual_seed(0)
    model = OneLinear()
    ids = torch.randint(0, 40, (6, 10))
    report = llm.prune(model, ids, method="wanda", sparsity=0.5, progress=False, keep_masks=True)
    linear = model.layers[0][0]
    x = model.embed(ids).reshape(-1, 16).detach()
    scores = linear.parametrizations.weight.original.detach().abs() * x.square().sum(0).sqrt()
    expected = torch.ones(12, 16, dtype=torch.bool)
    for row in range(12):
        expected[row, scores[row].argsort()[:8]] = False
    assert torch.equal(get_mask(linear), expected)
    assert (get_mask(linear).sum(1) == 8).all()  # exactly the target per output row
    dense = linear.parametrizations.weight.original.detach()
    error = ((dense - linear.weight.detach()) @ x.T).square().sum() / (dense @ x.T).square().sum()
    assert report.layers[0].error == pytest.approx(float(error), rel=1e-5)


def test_wanda_criterion_in_pk_prune_gives_the_nm_closed_form() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 6)
    x = correlated_inputs(50, 16)
    pk.prune(layer, granularity="2:4", criterion="wanda", data=[x])
    scores = layer.parametrizations.weight.original.detach().abs() * x.square().sum(0).sqrt()
    keep = scores.reshape(6, 4, 4).argsort(-1, descending=True)[..., :2]
    expected = torch.zeros(6, 4, 4, dtype=torch.bool).scatter_(2, keep, True).reshape(6, 16)
    assert torch.equal(get_mask(layer), expected)


def test_wanda_criterion_sums_its_scores_per_block() -> None:
    torch.manual_seed(0)
    x = correlated_inputs(50, 16)
    layer = nn.Linear(16, 8)
    scores = layer.weight.detach().abs() * x.square().sum(0).sqrt()
    pk.prune(layer, 0.5, granularity="block:4x4", criterion="wanda", data=[x])
    block_scores = scores.reshape(2, 4, 4, 4).sum((1, 3))  # (row blocks, column blocks)
    keep = block_scores.flatten() > block_scores.flatten().median()
    expected = keep.reshape(2, 1, 4, 1).expand(2, 4, 4, 4).reshape(8, 16)
    assert torch.equal(get_mask(layer), expected)


def test_wanda_row_mask_exact_count_and_ties_to_lower_index() -> None:
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    keep = wanda_row_mask(scores, 0.5)
    assert keep.tolist() == [[False, False, True, True], [True, True, False, False]]


@pytest.mark.parametrize("target", [0.5, NM(2, 4), NM(4, 8)], ids=["50%", "2:4", "4:8"])
def test_reconstruction_error_orders_sparsegpt_wanda_magnitude(target: float | NM) -> None:
    torch.manual_seed(1)
    w = torch.randn(64, 256)
    x = correlated_inputs(2048, 256)
    acc = HessianAccumulator(256)
    acc.add(x)
    norms = x.square().sum(0).sqrt()

    def mask_of(scores: torch.Tensor) -> torch.Tensor:
        return target.keep(scores) if isinstance(target, NM) else wanda_row_mask(scores, target)

    magnitude = w * mask_of(w.abs())
    wanda = w * mask_of(wanda_scores(w, norms))
    sgpt, keep = sparsegpt(w, acc.hessian, target)
    assert torch.equal(sgpt == 0, ~keep)
    errors = [reconstruction_error(w, v, x) for v in (sgpt, wanda, magnitude)]
    assert errors[0] < errors[1] < errors[2], errors


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_sparsegpt_exact_layer_sparsity(sparsity: float) -> None:
    torch.manual_seed(2)
    w = torch.randn(24, 300)  # 300 columns: blocks of 128, 128 and 44
    acc = HessianAccumulator(300)
    acc.add(torch.randn(500, 300))
    new, keep = sparsegpt(w, acc.hessian, sparsity)
    assert int((~keep).sum()) == round(sparsity * w.numel())
    assert int((new == 0).sum()) == round(sparsity * w.numel())


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_sparsegpt_nm_validity(n: int, m: int) -> None:
    torch.manual_seed(3)
    w = torch.randn(10, 64)
    acc = HessianAccumulator(64)
    acc.add(torch.randn(200, 64))
    new, keep = sparsegpt(w, acc.hessian, NM(n, m))
    assert (keep.reshape(10, -1, m).sum(-1) == n).all()
    assert torch.equal(new != 0, keep)


def test_sparsegpt_sparsity_zero_returns_weights_unchanged() -> None:
    torch.manual_seed(4)
    w = torch.randn(8, 32)
    acc = HessianAccumulator(32)
    acc.add(torch.randn(100, 32))
    new, keep = sparsegpt(w, acc.hessian, 0.0)
    assert keep.all()
    assert torch.equal(new, w)


def test_sparsegpt_dead_inputs_are_zeroed_and_finite() -> None:
    torch.manual_seed(5)
    w = torch.randn(8, 32)
    x = torch.randn(100, 32)
    x[:, [3, 17]] = 0.0
    acc = HessianAccumulator(32)
    acc.add(x)
    new, _ = sparsegpt(w, acc.hessian, 0.25)
    assert torch.isfinite(new).all()
    assert (new[:, [3, 17]] == 0).all()
    assert int((new == 0).sum()) == 64  # the dead weights are the first to go


@pytest.mark.parametrize("tokens", [0, 1, 37])
def test_take_hessian_is_the_accumulators_hessian_in_its_own_buffer(tokens: int) -> None:
    """``H = (2/n) X X^T`` (zero with no token), the same bits as ``.hessian``, scaled in
    the accumulator's buffer, which the statistics give up."""
    x = torch.randn(tokens, 6, generator=torch.Generator().manual_seed(6))
    stats = LayerStats(6, torch.device("cpu"), frozenset({"hessian"}))
    stats.add(x)
    assert stats.hessian is not None
    expected, buffer = stats.hessian.hessian, stats.hessian.sum_xxt
    assert torch.allclose(expected, 2 * x.T @ x / max(tokens, 1))
    taken = take_hessian(stats)
    assert torch.equal(taken, expected) and taken.data_ptr() == buffer.data_ptr()
    assert stats.hessian is None


def test_outlier_ratio_counts_above_m_times_mean() -> None:
    scores = [torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 31.0])]
    # mean = 40 / 10 = 4; only 31 exceeds 5 * 4 = 20
    assert outlier_ratio(scores, 5.0) == pytest.approx(0.1)


def test_owl_sparsities_keep_the_mean_and_spread_2_lambda() -> None:
    ratios = [0.01, 0.05, 0.02, 0.10, 0.03]
    out = owl_sparsities(ratios, 0.7, 0.08)
    assert sum(out) / len(out) == pytest.approx(0.7, abs=1e-12)
    assert max(out) - min(out) == pytest.approx(0.16, abs=1e-12)
    assert out.index(min(out)) == ratios.index(max(ratios))  # most outliers: least pruned
    assert all(abs(s - 0.7) <= 2 * 0.08 for s in out)
    assert owl_sparsities([0.02, 0.02], 0.5, 0.08) == [0.5, 0.5]


def test_owl_sparsities_outside_unit_interval_raise() -> None:
    with pytest.raises(InvalidSparsityError, match="lower owl_lambda"):
        owl_sparsities([0.0, 1.0], 0.95, 0.2)
