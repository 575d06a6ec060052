"""The training loop the pipelines share: :func:`prunekit.zoo.train`, data-parallel under
``torch.distributed``, with per-epoch callbacks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from prunekit.training import distributed
from prunekit.zoo.train import Data, cross_entropy, steps_per_epoch, train_xy
from prunekit.zoo.train import train as zoo_train


def each_epoch(data: Data, batch_size: int, fn: Callable[[], None]) -> Callable[[int], None]:
    """A ``zoo.train`` step callback that runs ``fn`` after the last step of every epoch."""
    steps = steps_per_epoch(data, batch_size)
    return lambda step: fn() if step % steps == 0 else None


def check(data: Data, batch_size: int, sync: bool) -> None:
    """Under ``sync``, fail before anything is trained if a batch would leave a rank empty
    (:func:`~prunekit.training.distributed.check_shares`)."""
    if sync:
        distributed.check_shares(len(train_xy(data)[0]), batch_size)


def train(
    model: nn.Module,
    data: Data,
    *,
    sync: bool,
    batch_size: int = 64,
    progress: bool = True,
    loss_fn: Callable[..., Any] | None = None,
    **kwargs: Any,
) -> list[float]:
    """:func:`prunekit.zoo.train`; with ``sync``, data-parallel over the process group:
    every rank draws the same global batches, trains on its share through DDP
    (:func:`~prunekit.training.distributed.data_parallel`) and only rank 0 shows progress.
    The weights then stay identical on every rank, and the buffers (BatchNorm statistics)
    are rank 0's at the end."""
    loss_fn = loss_fn or cross_entropy
    check(data, batch_size, sync)
    progress = progress and distributed.is_writer(sync)
    if not sync:
        return zoo_train(
            model, data, batch_size=batch_size, progress=progress, loss_fn=loss_fn, **kwargs
        )
    wrapper, loss_fn = distributed.data_parallel(model, loss_fn)
    losses = zoo_train(
        wrapper, data, batch_size=batch_size, progress=progress, loss_fn=loss_fn, **kwargs
    )
    distributed.sync_buffers(model)
    return losses
