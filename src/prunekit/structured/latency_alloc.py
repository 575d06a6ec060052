"""The allocator of :func:`~prunekit.structured.latency.latency_plan` (pure: no timing).

Greedy on what a move loses per latency saved. Every family starts whole; a *move*
removes one block of ``step`` groups (its ``round_to``; the first move of a family whose
size is not a multiple of ``step`` drops it to the multiple below) and costs

    lost    = (1 - w) * I / I_total + w * dm / M
    saved   = dt / T + 1e-3 * dm / M

with ``I`` the sum of the removed groups' normalised scores (the least important first),
``I_total`` all families' sum, ``dt``, ``dm`` the latency and MACs the move saves
(:class:`ModelCost`), ``T``, ``M`` the dense model's and ``w`` the ``macs_weight``: with
``w > 0`` a move that removes much compute for little latency (a wide layer at a small
resolution, where per-call overheads dominate at batch 1) counts as the capacity it
takes away, so a latency target is reached with fewer MACs removed. The move with the
smallest ``lost / saved`` is taken until the target is reached (predicted latency or
MACs at most the target); the small MACs term of ``saved`` only breaks ties where the
measured latency does not move. A move that saves nothing is never taken, and no family
loses more than ``max_ratio`` of its groups. Moves are kept in a heap; after a move only
the candidates of families sharing a layer with the moved one are recomputed (stale
entries are skipped by version).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from prunekit.structured.latency_model import LayerCost, ModelCost, aligned_down, min_keep


@dataclass(frozen=True)
class Family:
    """What the allocator knows of one family: its size, block and importance."""

    total: int
    step: int
    lost: tuple[float, ...]  # lost[n]: normalised importance of its n least important groups


@dataclass(frozen=True)
class Allocation:
    kept: dict[str, int]
    latency: float
    macs: float
    reached: bool


def _next(kept: int, fam: Family, max_ratio: float) -> int | None:
    """The kept count after the family's next move, or None if it may not move."""
    nxt = aligned_down(kept, fam.step)
    floor = max(min_keep(fam.total, fam.step), math.ceil(fam.total * (1 - max_ratio)))
    return nxt if nxt >= floor else None


class _Greedy:
    def __init__(
        self, cost: ModelCost, families: Mapping[str, Family], max_ratio: float, macs_weight: float
    ) -> None:
        self.cost, self.families, self.max_ratio = cost, families, max_ratio
        self.macs_weight = macs_weight
        self.importance = max(sum(f.lost[-1] for f in families.values()), 1e-30)
        self.kept = {name: f.total for name, f in families.items()}
        self.layers: dict[str, list[LayerCost]] = cost.of_family()
        self.t0, self.m0 = cost.latency(self.kept), cost.macs(self.kept)
        self.version = dict.fromkeys(families, 0)
        self.heap: list[tuple[float, int, str, int, float, float]] = []

    def delta(self, name: str, nxt: int) -> tuple[float, float]:
        trial = {**self.kept, name: nxt}
        layers = self.layers.get(name, [])
        dt = sum(x.latency(self.kept) - x.latency(trial) for x in layers)
        dm = sum(x.macs_at(self.kept) - x.macs_at(trial) for x in layers)
        return dt, dm

    def push(self, name: str) -> None:
        self.version[name] += 1
        fam, kept = self.families[name], self.kept[name]
        nxt = _next(kept, fam, self.max_ratio)
        if nxt is None:
            return
        dt, dm = self.delta(name, nxt)
        saved = max(dt, 0.0) / self.t0 + 1e-3 * max(dm, 0.0) / max(self.m0, 1.0)
        if saved <= 0:
            return
        share = (fam.lost[fam.total - nxt] - fam.lost[fam.total - kept]) / self.importance
        w = self.macs_weight
        lost = (1.0 - w) * share + w * max(dm, 0.0) / max(self.m0, 1.0)
        entry = (lost / saved, self.version[name], name, nxt, dt, dm)
        heapq.heappush(self.heap, entry)

    def neighbours(self, name: str) -> set[str]:
        found = {g for layer in self.layers.get(name, []) for g in layer.families()}
        return (found | {name}) & set(self.families)


def allocate(
    cost: ModelCost,
    families: Mapping[str, Family],
    done: Callable[[float, float], bool],
    max_ratio: float = 0.8,
    macs_weight: float = 0.0,
) -> Allocation:
    """Greedy allocation (module docstring) until ``done(latency, macs)`` holds; the
    result says whether it did (``reached``) or every family ran out of moves."""
    g = _Greedy(cost, families, max_ratio, macs_weight)
    latency, macs = g.t0, g.m0
    for name in families:
        g.push(name)
    while not done(latency, macs) and g.heap:
        _, version, name, nxt, dt, dm = heapq.heappop(g.heap)
        if version != g.version[name]:
            continue
        g.kept[name] = nxt
        latency, macs = latency - dt, macs - dm
        for other in g.neighbours(name):
            g.push(other)
    return Allocation(dict(g.kept), latency, macs, done(latency, macs))
