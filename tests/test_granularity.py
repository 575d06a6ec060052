"""Granularities: group views, N:M methods, structural validity of the masks they produce."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit as pk
from prunekit.granularity import (
    NM,
    Block,
    keep_patterns,
    nm_mask_patterns,
    nm_mask_topn,
    parse,
)
from prunekit.layers import Layer

SHAPES = st.sampled_from([(8, 12), (16, 8), (8, 4, 3, 3), (4, 8, 2, 2), (8, 8, 3), (4, 8, 2, 2, 2)])


@given(
    shape=SHAPES, name=st.sampled_from(["element", "row", "column", "kernel", "filter", "channel"])
)
def test_groups_and_expand_are_inverse(shape, name):
    gran = parse(name)
    if name == "kernel" and len(shape) == 2:
        return
    grouping = gran.grouping(shape)
    t = torch.arange(torch.Size(shape).numel()).reshape(shape)
    groups = grouping.groups(t)
    assert groups.shape == (*grouping.group_shape, grouping.group_size)
    assert grouping.num_groups * grouping.group_size == t.numel()
    # Every group's first member, broadcast back, is constant over the group.
    first = grouping.expand(groups[..., 0])
    assert torch.equal(grouping.groups(first), groups[..., :1].expand_as(groups))
    # Each element belongs to exactly one group.
    assert torch.equal(groups.reshape(-1).sort().values, t.reshape(-1))


@settings(max_examples=60)
@given(
    data=st.data(),
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 8)]),
    groups=st.integers(1, 40),
)
def test_pattern_enumeration_equals_top_n(data, nm, groups):
    n, m = nm
    # Small integers make ties common: both methods must still agree exactly.
    values = data.draw(st.lists(st.integers(0, 3), min_size=groups * m, max_size=groups * m))
    scores = torch.tensor(values, dtype=torch.float32).reshape(groups, m)
    a, b = nm_mask_patterns(scores, n, m), nm_mask_topn(scores, n, m)
    assert torch.equal(a, b)
    assert (a.sum(1) == n).all()


def test_keep_patterns_enumerates_all_combinations():
    p = keep_patterns(2, 4)
    assert p.shape == (6, 4)
    assert (p.sum(1) == 2).all()
    assert len({tuple(r.tolist()) for r in p}) == 6


def test_patterns_method_scores_with_one_matrix_product():
    scores = torch.tensor([[0.1, 0.9, 0.8, 0.2], [5.0, 1.0, 4.0, 3.0]])
    assert nm_mask_patterns(scores, 2, 4).tolist() == [
        [False, True, True, False],
        [True, False, True, False],
    ]


@pytest.mark.parametrize("method", ["topn", "patterns"])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_masks_group_along_the_reduction_axis(method, n, m):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 4, 3)
    pk.prune(conv, granularity=NM(n, m, method))
    w = conv.weight.detach()  # (out, in, kh, kw): groups of m input channels per position
    per_group = (w != 0).movedim(1, -1).reshape(-1, m).sum(1)
    assert per_group.max() <= n
    assert pk.sparsity(conv).total == pytest.approx(1 - n / m)


def test_nm_on_linear_groups_consecutive_inputs():
    torch.manual_seed(0)
    lin = nn.Linear(8, 3)
    pk.prune(lin, granularity="2:4")
    assert ((lin.weight != 0).reshape(3, 2, 4).sum(-1) == 2).all()


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(["row", "column", "kernel", "filter", "channel", "block:2x2"]),
    sparsity=st.floats(0.1, 0.9),
    criterion=st.sampled_from(["magnitude", "l1", "l2", "random"]),
)
def test_masks_are_structurally_valid(name, sparsity, criterion):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 8, 3)
    pk.prune(conv, sparsity, granularity=name, criterion=criterion)
    zero = conv.weight.detach() == 0  # (8, 4, 3, 3)
    if name == "row":  # constant along each kernel row (last axis)
        assert (zero == zero[..., :1]).all()
    elif name == "column":
        assert (zero == zero[..., :1, :]).all()
    elif name == "kernel":
        assert (zero == zero[..., :1, :1]).all()
    elif name == "filter":
        assert (zero == zero[:, :1, :1, :1]).all()
    elif name == "channel":
        assert (zero == zero[:1, :, :1, :1]).all()
    else:  # 2x2 tiles of the (8, 36) GEMM matrix
        tiles = zero.reshape(4, 2, 18, 2)
        assert (tiles == tiles[:, :1, :, :1]).all()


def test_row_and_column_on_linear_are_whole_rows_and_columns():
    torch.manual_seed(0)
    lin = nn.Linear(10, 6)
    pk.prune(lin, 0.5, granularity="row")
    zero = lin.weight.detach() == 0
    assert (zero == zero[:, :1]).all() and zero.all(1).sum() == 3
    lin2 = nn.Linear(10, 6)
    pk.prune(lin2, 0.5, granularity="column")
    zero = lin2.weight.detach() == 0
    assert (zero == zero[:1]).all() and zero.all(0).sum() == 5


@pytest.mark.parametrize(
    "spec,expected",
    [("element", "element"), ("2:4", "2:4"), (" 4:8 ", "4:8"), ("block:4x2", "block:4x2")],
)
def test_parse(spec, expected):
    assert parse(spec).name == expected


@pytest.mark.parametrize("spec", ["elements", "4:2", "0:4", "2:2", "block:0x4", "block:4", 3])
def test_parse_rejects_unknown(spec):
    with pytest.raises(pk.UnknownChoiceError, match="valid granularity values are: element"):
        parse(spec)


def test_block_incompatibility_is_reported():
    lin = nn.Linear(10, 6)
    assert "does not tile its 6x10 matrix" in Block(4, 4).incompatibility(Layer("fc", lin))
    assert Block(2, 5).incompatibility(Layer("fc", lin)) is None
