"""What the pipelines train on and report: any re-iterable of batches, or examples in memory.

``data`` is either

- **in memory**: an object with tensors ``x_train, y_train, x_test, y_test`` (what
  :func:`prunekit.zoo.load_dataset` returns) or an ``(x, y)`` pair of training tensors.
  Each training run draws mini-batches of ``batch_size`` in a random order from a
  generator seeded with the run's seed (:class:`Shuffled`), so equal seeds and equal
  initial weights give equal results; ``evaluate`` defaults to the accuracy on the test
  split;
- **anything else**: a re-iterable of batches (a list of ``(x, y)``, a
  ``torch.utils.data.DataLoader``), trained on as it is, one pass an epoch, with the
  training step of your choice (:mod:`~prunekit.training.loop`); then ``evaluate`` is
  yours to give.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from prunekit.errors import MissingDataError, PruningError, guarded
from prunekit.inputs import eval_mode
from prunekit.training import distributed
from prunekit.training.loop import Evaluate

SPLIT = ("x_train", "y_train", "x_test", "y_test")


class InMemory(Protocol):
    """A train/test split held as tensors (a :class:`prunekit.zoo.Dataset`)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


TrainData = InMemory | tuple[Tensor, Tensor] | Iterable[Any]
"""What the pipelines take as ``data`` (see the module docstring)."""


def batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x, y)`` mini-batches in order, or in a random order drawn from ``generator``;
    the last batch may be smaller."""
    order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    for idx in order.split(batch_size):
        yield x[idx], y[idx]


class Shuffled:
    """Re-iterable mini-batches of ``(x, y)``: each pass (epoch) draws a fresh random order
    from one generator seeded with ``seed``; ``len`` is ``ceil(n / batch_size)``."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return batches(self.x, self.y, self.batch_size, shuffle=True, generator=self.generator)


def has_split(data: Any) -> bool:
    """Whether ``data`` holds a train/test split in memory (``x_train`` ... ``y_test``)."""
    return all(isinstance(getattr(data, name, None), Tensor) for name in SPLIT)


def train_tensors(data: Any) -> tuple[Tensor, Tensor] | None:
    """The training ``(x, y)`` of in-memory ``data`` (see the module docstring), else None."""
    if has_split(data):
        return data.x_train, data.y_train
    pair = isinstance(data, tuple) and len(data) == 2
    return data if pair and all(isinstance(t, Tensor) for t in data) else None


