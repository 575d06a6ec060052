"""Structured pruning that really shrinks: a dependency graph of coupled channels,
group importance, and physical removal (:func:`shrink`).

    report = pk.shrink(model, example_inputs, ratio=0.5, criterion="l2")

Modules: :mod:`~prunekit.structured.trace` (one traced forward pass),
:mod:`~prunekit.structured.registry` (which rule traces each operation; register your
own), :mod:`~prunekit.structured.rules` (the built-in rules: how each operation moves
channels), :mod:`~prunekit.structured.graph` (groups and families),
:mod:`~prunekit.structured.importance` (criteria), :mod:`~prunekit.structured.surgery`
(removal), :mod:`~prunekit.structured.shrink` (the API), :mod:`~prunekit.structured.io`
(save and load a shrunk model). Its errors live in :mod:`prunekit.errors`.
"""

from prunekit.structured.fold import FoldReport, fold_batchnorm
from prunekit.structured.graph import DependencyGraph, build
from prunekit.structured.importance import score
from prunekit.structured.io import load_shrunk, save_shrunk
from prunekit.structured.latency import (
    LatencyPlan,
    LatencyShrink,
    LatencyTargetError,
    latency_plan,
    shrink_to_latency,
)
from prunekit.structured.registry import keep_whole, register_module_rule, register_rule
from prunekit.structured.shrink import ShrinkReport, plan, shrink

__all__ = [
    "DependencyGraph",
    "FoldReport",
    "LatencyPlan",
    "LatencyShrink",
    "LatencyTargetError",
    "ShrinkReport",
    "build",
    "fold_batchnorm",
    "keep_whole",
    "latency_plan",
    "load_shrunk",
    "plan",
    "register_module_rule",
    "register_rule",
    "save_shrunk",
    "score",
    "shrink",
    "shrink_to_latency",
]
