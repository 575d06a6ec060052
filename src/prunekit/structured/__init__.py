"""Structured pruning that really shrinks: a dependency graph of coupled channels,
group importance, and physical removal (:func:`shrink`).

    report = pk.shrink(model, example_inputs, ratio=0.5, criterion="l2")

Modules: :mod:`~prunekit.structured.trace` (one traced forward pass),
:mod:`~prunekit.structured.rules` (how each operation moves channels),
:mod:`~prunekit.structured.graph` (groups and families),
:mod:`~prunekit.structured.importance` (criteria), :mod:`~prunekit.structured.surgery`
(removal), :mod:`~prunekit.structured.shrink` (the API), :mod:`~prunekit.structured.io`
(save and load a shrunk model).
"""

from prunekit.structured.graph import DependencyGraph, Family, Group, UnknownLayerError, build
from prunekit.structured.importance import CRITERIA, score
from prunekit.structured.io import ShrunkLayoutError, config_rebuilds, load_shrunk, save_shrunk
from prunekit.structured.labels import CouplingError
from prunekit.structured.shrink import (
    InvalidInputsError,
    ShrinkReport,
    ShrinkVerificationError,
    plan,
    shrink,
)
from prunekit.structured.surgery import remove, zero_groups
from prunekit.structured.trace import (
    UntraceableError,
    keep_whole,
    register_module_rule,
    register_rule,
)

__all__ = [
    "CRITERIA",
    "CouplingError",
    "DependencyGraph",
    "Family",
    "Group",
    "InvalidInputsError",
    "ShrinkReport",
    "ShrinkVerificationError",
    "ShrunkLayoutError",
    "UnknownLayerError",
    "UntraceableError",
    "build",
    "config_rebuilds",
    "keep_whole",
    "load_shrunk",
    "plan",
    "register_module_rule",
    "register_rule",
    "remove",
    "save_shrunk",
    "score",
    "shrink",
    "zero_groups",
]
