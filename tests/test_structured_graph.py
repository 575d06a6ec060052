"""The vectorised dependency graph: union-find, family arrays and the per-group view agree."""

from __future__ import annotations

import importlib
import random
from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._pytree import tree_flatten

import prunekit as pk
from prunekit.structured import build
from prunekit.structured.labels import FIXED, Atoms
from prunekit.structured.state import TraceState, tensors
from prunekit.zoo import build_model, example_input

graph_module = importlib.import_module("prunekit.structured.graph")


def _reference_roots(n: int, pairs: list[tuple[int, int]]) -> list[int]:
    """Plain union-find: every class labelled by its smallest atom."""
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            a = parent[a]
        return a

    for a, b in pairs:
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    return [find(a) for a in range(n)]


def test_union_find_matches_a_plain_one_on_random_unions() -> None:
    rng = random.Random(0)
    for trial in range(20):
        atoms, n, pairs = Atoms(), rng.randint(1, 300), []
        atoms.new(n)
        for _ in range(rng.randint(0, 12)):
            k = rng.randint(1, 40)
            a = [rng.randrange(n) for _ in range(k)]
            b = [rng.randrange(n) for _ in range(k)]
            atoms.unite(torch.tensor(a), torch.tensor(b))
            pairs += zip(a, b, strict=True)
            if trial % 3 == 0:  # roots asked for between unions
                assert atoms.find(a[0]) == _reference_roots(n, pairs)[a[0]]
        assert atoms.all_roots().tolist() == _reference_roots(n, pairs)


def test_fixed_blocks_the_other_side_and_rows_unite() -> None:
    atoms = Atoms()
    atoms.new(8)
    atoms.unite(torch.tensor([0, FIXED]), torch.tensor([1, 2]))
    atoms.unite_rows(torch.tensor([[3, 4, 5], [FIXED, 6, 7]]))
    assert atoms.all_roots().tolist() == [0, 0, 2, 3, 3, 3, 6, 7]
    assert atoms.blocked_roots() == {2, 6, 7}


def test_family_arrays_give_the_groups_and_their_positions() -> None:
    model = build_model("resnet20").eval()
    graph = build(model, example_input("resnet20", 2))
    for fam in graph.families:
        assert len(fam) == len(fam.groups) and fam.ids.tolist() == [g.id for g in fam.groups]
        for k, runs in enumerate(fam.runs):
            members = [group.members[k] for group in fam.groups]
            assert {(m.name, m.dim) for m in members} == {(runs.name, runs.dim)}
            assert torch.equal(torch.cat([m.index for m in members]), runs.positions)
            last = np.arange(len(fam)) == len(fam) - 1
            assert torch.equal(runs.select(last), members[-1].index)
    fam = graph.families[1]
    removed = {fam.name: [0, 2]}
    positions = graph.positions(removed)
    for runs in fam.runs:
        expected = torch.cat([fam.groups[i].members[fam.runs.index(runs)].index for i in (0, 2)])
        assert torch.equal(positions[(runs.name, runs.dim)], expected)
    assert graph.ids(removed) == {fam.groups[0].id, fam.groups[2].id}


def test_a_residual_sum_is_one_family_across_both_branches() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.a(x) + self.b(x))

    graph = build(Residual(), torch.randn(2, 4))
    (fam,) = graph.families
    assert len(fam) == 6
    assert [(r.name, r.dim) for r in fam.runs] == [
        ("a.bias", 0), ("a.weight", 0), ("b.bias", 0), ("b.weight", 0), ("head.weight", 1),
    ]  # fmt: skip
    assert all(r.counts.tolist() == [1] * 6 for r in fam.runs)


def test_unique_rows_are_exact_even_when_hashes_collide() -> None:
    """Families are told apart by a row hash, checked row by row: a collision (two rows
    crafted to the same hash) falls back to sorting whole rows."""
    rng = np.random.default_rng(1)
    table = rng.integers(-1, 5, (500, 6))
    table = np.concatenate([table, table[:50]])
    weights = np.random.default_rng(0).integers(1, 2**62, 2) | 1
    crafted = np.array([[weights[1], 0], [0, weights[0]], [weights[1], 0]])
    for t in (table, crafted):
        rows, first, which = graph_module._unique_rows(t)
        expected = np.unique(t, axis=0)
        assert len(rows) == len(expected) and np.array_equal(rows[which], t)
        assert np.array_equal(t[first], rows)
        assert all(first[which[i]] <= i for i in range(len(t)))


