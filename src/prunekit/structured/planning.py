"""Which channel groups :func:`prunekit.shrink` removes: pure planning from scores.

- :func:`plan`: per family, the ``ratio`` of its groups with the lowest scores (local),
  or the lowest of one ranking across families (global, scores divided by each family's
  mean unless ``normalize="none"``), kept counts rounded up to a multiple of
  ``round_to``, never emptying a family.
- :func:`zero_groups_plan`: the groups whose producing weights are all zero already
  (``ratio=None``: filters masked by ``pk.prune(granularity="filter")``).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from prunekit.allocation import check_sparsity
from prunekit.errors import UnknownLayerError
from prunekit.structured.graph import DependencyGraph
from prunekit.structured.report import FamilyDecision

Ratio = float | Mapping[str, float] | None


def _min_keep(total: int, round_to: int) -> int:
    return min(total, max(1, round_to))


def _round_kept(kept: int, total: int, round_to: int) -> int:
    return min(total, max(_min_keep(total, round_to), math.ceil(kept / round_to) * round_to))


def _lowest(scores: Tensor, count: int) -> tuple[int, ...]:
    order = torch.argsort(scores, stable=True)
    return tuple(sorted(order[:count].tolist()))


def _family_ratios(graph: DependencyGraph, ratio: Ratio) -> dict[str, float]:
    if not isinstance(ratio, Mapping):
        value = check_sparsity(ratio, "ratio")
        return {f.name: value for f in graph.families}
    out: dict[str, float] = {}
    for pattern, value in ratio.items():
        found = [f.name for f in graph.families if fnmatch.fnmatchcase(f.name, pattern)]
        if not found:
            names = ", ".join(f.name for f in graph.families[:5])
            raise UnknownLayerError(
                f"ratio key {pattern!r} matches no prunable family; Fix: use a family name or "
                f"glob (families here: {names}, ...)."
            )
        for name in found:
            out.setdefault(name, check_sparsity(value, f"ratio[{pattern!r}]"))
    return out


def plan(
    graph: DependencyGraph,
    scores: Mapping[str, Tensor | None],
    ratio: Ratio,
    scope: str = "local",
    round_to: int = 1,
    normalize: str = "mean",
) -> list[FamilyDecision]:
    """Which groups of each family go (pure: reads scores, changes nothing)."""
    ratios = _family_ratios(graph, ratio)
    decisions: dict[str, FamilyDecision] = {}
    ranked = []
    for fam in graph.families:
        s, total = scores.get(fam.name), len(fam.groups)
        if fam.name not in ratios or s is None:
            note = "not ranked by this criterion" if fam.name in ratios else ""
            decisions[fam.name] = FamilyDecision(fam.name, fam.kind, total, (), note)
            continue
        if scope == "local" or isinstance(ratio, Mapping):
            kept = _round_kept(total - math.floor(ratios[fam.name] * total), total, round_to)
            decisions[fam.name] = FamilyDecision(
                fam.name, fam.kind, total, _lowest(s, total - kept)
            )
        else:
            norm = s if normalize == "none" else s / s.mean().clamp_min(1e-30)
            ranked += [(float(v), fam.name, i) for i, v in enumerate(norm.tolist())]
    if ranked:
        sizes = {f.name: len(f.groups) for f in graph.families}
        target = math.floor(float(ratio) * len(ranked))  # type: ignore[arg-type]
        chosen: dict[str, list[int]] = {}
        for _, name, i in sorted(ranked):
            if target <= 0:
                break
            if len(chosen.get(name, ())) < sizes[name] - _min_keep(sizes[name], round_to):
                chosen.setdefault(name, []).append(i)
                target -= 1
        for name, total in sizes.items():
            if name in decisions:
                continue
            picked = chosen.get(name, [])
            kept = _round_kept(total - len(picked), total, round_to)
            drop = sorted(picked, key=lambda i: float(scores[name][i]))[: total - kept]
            fam = graph.family(name)
            decisions[name] = FamilyDecision(name, fam.kind, total, tuple(sorted(drop)))
    return [decisions[f.name] for f in graph.families]


def zero_groups_plan(model: nn.Module, graph: DependencyGraph) -> list[FamilyDecision]:
    """Groups whose producing weights are all zero already (masked filters)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    producers = set(graph.trace.producers)
    out = []
    for fam in graph.families:
        drop = []
        for i, g in enumerate(fam.groups):
            own = [m for m in g.members if (m.name, m.dim) in producers and m.name in params]
            if own and all(not params[m.name].index_select(m.dim, m.index).any() for m in own):
                drop.append(i)
        drop = drop[: len(fam.groups) - 1]  # never empty a family
        out.append(FamilyDecision(fam.name, fam.kind, len(fam.groups), tuple(drop)))
    return out


__all__ = ["Ratio", "plan", "zero_groups_plan"]
