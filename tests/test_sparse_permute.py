"""Channel permutations for N:M: same function, more magnitude kept, errors leave the model."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_unchanged, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit as pk
from prunekit import sparse
from prunekit.errors import PermutationError
from prunekit.sparse.permute import Pair, find_pairs, retained_magnitude, search_permutation


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 24), nn.GELU(),
        nn.Dropout(0.1), nn.Linear(24, 8),
    )  # fmt: skip


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3),
        nn.ReLU(), nn.Conv2d(8, 8, 1),
    )  # fmt: skip


def randomise_norms(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)


def test_find_pairs_in_sequential_chains():
    assert find_pairs(mlp()) == [Pair("0", "3", "1"), Pair("3", "6")]
    assert find_pairs(cnn()) == [Pair("0", "3", "1"), Pair("3", "5")]
    wrapped = nn.Sequential(nn.Linear(4, 4), nn.Flatten(), nn.Linear(4, 4))
    assert find_pairs(nn.ModuleDict({"body": wrapped})) == []


@pytest.mark.parametrize("build, shape", [(mlp, (5, 16)), (cnn, (2, 3, 8, 8))])
def test_permutation_keeps_function_and_raises_retained_magnitude(build, shape):
    model = build()
    randomise_norms(model)
    x = torch.randn(shape)
    model.eval()
    expected = model(x).detach()
    consumers = [p.consumer for p in find_pairs(model)]
    before = [retained_magnitude(model.get_submodule(c).weight, 2, 4) for c in consumers]
    report = sparse.permute_channels(model, "2:4", example_inputs=x)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-5
    for r, b, c in zip(report.results, before, consumers, strict=True):
        assert r.before == pytest.approx(b)
        after = retained_magnitude(model.get_submodule(c).weight, 2, 4)
        assert after == pytest.approx(r.after, rel=1e-6)
        assert r.after > r.before and r.gain > 0
        assert sorted(r.permutation.tolist()) == list(range(len(r.permutation)))
    # The gain is real: 2:4 pruning after the permutation keeps more magnitude.
    assert "gain" in str(report)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 12), groups=st.integers(2, 6), seed=st.integers(0, 999))
def test_search_never_lowers_retained_magnitude(rows, groups, seed):
    weight = torch.randn(rows, groups * 4, generator=torch.Generator().manual_seed(seed))
    perm = search_permutation(weight, 2, 4)
    assert sorted(perm.tolist()) == list(range(groups * 4))
    base = retained_magnitude(weight, 2, 4)
    assert retained_magnitude(weight, 2, 4, perm) >= base - 1e-6


def test_search_finds_the_obvious_swap():
    # Two groups; each row's big values sit in one group: swapping spreads them out.
    weight = torch.tensor([[9.0, 9.0, 9.0, 9.0, 1.0, 1.0, 1.0, 1.0]])
    perm = search_permutation(weight, 2, 4)
    assert retained_magnitude(weight, 2, 4) == pytest.approx(20 / 40)
    assert retained_magnitude(weight, 2, 4, perm) == pytest.approx(36 / 40)


def test_explicit_pairs_and_then_prune():
    model = mlp()
    x = torch.randn(4, 16)
    model.eval()
    expected = model(x).detach()
    report = sparse.permute_channels(model, pairs=[("3", "6")], example_inputs=x)
    assert [r.pair for r in report.results] == [Pair("3", "6")]
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    pk.prune(model, granularity="2:4", layers=["6"], include_output=True)
    with torch.no_grad():
        kept = model[6].weight.abs().sum() / model[6].parametrizations.weight.original.abs().sum()
    assert float(kept) == pytest.approx(report.results[0].after, rel=1e-5)


def check_error(model, match, **kwargs):
    before = snapshot(model)
    with pytest.raises(PermutationError, match=match):
        sparse.permute_channels(model, **kwargs)
    assert_unchanged(model, before)


def test_errors_leave_the_model_unchanged():
    model = mlp()
    check_error(model, r"producer 'nope' is not a Linear or Conv2d", pairs=[("nope", "3")])
    check_error(model, r"producer '0' has 32 outputs but consumer '6' takes 24", pairs=[("0", "6")])
    check_error(model, r"norm '2' is not a BatchNorm/LayerNorm over 32", pairs=[("0", "3", "2")])
    check_error(
        model, r"'6' has 24 input channels, not a multiple of M=16", nm="2:16", pairs=[("3", "6")]
    )
    pk.prune(model, 0.5, layers=["3"])
    check_error(model, r"consumer '3' is already masked; Fix: permute channels before pruning")


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))

    def forward(self, x):
        h = self.body[0](x)
        return self.body[2](torch.relu(h)) + h  # h also skips past the consumer


def test_changed_function_is_detected_and_undone():
    torch.manual_seed(0)
    model = Residual()
    before = snapshot(model)
    with pytest.raises(PermutationError, match=r"changed the outputs by up to .*Fix: pass pairs="):
        sparse.permute_channels(model, example_inputs=torch.randn(3, 8))
    assert_unchanged(model, before)
