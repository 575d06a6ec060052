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
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prunekit.errors import UnknownLayerError
from prunekit.inputs import Inputs
from prunekit.structured.trace import Trace, trace

Ignore = Iterable[str | type[nn.Module]]


@dataclass(frozen=True)
class Member:
    """Positions ``index`` of dimension ``dim`` of tensor ``name`` (a parameter or buffer)."""

    name: str
    dim: int
    index: Tensor


@dataclass(frozen=True)
class Group:
    """Channels removed together: every member position of one coupling class."""

    id: int
    members: tuple[Member, ...]


@dataclass
class Family:
    """Groups with the same member tensors; ``kind`` is ``"heads"`` or ``"channels"``."""

    name: str
    kind: str
    groups: list[Group]


@dataclass
class DependencyGraph:
    """Families of removable groups, plus what the trace saw (for attribute updates)."""

    families: list[Family]
    trace: Trace
    blocked_groups: int

    def family(self, name: str) -> Family:
        return next(f for f in self.families if f.name == name)

    def groups(self) -> list[Group]:
        return [g for f in self.families for g in f.groups]


def owner(name: str) -> str:
    """The module holding tensor ``name``: ``"layer1.0.conv1.weight"`` -> ``"layer1.0.conv1"``."""
    return name.rpartition(".")[0]


def _ignored(model: nn.Module, ignore: Ignore) -> set[str]:
    names: set[str] = set()
    modules = dict(model.named_modules())
    for item in ignore:
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


def build(model: nn.Module, example_inputs: Inputs, ignore: Ignore = ()) -> DependencyGraph:
    """Trace ``model`` and group its removable channels (see the module docstring).

    Channels of ``ignore``d modules (names, globs or types) and of the model's outputs are
    blocked, as are channels mixed by an operation that cannot lose them (a LayerNorm over
    them, a reshape to a fixed size, an unlabelled operand of the same size).
    """
    ignored = _ignored(model, ignore)
    tr = trace(model, example_inputs)
    for (name, _), ids in tr.members.items():
        if owner(name) in ignored:
            tr.atoms.block(ids)
    blocked = tr.atoms.blocked_roots()
    root_of = tr.atoms.all_roots()
    by_root: dict[int, list[Member]] = defaultdict(list)
    for (name, dim), ids in tr.members.items():
        roots = root_of[ids]
        order = torch.argsort(roots, stable=True)
        unique, counts = torch.unique_consecutive(roots[order], return_counts=True)
        for root, index in zip(unique.tolist(), torch.split(order, counts.tolist()), strict=True):
            by_root[root].append(Member(name, dim, index))
    head_roots = {tr.atoms.find(a) for ev in tr.heads for a in ev.q_heads.tolist()}
    families: dict[tuple[tuple[str, int], ...], list[Group]] = {}
    for root, found in by_root.items():
        if root in blocked:
            continue
        members = tuple(sorted(found, key=lambda m: (m.name, m.dim)))
        keys = tuple((m.name, m.dim) for m in members)
        families.setdefault(keys, []).append(Group(root, members))
    order = {key: i for i, key in enumerate(tr.members)}
    result = []
    for keys, groups in sorted(families.items(), key=lambda kv: min(order[k] for k in kv[0])):
        leader = next((k for k in tr.producers if k in keys), min(keys, key=order.__getitem__))
        kind = "heads" if groups[0].id in head_roots else "channels"
        result.append(Family(owner(leader[0]), kind, groups))
    _dedupe_names(result)
    return DependencyGraph(result, tr, len(blocked))


def _dedupe_names(families: list[Family]) -> None:
    seen: dict[str, int] = {}
    for fam in families:
        n = seen.get(fam.name, 0)
        seen[fam.name] = n + 1
        if n:
            fam.name = f"{fam.name}#{n}"
