"""prunekit: prune PyTorch networks along every axis and turn sparsity into real savings.

import prunekit as pk
report = pk.prune(model, 0.8, granularity="element", criterion="magnitude", scope="global")
pk.sparsity(model)
pk.bake(model)
"""

from prunekit import analysis, criteria, granularity, masks
from prunekit.errors import (
    IncompatibleLayerError,
    InvalidSparsityError,
    InvalidWeightError,
    MissingDataError,
    NoLayersError,
    PruningError,
    UnknownChoiceError,
)
from prunekit.masks import bake, sparsity
from prunekit.pruning import PruneReport, prune

__version__ = "0.1.0"

__all__ = [
    "IncompatibleLayerError",
    "InvalidSparsityError",
    "InvalidWeightError",
    "MissingDataError",
    "NoLayersError",
    "PruneReport",
    "PruningError",
    "UnknownChoiceError",
    "analysis",
    "bake",
    "criteria",
    "granularity",
    "masks",
    "prune",
    "sparsity",
]
