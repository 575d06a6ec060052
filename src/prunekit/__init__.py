"""prunekit: prune PyTorch networks along every axis and turn sparsity into real savings.

import prunekit as pk
report = pk.prune(model, 0.8, granularity="element", criterion="magnitude", scope="global")
pk.sparsity(model)
pk.bake(model)
pk.shrink(model, example_inputs, ratio=0.5)   # physically remove channels / heads
"""

from prunekit import (
    analysis,
    criteria,
    granularity,
    llm,
    masks,
    schedules,
    sparse,
    structured,
    training,
)
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
from prunekit.masks import bake, sparsity
from prunekit.pruner import Pruner
from prunekit.pruning import PruneReport, prune
from prunekit.schedules import Cubic, Iterative, OneShot
from prunekit.structured import ShrinkReport, load_shrunk, save_shrunk, shrink

__version__ = "0.1.0"

__all__ = [
    "Cubic",
    "IncompatibleLayerError",
    "InvalidSparsityError",
    "InvalidWeightError",
    "Iterative",
    "MissingDataError",
    "NoLayersError",
    "OneShot",
    "PruneReport",
    "Pruner",
    "PrunerStateError",
    "PruningError",
    "ScheduleError",
    "ShrinkReport",
    "UnknownChoiceError",
    "analysis",
    "bake",
    "criteria",
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
