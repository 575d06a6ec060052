"""Pruning over time: integrations of :class:`~prunekit.Pruner` with training loops,
pruning after training (:mod:`~prunekit.training.post`), during training
(:mod:`~prunekit.training.during`: soft filter pruning, network slimming), at initialisation
(:mod:`~prunekit.training.at_init`), the lottery-ticket pipeline with resumable
checkpoints (:mod:`~prunekit.training.checkpoint`), and knowledge distillation of a
pruned student from its teacher (:mod:`~prunekit.training.distill`). The pipelines share
one training loop, :func:`~prunekit.training.loop.fit`, over any re-iterable of batches
(a DataLoader, a list of ``(x, y)``, a dataset in memory: :mod:`~prunekit.training.data`)
with a training step of your choice, data-parallel under ``torch.distributed``
(:mod:`~prunekit.training.distributed`, whose :class:`MaskSync` hook keeps a Pruner's
masks identical across ranks).

``PruningCallback`` (transformers) and ``LightningPruning`` (lightning) are resolved
lazily, so this package imports without either installed.
"""

from typing import Any

from prunekit.training.at_init import reinitialize, shuffle_masks, synflow_prune
from prunekit.training.callbacks import train_with_pruner
from prunekit.training.data import accuracy
from prunekit.training.distill import Distillation, DistillReport, distill, kl_divergence
from prunekit.training.distributed import MaskSync, sync_masks
from prunekit.training.during import DuringReport, network_slimming, soft_filter_pruning
from prunekit.training.loop import Supervised, fit
from prunekit.training.lottery import LotteryReport, lottery
from prunekit.training.post import IterativeReport, iterative_pruning

__all__ = [
    "DistillReport",
    "Distillation",
    "DuringReport",
    "IterativeReport",
    "LightningPruning",
    "LotteryReport",
    "MaskSync",
    "PruningCallback",
    "Supervised",
    "accuracy",
    "distill",
    "fit",
    "iterative_pruning",
    "kl_divergence",
    "lottery",
    "network_slimming",
    "reinitialize",
    "shuffle_masks",
    "soft_filter_pruning",
    "sync_masks",
    "synflow_prune",
    "train_with_pruner",
]


def __getattr__(name: str) -> Any:
    if name in ("PruningCallback", "LightningPruning"):
        from prunekit.training import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
