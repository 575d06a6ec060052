"""2-D N:M granularity: every M x M tile keeps N per row and column (W and W^T are N:M)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit as pk
from prunekit import sparse
from prunekit.granularity import NM, NM2D, parse, tile_patterns
from prunekit.sparse.nm import nm_violations


def test_parse_and_pattern_counts():
    gran = parse("2:4-2d")
    assert isinstance(gran, NM2D) and isinstance(gran, NM)
    assert (gran.name, gran.sparsity, gran.rows_per_group) == ("2:4-2d", 0.5, 4)
    assert type(parse("2:4")) is NM
    assert [len(tile_patterns(n, m)) for n, m in ((1, 2), (1, 3), (2, 4), (1, 4), (3, 4))] == [
        2,
        6,
        90,
        24,
        24,
    ]
    with pytest.raises(pk.UnknownChoiceError, match=r"N:M-2d with M <= 4"):
        parse("2:8-2d")


def brute_force_best(tile: torch.Tensor) -> float:
    best = float("-inf")
    rows = [c for c in itertools.combinations(range(4), 2)]
    for choice in itertools.product(rows, repeat=4):
        counts = [sum(j in c for c in choice) for j in range(4)]
        if counts == [2, 2, 2, 2]:
            best = max(best, sum(float(tile[i, j]) for i, c in enumerate(choice) for j in c))
    return best


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_each_tile_is_the_best_transposable_pattern(seed):
    scores = torch.rand(4, 4, generator=torch.Generator().manual_seed(seed))
    keep = NM2D(2, 4).keep(scores)
    assert keep.sum(0).tolist() == [2] * 4 and keep.sum(1).tolist() == [2] * 4
    assert float(scores[keep].sum()) == pytest.approx(brute_force_best(scores))


@pytest.mark.parametrize(
    "layer", [nn.Linear(24, 16), nn.Conv2d(8, 12, 3), nn.Conv2d(16, 8, 1)], ids=repr
)
def test_prune_2d_gives_transposable_masks(layer):
    torch.manual_seed(0)
    model = nn.Sequential(layer)
    report = pk.prune(model, granularity="2:4-2d")
    assert report.granularity == "2:4-2d" and report.sparsity == 0.5
    weight = model[0].weight.detach().movedim(1, -1).movedim(0, -2)  # (*kernel, out, in)
    for w in weight.reshape(-1, *weight.shape[-2:]):
        assert nm_violations(w, 2, 4)[0] == 0  # inputs: 2:4
        assert nm_violations(w.T.contiguous(), 2, 4)[0] == 0  # outputs: 2:4
        tiles = w.reshape(w.shape[0] // 4, 4, -1, 4).ne(0).sum((1, 3))
        assert bool((tiles == 8).all())
    x = torch.randn(2, *((24,) if isinstance(layer, nn.Linear) else (layer.in_channels, 5, 5)))
    expected = model(x)
    sparse.convert(model, "nm")
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("criterion", ["gradient", "taylor", "snip", "grasp", "wanda"])
def test_data_driven_criteria_take_2d_nm(criterion):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8))
    data = [(torch.randn(4, 16), torch.randint(0, 8, (4,)))]
    report = pk.prune(model, granularity="2:4-2d", criterion=criterion, data=data,
                      include_output=True)  # fmt: skip
    assert report.sparsity == 0.5
    for layer in (model[0], model[2]):
        w = layer.weight.detach()
        assert nm_violations(w, 2, 4)[0] == 0 and nm_violations(w.T.contiguous(), 2, 4)[0] == 0


def test_output_axis_must_divide():
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(8, 8))  # never run: pruned only
    report = pk.prune(model, granularity="2:4-2d", include_output=True)
    reason = "2:4-2d needs the output axis (6) to be a multiple of M=4; exclude the layer or "
    assert report.skipped == [("0", reason + "use 1-D N:M")]
    with pytest.raises(pk.IncompatibleLayerError, match=r"layer '0': 2:4-2d needs the output"):
        pk.prune(nn.Sequential(nn.Linear(8, 6)), granularity="2:4-2d", layers=["0"])
