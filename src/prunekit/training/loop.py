"""The one training loop of prunekit: any re-iterable of batches, a training step,
per-step and per-epoch callbacks, data-parallel under ``torch.distributed``.

A *training step* is a callable ``step(model, batch) -> loss``: the loop calls it on every
batch, then ``zero_grad``, ``loss.backward()`` and ``optimizer.step()``. The default,
:class:`Supervised`, computes ``loss_fn(model(x), y)`` on a batch ``(x, y)``; a step of
your own takes batches of any form (a dict for transformers, inputs only, ...). An
*evaluate* callable ``evaluate(model) -> float`` scores a model: the pipelines report it.

    losses = fit(model, loader, epochs=3, lr=1e-3)                    # (x, y) batches
    losses = fit(model, loader, step=lambda m, b: m(**b).loss)        # transformers batches
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from prunekit.errors import DistributedError, PruningError, UnknownChoiceError, guarded
from prunekit.inputs import LossFn, batch_size, set_mode
from prunekit.tables import progress_bar
from prunekit.training import distributed

Step = Callable[[nn.Module, Any], Tensor]
"""``step(model, batch) -> scalar loss``: one training step's loss (see the module docstring)."""

Evaluate = Callable[[nn.Module], float]
"""``evaluate(model) -> score``, e.g. test accuracy; the pipelines report it."""

OPTIMIZERS = ("adam", "sgd")


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """The default training loss, for classification ``((B, C), (B,))`` and language
    modelling ``((B, T, V), (B, T))`` alike."""
    return F.cross_entropy(logits.flatten(0, -2), y.flatten())


@dataclass(frozen=True)
class Supervised:
    """The default training step: ``loss_fn(model(x), y)`` on a batch ``(x, y)``, both moved
    to the device of the model's parameters."""

    loss_fn: LossFn = cross_entropy

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        x, y = batch
        device = next(model.parameters()).device
        return self.loss_fn(model(x.to(device)), y.to(device))


def training_step(step: Step | None, loss_fn: LossFn | None) -> Step:
    """``step``, or :class:`Supervised` with ``loss_fn`` (default :func:`cross_entropy`),
    guarded: an exception it raises becomes a :class:`~prunekit.errors.UserCallbackError`
    naming it, and a loss that is not a scalar tensor with a gradient is refused."""
    if step is not None and loss_fn is not None:
        raise PruningError(
            f"step={step!r} and loss_fn={loss_fn!r} both given, but a step computes its own "
            "loss; Fix: pass one of them (loss_fn for (x, y) batches)."
        )
    for name, fn in (("step", step), ("loss_fn", loss_fn)):
        if fn is not None and not callable(fn):
            raise PruningError(
                f"{name}={fn!r} is not callable; Fix: pass step(model, batch) -> loss or "
                "loss_fn(outputs, targets) -> loss."
            )
    chosen = step if step is not None else Supervised(loss_fn or cross_entropy)
    name = f"training step {getattr(chosen, '__qualname__', None) or repr(chosen)}"
    call = guarded(chosen, name)

    def checked(model: nn.Module, batch: Any) -> Tensor:
        loss = call(model, batch)
        if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
            what = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
            raise PruningError(
                f"{name} returned a loss of {what}"
                f"{'' if getattr(loss, 'requires_grad', True) else ' without a gradient'}; Fix: "
                "return one scalar loss tensor computed from the model's outputs (with "
                "trainable parameters, outside torch.no_grad)."
            )
        return loss

    return checked


def _share(batch: Any, world: int, rank: int) -> Any:
    """This rank's contiguous share of every tensor of ``batch`` (along dimension 0),
    in the batch's own structure (a tensor, a sequence or a mapping of tensors)."""
    if isinstance(batch, Tensor):
        return batch.tensor_split(world)[rank]
    if isinstance(batch, Mapping):
        return {k: _share(v, world, rank) for k, v in batch.items()}
    return tuple(_share(v, world, rank) for v in batch)


def data_parallel(model: nn.Module, step: Step) -> tuple[nn.Module, Step]:
    """``model`` wrapped in DDP to train on global batches, each rank computing its share
    (see :func:`~prunekit.training.distributed.check_shares`), and the matching training step.

    Rank ``r`` of ``W`` takes ``n_r`` of a global batch of ``B`` examples and minimises
    ``L_r = step(shard_r) * W * n_r / B``. DDP averages the gradients, so every rank
    steps with ``(1/W) sum_r grad L_r = (1/B) sum_i grad l_i``, the gradient of the mean
    loss over the global batch: the same update as one process (up to float rounding),
    for any split of the batch and any step whose loss is ``mean + penalty``.
    BatchNorm still normalises over each rank's share. Build it after the masks exist
    (see :mod:`~prunekit.training.distributed`).
    """
    world, rank = dist.get_world_size(), dist.get_rank()

    def share_step(net: nn.Module, batch: Any) -> Tensor:
        mine = _share(batch, world, rank)
        n, total = batch_size(mine), batch_size(batch)
        if n == 0:
            raise DistributedError(
                f"a batch of {total} examples leaves rank {rank} of {world} none; Fix: "
                f"batches of at least {world} examples."
            )
        return step(net, mine) * (world * n / total)

    return DistributedDataParallel(model), share_step


