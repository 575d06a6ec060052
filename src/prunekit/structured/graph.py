"""The dependency graph: groups of coupled channels, gathered into families.

A **group** is one union class of the trace (:mod:`prunekit.structured.trace`): every
parameter and buffer position that has to go when one channel goes (a conv filter, its
bias, its BatchNorm entries, the consumers' input channels, the matching channel of every
other member of a residual sum...). Its **members** are ``(tensor, dim, positions)``.

A **family** is the set of groups that share the same member tensors: the output
channels of one conv (with everything coupled to them), the heads of one attention
layer, the neurons of one MLP. Groups compete inside their family (local scope) or
across families (global scope). A family is named after its *leader*, the module whose
output produces the channels.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from prunekit.errors import UnknownLayerError
from prunekit.inputs import Inputs
from prunekit.structured import collector
from prunekit.structured.trace import Trace, trace

Ignore = Iterable[str | type[nn.Module]] | str | type[nn.Module]  # one, or several


class Member(NamedTuple):
    """Positions ``index`` of dimension ``dim`` of tensor ``name`` (a parameter or buffer).

    A named tuple: a family view builds one per group and member tensor (cheaply).
    """

    name: str
    dim: int
    index: Tensor


@dataclass(frozen=True)
class Group:
    """Channels removed together: every member position of one coupling class."""

    id: int
    members: tuple[Member, ...]


@dataclass(frozen=True)
class Runs:
    """One member tensor dimension of a whole family, vectorised: the positions of group
    ``j`` are ``positions[offsets[j]:offsets[j + 1]]`` (ascending); ``group[k]`` is the
    group number of ``positions[k]``."""

    name: str
    dim: int
    positions: Tensor
    offsets: Tensor
    group: Tensor

    @property
    def counts(self) -> Tensor:
        return self.offsets.diff()

    def group_of(self) -> Tensor:
        """The group number of every entry of ``positions``."""
        return self.group

    def select(self, chosen: np.ndarray) -> Tensor:
        """The positions of the groups ``chosen`` (a bool per group of the family)."""
        return torch.from_numpy(self.positions.numpy()[chosen[self.group.numpy()]])


class _Groups(Sequence[Group]):
    """A family's per-group view: its length is free, its :class:`Group` objects are
    built on first access (one object per group and member: planning needs only counts)."""

    def __init__(self, family: Family) -> None:
        self._family = family
        self._built: list[Group] | None = None

    def __len__(self) -> int:
        return len(self._family.ids)

    def __getitem__(self, i):  # type: ignore[no-untyped-def]  (int or slice, as a list)
        return self._list()[i]

    def __iter__(self) -> Iterator[Group]:
        return iter(self._list())

    def _list(self) -> list[Group]:
        if self._built is None:
            fam = self._family
            with collector.paused():  # many small objects: cycle scans would dominate
                parts = [
                    [Member(r.name, r.dim, index) for index in r.positions.split(r.counts.tolist())]
                    for r in fam.runs
                ]
                rows = zip(*parts, strict=True)
                self._built = [Group(i, m) for i, m in zip(fam.ids.tolist(), rows, strict=True)]
        return self._built


class Family:
    """Groups with the same member tensors; ``kind`` is ``"heads"`` or ``"channels"``.

    ``ids[j]`` is the id of group ``j`` and ``runs`` hold every member position of every
    group at once (one :class:`Runs` per member tensor dimension, sorted by name): code
    that treats a whole family reads them with array operations; ``groups`` builds the
    per-group :class:`Group` view on first use.
    """

    def __init__(self, name: str, kind: str, ids: Tensor, runs: tuple[Runs, ...]) -> None:
        self.name, self.kind, self.ids, self.runs = name, kind, ids, runs
        self._groups = _Groups(self)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Family({self.name!r}, {self.kind!r}, {len(self)} groups)"

    @property
    def groups(self) -> Sequence[Group]:
        """The per-group view (a sequence: ``len`` is free, objects are built on access)."""
        return self._groups


@dataclass
class DependencyGraph:
    """Families of removable groups, plus what the trace saw (for attribute updates)."""

    families: list[Family]
    trace: Trace
    blocked_groups: int
    _positions: dict[tuple, dict[tuple[str, int], Tensor]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def family(self, name: str) -> Family:
        return next(f for f in self.families if f.name == name)

    def groups(self) -> list[Group]:
        return [g for f in self.families for g in f.groups]

    def positions(self, removed: Mapping[str, Sequence[int]]) -> dict[tuple[str, int], Tensor]:
        """Every member position of the ``removed`` groups (family name -> group numbers),
        per ``(tensor name, dim)``, without building per-group objects (remembered: the
        reference and the removal ask for the same ones)."""
        key = tuple((name, tuple(map(int, index))) for name, index in removed.items())
        if key not in self._positions:
            families = {f.name: f for f in self.families}
            out: dict[tuple[str, int], list[Tensor]] = {}
            for name, index in removed.items():
                chosen = np.zeros(len(families[name].ids), dtype=bool)  # numpy: small arrays
                chosen[np.asarray(index, dtype=np.int64)] = True
                picked: dict[int, Tensor] = {}  # once per runs its member dims share
                for runs in families[name].runs:
                    at = id(runs.positions)
                    if at not in picked:
                        picked[at] = runs.select(chosen)
                    out.setdefault((runs.name, runs.dim), []).append(picked[at])
            self._positions[key] = {
                at: parts[0] if len(parts) == 1 else torch.cat(parts) for at, parts in out.items()
            }
        return dict(self._positions[key])

    def ids(self, removed: Mapping[str, Sequence[int]]) -> set[int]:
        """The ids of the ``removed`` groups (family name -> group numbers)."""
        out: set[int] = set()
        for name, index in removed.items():
            out.update(self.family(name).ids[torch.as_tensor(index, dtype=torch.long)].tolist())
        return out


def owner(name: str) -> str:
    """The module holding tensor ``name``: ``"layer1.0.conv1.weight"`` -> ``"layer1.0.conv1"``."""
    return name.rpartition(".")[0]


def _ignored(model: nn.Module, ignore: Ignore) -> set[str]:
    """The names of the modules ``ignore`` names, globs or types (one, or several)."""
    names: set[str] = set()
    modules = dict(model.named_modules())
    for item in [ignore] if isinstance(ignore, str | type) else ignore:
        if isinstance(item, str):
            found = [n for n in modules if n and fnmatch.fnmatchcase(n, item)]
            if not found:
                raise UnknownLayerError(
                    f"ignore={item!r} matches no module of {type(model).__name__}; Fix: use a "
                    f"module name or glob such as {next(iter(n for n in modules if n), '')!r}."
                )
        else:
            found = [n for n, m in modules.items() if isinstance(m, item)]
        names.update(found)
    return names


def build(
    model: nn.Module, example_inputs: Inputs, ignore: Ignore = (), macs: bool = False
) -> DependencyGraph:
    """Trace ``model`` and group its removable channels (see the module docstring);
    ``macs``: the trace also counts the model's MACs (``graph.trace.macs``).

    Channels of ``ignore``d modules (names, globs or types) and of the model's outputs are
    blocked, as are channels mixed by an operation that cannot lose them (a LayerNorm over
    them, a reshape to a fixed size, an unlabelled operand of the same size).
    """
    ignored = _ignored(model, ignore)
    tr = trace(model, example_inputs, macs)
    for (name, _), ids in tr.members.items():
        if owner(name) in ignored:
            tr.atoms.block(ids)
    blocked = tr.atoms.blocked_root_mask()
    roots = tr.atoms.all_roots().numpy()
    keys = list(tr.members)
    distinct, holders = _distinct(tr.members.values(), roots)
    found = _present(distinct, blocked)
    head_roots = {tr.atoms.find(a) for ev in tr.heads for a in ev.q_heads.tolist()}
    families = _families(found)
    result = []
    every_runs = _runs(keys, holders, distinct, families, len(roots))
    for (shared, ids), runs in zip(families, every_runs, strict=True):
        named = sorted((k for u in shared for k in holders[u]), key=keys.__getitem__)
        own = {keys[i] for i in named}
        leader = next((k for k in tr.producers if k in own), keys[named[0]])
        kind = "heads" if int(ids[0]) in head_roots else "channels"
        result.append(Family(owner(leader[0]), kind, torch.from_numpy(ids), runs))
    _dedupe_names(result)
    return DependencyGraph(result, tr, int(blocked.sum()))


def _distinct(
    members: Iterable[Tensor], roots: np.ndarray
) -> tuple[list[np.ndarray], list[list[int]]]:
    """The distinct root arrays of the ``members``' atoms (in order of first occurrence)
    and, for each, the indices of the members that have it. Coupled tensors carry the same
    roots (a conv's filters, its bias, its BatchNorm's four vectors, the next conv's
    inputs; every member of a residual stream), often as the very same atoms
    (:meth:`~prunekit.structured.state.TraceState.couple`), so families are sought once
    per distinct array: ResNet-50 has 321 member dimensions and 39 distinct arrays
    (families and runs 9.9 -> 1.9 ms)."""
    by_bytes: dict[bytes, int] = {}  # 1-D int64 arrays: equal bytes, equal arrays
    by_object: dict[int, int] = {}  # the same atoms: the same roots
    distinct: list[np.ndarray] = []
    holders: list[list[int]] = []
    for k, ids in enumerate(members):
        u = by_object.get(id(ids))
        if u is None:
            root = roots[ids.numpy()]
            u = by_object[id(ids)] = by_bytes.setdefault(root.tobytes(), len(distinct))
            if u == len(distinct):
                distinct.append(root)
                holders.append([])
        holders[u].append(k)
    return distinct, holders


def _present(roots: list[np.ndarray], blocked: np.ndarray) -> list[np.ndarray]:
    """The distinct removable roots among each of ``roots`` (ascending), all at once:
    ``key * atoms + root`` codes are made unique together, then split by key."""
    n = max(len(blocked), 1)
    key = np.repeat(np.arange(len(roots)), [len(r) for r in roots])
    code = np.sort(key * n + np.concatenate(roots)) if roots else np.zeros(0, np.int64)
    code = code[np.concatenate([code[:1] == code[:1], code[1:] != code[:-1]])]
    key, root = np.divmod(code, n)
    keep = ~blocked[root]
    key, root = key[keep], root[keep]
    return np.split(root, np.searchsorted(key, np.arange(1, len(roots))))


def _families(found: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Group roots by the set of keys (indices into ``found``) they appear in.

    Returns ``(keys, roots)`` per family, ordered by their first key, then first root
    (the order the trace met them in). Each root's key set is one row of a padded matrix
    (keys ascending, ``-1`` after them); equal rows are one family (:func:`_unique_rows`).
    """
    if not any(len(f) for f in found):
        return []
    root = np.concatenate(found)
    key = np.repeat(np.arange(len(found)), [len(f) for f in found])
    order = np.lexsort((key, root))
    root, key = root[order], key[order]
    ids, start, counts = np.unique(root, return_index=True, return_counts=True)
    row = np.repeat(np.arange(len(ids)), counts)
    table = np.full((len(ids), int(counts.max())), -1, dtype=np.int64)
    table[row, np.arange(len(root)) - start[row]] = key
    rows, first, which = _unique_rows(table)
    out = [(r[r >= 0], ids[which == f]) for f, r in enumerate(rows)]
    rank = sorted(range(len(out)), key=lambda f: (int(rows[f][0]), int(ids[first[f]])))
    return [out[f] for f in rank]


