"""Pruning over time: integrations of :class:`~prunekit.Pruner` with training loops.

``PruningCallback`` (transformers) is resolved lazily, so this package imports without
transformers installed.
"""

from typing import Any

from prunekit.training import callbacks
from prunekit.training.callbacks import train_with_pruner

__all__ = ["PruningCallback", "callbacks", "train_with_pruner"]


def __getattr__(name: str) -> Any:
    if name == "PruningCallback":
        return callbacks.PruningCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