def make_optimizer(
    params: Iterable[nn.Parameter], name: str, lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` (``name="adam"``) or ``SGD`` with ``momentum`` (``"sgd"``)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _check(batches: Iterable[Any], epochs: int, optimizer: str) -> None:
    if optimizer not in OPTIMIZERS:
        raise UnknownChoiceError("optimizer", optimizer, list(OPTIMIZERS))
    if isinstance(batches, Tensor) or not isinstance(batches, Iterable):
        raise PruningError(
            f"training data of type {type(batches).__name__} is not an iterable of batches; "
            "Fix: a list of (x, y) batches or a torch DataLoader."
        )
    if isinstance(batches, Iterator) and epochs > 1:
        raise PruningError(
            f"training data is a one-pass iterator ({type(batches).__name__}), empty after "
            f"the first of {epochs} epochs; Fix: a re-iterable, e.g. a list or a DataLoader."
        )


def _check_numbers(model: nn.Module, epochs: int, **hyper: float) -> None:
    """The model, the epoch count and the optimizer's numbers, before anything trains."""
    if not isinstance(model, nn.Module):
        raise PruningError(f"model={model!r} is not a torch.nn.Module; Fix: pass the model.")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise PruningError(f"epochs={epochs!r} is not an int >= 0; Fix: e.g. epochs=3.")
    for name, value in hyper.items():
        real = not isinstance(value, bool) and isinstance(value, int | float)
        if not real or not math.isfinite(value) or value < 0:
            raise PruningError(
                f"{name}={value!r} is not a finite number >= 0; Fix: e.g. lr=1e-3, "
                "weight_decay=0, momentum=0.9."
            )


def fit(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    step: Step | None = None,
    loss_fn: LossFn | None = None,
    callback: Callable[[int], None] | None = None,
    on_epoch: Callable[[], None] | None = None,
    progress: bool = True,
    sync: bool = False,
) -> list[float]:
    """Train ``model`` in place for ``epochs`` passes over ``batches``; the mean training
    loss of each epoch (weighted by the batch sizes).

    ``optimizer`` is ``"adam"`` or ``"sgd"`` (with ``momentum``), fresh for this call.
    ``step(model, batch)`` gives each batch's loss (default :class:`Supervised` with
    ``loss_fn``, cross-entropy by default). ``callback(step)`` runs after every optimizer
    step, with the number of steps taken so far (1, 2, ...); ``on_epoch()`` after every
    epoch. Modules keep their own train/eval flags afterwards, error or not.

    With ``sync``, data-parallel over the ``torch.distributed`` process group: every rank
    iterates the same global batches and trains on its share through DDP
    (:func:`data_parallel`), only rank 0 shows progress;
    the weights stay identical on every rank and the buffers (BatchNorm statistics) are
    rank 0's at the end.
    """
    step = _validated(
        model, batches, epochs, optimizer, lr, weight_decay, momentum, step, loss_fn, sync
    )
    net = model
    if sync:
        net, step = data_parallel(model, step)
    opt = make_optimizer(net.parameters(), optimizer, lr, weight_decay, momentum)
    show = progress and distributed.is_writer(sync)
    losses = _epochs(net, batches, opt, step, epochs, callback, on_epoch, show)
    if sync:
        distributed.sync_buffers(model)
    return losses


def _validated(
    model: nn.Module,
    batches: Iterable[Any],
    epochs: int,
    optimizer: str,
    lr: float,
    weight_decay: float,
    momentum: float,
    step: Step | None,
    loss_fn: LossFn | None,
    sync: bool,
    **_: Any,
) -> Step:
    """:func:`fit`'s checks of its settings, before anything trains; the training step."""
    _check(batches, epochs, optimizer)
    _check_numbers(model, epochs, lr=lr, weight_decay=weight_decay, momentum=momentum)
    if not isinstance(sync, bool):
        raise PruningError(f"sync={sync!r} is not True or False; Fix: pass a bool.")
    return training_step(step, loss_fn)


def check_fit(model: nn.Module, batches: Iterable[Any], **settings: Any) -> None:
    """Raise what :func:`fit` with ``settings`` would raise before it trains (an unknown
    setting too), training nothing: pipelines call it at entry, so that a bad training
    setting is refused before their first prune changes the model."""
    try:
        bound = inspect.signature(fit).bind(model, batches, **settings)
    except TypeError as err:
        names = ", ".join(list(inspect.signature(fit).parameters)[2:])
        raise PruningError(
            f"training settings {sorted(settings)}: {err}; Fix: use {names}."
        ) from err
    bound.apply_defaults()
    _validated(**bound.arguments)


def _epochs(
    model: nn.Module,
    batches: Iterable[Any],
    opt: torch.optim.Optimizer,
    step: Step,
    epochs: int,
    callback: Callable[[int], None] | None,
    on_epoch: Callable[[], None] | None,
    progress: bool,
) -> list[float]:
    """The loop of :func:`fit`."""
    count, losses = 0, []
    total_steps = epochs * len(batches) if isinstance(batches, Sized) else None
    with set_mode(model, True), progress_bar(disable=not progress) as bar:
        task = bar.add_task("training", total=total_steps)
        for epoch in range(epochs):
            total, seen = 0.0, 0
            for batch in batches:
                loss = step(model, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                count += 1
                if callback is not None:
                    callback(count)
                n = batch_size(batch)
                total, seen = total + loss.item() * n, seen + n
                desc = f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f}"
                bar.update(task, advance=1, description=desc)
            if not seen:
                raise PruningError(
                    f"epoch {epoch + 1} drew no batch from the training data "
                    f"({type(batches).__name__}); Fix: give at least one batch."
                )
            losses.append(total / seen)
            if on_epoch is not None:
                on_epoch()
    return losses