def _unique_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct rows of the int64 ``table``, the index of each one's first occurrence
    and which one every row is (``np.unique(axis=0)``'s, in another order): rows are told
    apart by a hash (``sum_j table[:, j] * w_j`` with fixed odd 64-bit ``w``, wrapping),
    then every row is compared with its class's first one; on a collision (improbable)
    it falls back to ``np.unique(axis=0)``, which sorts whole rows (several times slower)."""
    weights = np.random.default_rng(0).integers(1, 2**62, table.shape[1]) | 1
    _, first, which = np.unique((table * weights).sum(axis=1), return_index=True,
                                return_inverse=True)  # fmt: skip
    which = which.reshape(-1)
    if not np.array_equal(table, table[first][which]):
        rows, first, which = np.unique(table, axis=0, return_index=True, return_inverse=True)
        return rows, first, which.reshape(-1)
    return table[first], first, which


CODE_LIMIT = 2**63  # the codes (family, member, group) of _runs fit an int64 below it


def _runs(
    keys: list[tuple[str, int]], holders: list[list[int]], roots: list[np.ndarray],
    families: list[tuple[np.ndarray, np.ndarray]], atoms: int,
) -> list[tuple[Runs, ...]]:  # fmt: skip
    """Per family ``(members, ids)``: where each of its ``ids`` (ascending) sits in every
    distinct root array ``roots[u]`` (``u`` in ``members``), as the runs of each member
    dimension ``keys[k]`` holding it (``k`` in ``holders[u]``, :func:`_distinct`), sorted
    by name. Every family at once: each position's root is looked up in a table of
    (family, group number), then one stable sort by ``(family, u, group)`` makes one block
    per (family, array, group), positions ascending within it. A family's roots are those
    met in every one of its arrays (:func:`_families`), so no block is empty."""
    if not families:
        return []
    family_of, group_of = np.full(atoms, -1), np.zeros(atoms, dtype=np.int64)
    for f, (_, ids) in enumerate(families):
        family_of[ids], group_of[ids] = f, np.arange(len(ids))
    sizes = np.array([len(r) for r in roots])
    root = np.concatenate(roots)
    keep = np.flatnonzero(family_of[root] >= 0)
    position = (np.arange(len(root)) - np.repeat(np.cumsum(sizes) - sizes, sizes))[keep]
    fam, key = family_of[root[keep]], np.repeat(np.arange(len(roots)), sizes)[keep]
    group = group_of[root[keep]]
    width = max(len(ids) for _, ids in families)
    if len(families) * len(roots) * width < CODE_LIMIT:  # one sort of int64 codes
        order = np.argsort((fam * len(roots) + key) * width + group, kind="stable")
    else:
        order = np.lexsort((group, key, fam))
    fam, key, group = fam[order], key[order], group[order]
    new = (fam[1:] != fam[:-1]) | (key[1:] != key[:-1]) | (group[1:] != group[:-1])
    starts = np.flatnonzero(np.concatenate([[True], new, [True]]))
    blocks = (starts, torch.from_numpy(position[order]), torch.from_numpy(group))
    return _blocks(keys, holders, families, *blocks)


def _blocks(
    keys: list[tuple[str, int]], holders: list[list[int]],
    families: list[tuple[np.ndarray, np.ndarray]], starts: np.ndarray, position: Tensor,
    group: Tensor,
) -> list[tuple[Runs, ...]]:  # fmt: skip
    """The :class:`Runs` of every family from the sorted blocks (:func:`_runs`): family
    after family, arrays ascending, ``len(ids)`` blocks each; the member dimensions holding
    one array share its tensors (read-only)."""
    out, block = [], 0
    for shared, ids in families:
        runs = {}
        for u in shared:  # ascending (_families)
            bounds = starts[block : block + len(ids) + 1]
            lo, hi = int(bounds[0]), int(bounds[-1])
            found = (position[lo:hi], torch.from_numpy(bounds - lo), group[lo:hi])
            runs.update({keys[k]: Runs(*keys[k], *found) for k in holders[int(u)]})
            block += len(ids)
        out.append(tuple(runs[k] for k in sorted(runs)))
    return out


def _dedupe_names(families: list[Family]) -> None:
    seen: dict[str, int] = {}
    for fam in families:
        n = seen.get(fam.name, 0)
        seen[fam.name] = n + 1
        if n:
            fam.name = f"{fam.name}#{n}"
