"""Training, accuracy and calibration batches for the zoo's in-memory datasets: the
app-layer face of :mod:`prunekit.training`'s one loop (:func:`~prunekit.training.loop.fit`)."""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice
from typing import Any

from torch import Tensor, nn

from prunekit.inputs import LossFn
from prunekit.training.data import TrainData, accuracy_on, steps_per_epoch, training_batches
from prunekit.training.loop import fit

__all__ = ["calibration_batches", "evaluate", "steps_per_epoch", "train"]


def train(
    model: nn.Module,
    data: TrainData,
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 64,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    seed: int = 0,
    progress: bool = True,
    loss_fn: LossFn | None = None,
    callback: Callable[[int], None] | None = None,
) -> list[float]:
    """Train ``model`` in place on a ``Dataset``'s training split or an ``(x, y)`` pair (or
    any re-iterable of ``(x, y)`` batches, :mod:`prunekit.training.data`).

    ``optimizer`` is ``"adam"`` or ``"sgd"`` (with ``momentum``). The batch order is drawn
    from a generator seeded with ``seed``, so equal seeds and equal initial weights give
    equal results. ``loss_fn(logits, y)`` defaults to cross-entropy. ``callback(step)`` runs
    after every optimizer step, with ``step`` the number of steps taken so far (1, 2, ...).
    Returns the mean training loss of each epoch.
    """
    batches = training_batches(data, batch_size, seed)
    return fit(model, batches, epochs=epochs, lr=lr, optimizer=optimizer,
               weight_decay=weight_decay, momentum=momentum, loss_fn=loss_fn,
               callback=callback, progress=progress)  # fmt: skip


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Accuracy of ``model`` on ``(x, y)`` in [0, 1] (per token for sequence outputs),
    computed in eval mode; the model's previous train/eval mode is restored."""
    return accuracy_on(x, y, model, batch_size)


def calibration_batches(
    dataset: TrainData, n_batches: int = 4, batch_size: int = 64, seed: int = 0
) -> list[Any]:
    """``n_batches`` shuffled training batches (seeded), for data-driven pruning criteria."""
    return list(islice(training_batches(dataset, batch_size, seed), n_batches))
