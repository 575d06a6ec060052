"""prunekit: prune PyTorch networks along every axis and turn sparsity into real savings.

import prunekit as pk
report = pk.prune(model, 0.8, granularity="element", criterion="magnitude", scope="global")
pk.sparsity(model)
pk.bake(model)
pk.shrink(model, example_inputs, ratio=0.5)   # physically remove channels / heads

``import prunekit`` loads the core only (masks, schedules, the Pruner, the errors). The
engines (``pk.structured``, ``pk.sparse``, ``pk.llm``, ``pk.training``), the application
layer (``pk.analysis``, ``pk.zoo``, ...) and the names they define (``pk.shrink``,
...) are imported on first access (PEP 562 module ``__getattr__``), so
the import pulls in no matplotlib, no transformers and nothing of the application layer.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from prunekit import errors, masks, schedules
from prunekit.errors import (
    IncompatibleLayerError,
    InvalidSparsityError,
    InvalidWeightError,
    MissingDataError,
    NoLayersError,
    PrunerStateError,
    PruningError,
    ScheduleError,
    UnknownChoiceError,
)
from prunekit.inputs import Calibration
from prunekit.masks import bake, sparsity
from prunekit.pruner import Pruner
from prunekit.pruning import prune
from prunekit.schedules import Cubic, Iterative, OneShot
from prunekit.spec import PruneSpec

__version__ = "0.1.0"

# Public names defined outside the core: name -> the module that defines it.
_LAZY_ATTRIBUTES = {
    "load_shrunk": "prunekit.structured",
    "save_shrunk": "prunekit.structured",
    "shrink": "prunekit.structured",
}

__all__ = [
    "Calibration",
    "Cubic",
    "IncompatibleLayerError",
    "InvalidSparsityError",
    "InvalidWeightError",
    "Iterative",
    "MissingDataError",
    "NoLayersError",
    "OneShot",
    "PruneSpec",
    "Pruner",
    "PrunerStateError",
    "PruningError",
    "ScheduleError",
    "UnknownChoiceError",
    "analysis",
    "bake",
    "criteria",
    "errors",
    "granularity",
    "llm",
    "load_shrunk",
    "masks",
    "prune",
    "save_shrunk",
    "schedules",
    "shrink",
    "sparse",
    "sparsity",
    "structured",
    "training",
]


def __getattr__(name: str) -> Any:
    """Resolve a lazy public name (``pk.shrink``) or a submodule (``pk.llm``, ``pk.zoo``)
    on first access; Python caches a submodule as an attribute once it is imported."""
    if name in _LAZY_ATTRIBUTES:
        value = getattr(importlib.import_module(_LAZY_ATTRIBUTES[name]), name)
        globals()[name] = value
        return value
    module = f"{__name__}.{name}"
    if name.isidentifier() and not name.startswith("_") and importlib.util.find_spec(module):
        return importlib.import_module(module)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