def steps_per_epoch(data: TrainData, batch_size: int = 64) -> int:
    """Optimizer steps of one epoch over ``data``: ``ceil(n / batch_size)`` for ``n``
    examples in memory (the last batch may be short), else ``len(data)``."""
    xy = train_tensors(data)
    if xy is not None:
        return -(-len(xy[0]) // batch_size)
    if not isinstance(data, Sized):
        raise PruningError(
            f"training data of type {type(data).__name__} has no len(), so its steps per "
            "epoch are unknown; Fix: a list of batches or a DataLoader over a sized dataset."
        )
    return len(data)


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> float:
    """Accuracy of ``model`` over ``(x, y)`` batches in [0, 1] (per token for sequence
    outputs), computed in eval mode; every module's train/eval flag is restored."""
    device = next(model.parameters()).device
    correct = total = 0
    with eval_mode(model):
        for xb, yb in batches:
            correct += (model(xb.to(device)).argmax(-1) == yb.to(device)).sum().item()
            total += yb.numel()
    return correct / total


def accuracy_on(x: Tensor, y: Tensor, model: nn.Module, batch_size: int = 512) -> float:
    """:func:`accuracy` on the examples ``(x, y)``, in order, ``batch_size`` at a time."""
    return accuracy(model, batches(x, y, batch_size))


def training_batches(data: TrainData, batch_size: int, seed: int) -> Iterable[Any]:
    """The batches of one training run on ``data``: in memory, a fresh :class:`Shuffled`
    of ``seed``; otherwise ``data`` itself, its own ``generator`` (a DataLoader's, which
    its shuffling sampler draws from) first seeded with ``seed``.

    So every run's order is a function of ``seed`` alone, and a resumed pipeline draws
    the orders of an uninterrupted one. A DataLoader without a ``generator`` shuffles
    from torch's global RNG, which the checkpoints save and restore.
    """
    xy = train_tensors(data)
    if xy is not None:
        return Shuffled(*xy, batch_size, seed)
    generator = getattr(data, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed)
    return data


@dataclass(frozen=True)
class Source:
    """A pipeline's ``data`` resolved, with ``evaluate(model)``, the score it reports."""

    data: TrainData
    batch_size: int
    evaluate: Evaluate

    @property
    def examples(self) -> tuple[Tensor, Tensor] | None:
        """The training ``(x, y)`` in memory, or None for the user's batches."""
        return train_tensors(self.data)

    def batches(self, seed: int) -> Iterable[Any]:
        """:func:`training_batches` of one run."""
        return training_batches(self.data, self.batch_size, seed)

    @property
    def steps_per_epoch(self) -> int:
        """:func:`steps_per_epoch`."""
        return steps_per_epoch(self.data, self.batch_size)

    def check(self, sync: bool) -> None:
        """Under ``sync``, fail before anything is trained if an in-memory batch would leave
        a rank empty (:func:`~prunekit.training.distributed.check_shares`)."""
        if sync and self.examples is not None:
            distributed.check_shares(len(self.examples[0]), self.batch_size)


def scorer(fn: Evaluate, name: str) -> Evaluate:
    """A user's ``fn(model) -> score`` (``evaluate``, ``validate``) as the pipelines call
    it: an exception it raises becomes a :class:`~prunekit.errors.UserCallbackError`
    naming it, and a score that is not a real number is refused."""
    call = guarded(fn, f"{name} {getattr(fn, '__qualname__', None) or repr(fn)}")

    def score(model: nn.Module) -> float:
        value = call(model)
        try:
            return float(value)
        except (TypeError, ValueError, RuntimeError) as err:
            raise PruningError(
                f"{name}(model) returned {value!r}, not a number; Fix: return the score as a "
                "float (e.g. the test accuracy)."
            ) from err

    return score


def source(data: TrainData, batch_size: int, evaluate: Evaluate | None = None) -> Source:
    """``data`` (see the module docstring) as a :class:`Source`; ``evaluate`` defaults to
    the accuracy on an in-memory test split.

    A given ``evaluate`` is called through :func:`scorer`.

    Raises:
        MissingDataError: no ``evaluate`` and no test split, or ``data`` that is not a
            re-iterable of batches.
    """
    if evaluate is None:
        if not has_split(data):
            raise MissingDataError(
                f"data of type {type(data).__name__} has no test split (x_test, y_test) to "
                "score the model on; Fix: pass evaluate=, e.g. "
                "evaluate=lambda model: pk.training.accuracy(model, test_loader)."
            )
        evaluate = partial(accuracy_on, data.x_test, data.y_test)
    else:
        evaluate = scorer(evaluate, "evaluate")
    in_memory = train_tensors(data) is not None
    if not in_memory and (isinstance(data, Iterator | Tensor) or not isinstance(data, Iterable)):
        raise MissingDataError(
            f"data of type {type(data).__name__} is neither a dataset in memory nor a "
            "re-iterable of batches (each run iterates it again); Fix: a list of (x, y) "
            "batches, a DataLoader, or pk.zoo.load_dataset(...)."
        )
    return Source(data, batch_size, evaluate)


def describe(data: Any) -> list[Any]:
    """What identifies ``data`` in a checkpoint: its name and split sizes in memory, else
    its type and length."""
    if has_split(data):
        name = getattr(data, "name", type(data).__name__)
        return [name, len(data.x_train), len(data.x_test)]
    return [type(data).__name__, len(data) if isinstance(data, Sized) else None]