def test_a_models_own_pre_hook_on_a_module_traced_whole_is_traced() -> None:
    """The tracer's hooks run after the model's own: a pre-hook that rescales a GRU's
    input runs while tracing is on, so the channels feeding the GRU (kept whole) stay."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.rnn, self.b = (
                nn.Linear(8, 8),
                nn.GRU(8, 6, batch_first=True),
                nn.Linear(6, 2),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.rnn(self.a(x))[0])

    torch.manual_seed(0)
    model = Net().eval()
    model.rnn.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    x = torch.randn(2, 5, 8)
    assert not any(f.name == "a" for f in build(model, x).families)
    before = model(x)
    pk.shrink(model, x, ratio=0.5)
    torch.testing.assert_close(model(x), before)


@pytest.mark.parametrize("name", ["mobilenetv2", "vit", "gpt"])
@pytest.mark.parametrize("limit", [2**63, 0])
def test_runs_are_where_each_groups_root_sits(
    name: str, limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every run of every family lists exactly the positions of its member dimension whose
    atom has the group's root, group after group; the same with the int64 codes sorted
    and, past ``CODE_LIMIT``, with the three keys sorted (``np.lexsort``)."""
    monkeypatch.setattr(graph_module, "CODE_LIMIT", limit)
    graph = build(build_model(name).eval(), example_input(name))
    roots = graph.trace.atoms.all_roots()
    assert graph.families
    for fam in graph.families:
        for runs in fam.runs:
            member = roots[graph.trace.members[(runs.name, runs.dim)]]
            expected = [torch.nonzero(member == i).flatten() for i in fam.ids.tolist()]
            assert torch.equal(runs.offsets.diff(), torch.tensor([len(e) for e in expected]))
            assert torch.equal(runs.positions, torch.cat(expected))
            groups = [torch.full((len(e),), j) for j, e in enumerate(expected)]
            assert torch.equal(runs.group, torch.cat(groups))


def _each_its_own(
    members: list[torch.Tensor], roots: np.ndarray
) -> tuple[list[np.ndarray], list[list[int]]]:
    return [roots[ids.numpy()] for ids in members], [[k] for k in range(len(members))]


def _families_of(graph: object) -> list[tuple]:
    return [
        (f.name, f.kind, f.ids.tolist(),
         [(r.name, r.dim, r.positions.tolist(), r.offsets.tolist(), r.group.tolist())
          for r in f.runs])
        for f in graph.families  # type: ignore[attr-defined]
    ]  # fmt: skip


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "vit", "gpt"])
def test_families_are_the_same_whether_equal_root_arrays_are_searched_once(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Member dimensions with equal roots (a conv's filters, its BatchNorm, the next
    conv's inputs) are searched once and share their runs: the same families, names,
    ids and runs as searching each dimension on its own, in the same order."""
    model, x = build_model(name).eval(), example_input(name)
    graph = build(model, x)
    roots = graph.trace.atoms.all_roots().numpy()
    distinct, _ = graph_module._distinct(graph.trace.members.values(), roots)
    shared = _families_of(graph)
    monkeypatch.setattr(graph_module, "_distinct", _each_its_own)
    alone = build(model, x)
    assert len(distinct) < len(alone.trace.members)  # some are shared: the test can fail
    assert shared == _families_of(alone)


def _united(self: TraceState, p: torch.Tensor, dim: int, ids: torch.Tensor) -> None:
    self.atoms.unite(self.param_atoms(p, dim), ids)


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "vit", "gpt"])
def test_dims_that_take_their_inputs_atoms_give_the_graph_of_fresh_atoms_united(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A BatchNorm's vectors, a conv's inputs and a bias take the atoms they go with
    (:meth:`TraceState.couple`): the same families and runs as fresh atoms united with
    them, from far fewer atoms (group ids are atoms, so they are numbered otherwise)."""
    model, x = build_model(name).eval(), example_input(name)
    taken = build(model, x)
    monkeypatch.setattr(TraceState, "couple", _united)
    united = build(model, x)
    assert taken.trace.atoms.size < united.trace.atoms.size
    assert [f[:2] + f[3:] for f in _families_of(taken)] == [
        f[:2] + f[3:] for f in _families_of(united)
    ]


_LEAF = st.one_of(
    st.integers(), st.floats(allow_nan=False), st.none(), st.text(max_size=3),
    st.sampled_from([torch.float32, torch.device("cpu"), slice(1, 2), Ellipsis]),
    st.integers(0, 3).map(lambda n: torch.zeros(n)),
)  # fmt: skip
_TREE = st.recursive(
    _LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=2), inner, max_size=3),
        st.tuples(inner, inner).map(lambda t: Pair(*t)),
        st.lists(inner, max_size=3).map(lambda v: torch.Size([1] * len(v))),
    ),
    max_leaves=12,
)


class Pair(NamedTuple):
    a: object
    b: object


@given(_TREE)
@settings(max_examples=200, deadline=None)
def test_the_tensors_of_a_tree_are_pytrees_tensor_leaves_in_order(tree: object) -> None:
    """The rules' walk over arguments finds exactly the tensors ``tree_flatten`` finds,
    the same objects in the same order (named tuples and other containers included)."""
    expected = [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]
    found = tensors(tree)
    assert len(found) == len(expected)
    assert all(a is b for a, b in zip(found, expected, strict=True))
