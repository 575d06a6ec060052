"""Example inputs, as every prunekit function that runs a model accepts them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from prunekit.errors import MissingDataError

Inputs = Tensor | tuple[Any, ...] | list[Any] | Mapping[str, Any]
"""A tensor (``model(x)``), a tuple of positional arguments (``model(*args)``) or a mapping
of keyword arguments (``model(**kwargs)``, e.g. ``{"input_ids": ids}`` for transformers)."""

LossFn = Callable[[Tensor, Any], Tensor]
"""``loss_fn(outputs, targets) -> scalar loss``."""


def call(model: nn.Module, inputs: Inputs) -> Any:
    """``model`` applied to ``inputs`` (see :data:`Inputs`)."""
    if isinstance(inputs, Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


@contextmanager
def set_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Run the body after ``model.train(training)``; restore every module's own training
    flag afterwards (a submodule kept in eval mode stays so), error or not."""
    modes = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, flag in modes:
            module.training = flag


def eval_mode(model: nn.Module) -> AbstractContextManager[None]:
    """:func:`set_mode` in eval mode."""
    return set_mode(model, False)


def call_eval(model: nn.Module, inputs: Inputs) -> Any:
    """:func:`call` in eval mode (:func:`eval_mode`) without gradients."""
    with eval_mode(model), torch.no_grad():
        return call(model, inputs)


def batch_size(inputs: Inputs) -> int:
    """The first dimension of the first tensor in ``inputs``: their batch size."""
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0])
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    return int(next(v for v in values if isinstance(v, Tensor)).shape[0])


class Batch(NamedTuple):
    """One calibration batch: what the model is called with, and the targets (or None)."""

    inputs: Inputs
    targets: Any


class Calibration:
    """What ``data=`` is everywhere in prunekit: batches of model inputs, with targets
    where a loss needs them.

    ``data`` is any re-iterable of batches (a list, a ``torch.utils.data.DataLoader``, an
    HF ``datasets`` split turned into tensors...). Each batch is split into
    :class:`Batch` ``(inputs, targets)``:

    - a pair ``(x, y)`` (tuple or list of two): inputs ``x``, targets ``y``;
    - a tensor or a mapping of keyword arguments (``{"input_ids": ...}``): inputs only;
    - with ``targets=False`` every batch is inputs only (a tuple is then the positional
      arguments of the model), with ``targets=True`` every batch must be a pair.

    ``loss_fn(outputs, targets)`` gives the loss of gradient criteria; without it the loss
    is cross-entropy on ``(outputs, targets)``, or ``outputs.loss`` when the batch has no
    targets and the model returns one (transformers models called with ``labels``).

    Example:
        >>> cal = Calibration(loader)                     # DataLoader of (x, y)
        >>> pk.prune(model, 0.5, criterion="taylor", data=cal)
    """

    def __init__(
        self, data: Iterable[Any], *, targets: bool | None = None, loss_fn: LossFn | None = None
    ) -> None:
        if isinstance(data, Calibration):
            data, targets, loss_fn = data.data, targets or data.targets, loss_fn or data.loss_fn
        if isinstance(data, Tensor | Mapping) or not isinstance(data, Iterable):
            raise MissingDataError(
                f"data of type {type(data).__name__} is not an iterable of batches; Fix: pass "
                "a list of batches, e.g. data=[(x, y)] or data=[x], or a DataLoader."
            )
        self.data, self.targets, self.loss_fn = data, targets, loss_fn

    @classmethod
    def of(cls, data: Any, loss_fn: LossFn | None = None) -> Calibration | None:
        """``data`` as a Calibration (None stays None; a Calibration keeps its settings)."""
        return None if data is None else cls(data, loss_fn=loss_fn)

    @property
    def reusable(self) -> bool:
        """False for a one-pass iterator (a generator), which is empty the second time."""
        return not isinstance(self.data, Iterator)

    def split(self, batch: Any) -> Batch:
        """``batch`` as :class:`Batch` (see the class docstring)."""
        pair = isinstance(batch, tuple | list) and len(batch) == 2
        if self.targets is True and not pair:
            raise MissingDataError(
                f"a calibration batch of type {type(batch).__name__} has no targets; "
                "Fix: give (inputs, targets) pairs."
            )
        if pair and self.targets is not False:
            return Batch(batch[0], batch[1])
        return Batch(batch, None)

    def __iter__(self) -> Iterator[Batch]:
        return (self.split(batch) for batch in self.data)

    def inputs(self) -> Iterator[Inputs]:
        """The model inputs of every batch."""
        return (batch.inputs for batch in self)

    def loss(self, outputs: Any, batch: Batch, scale: float = 1.0) -> Tensor:
        """The loss of one batch's ``outputs`` (logits divided by ``scale`` first, when not
        1: GraSP's temperature)."""
        if scale != 1.0:
            outputs = _logits(outputs) / scale
        if self.loss_fn is not None:
            return self.loss_fn(outputs, batch.targets)
        if batch.targets is None:
            loss = getattr(outputs, "loss", None)
            if loss is None:
                raise MissingDataError(
                    "a gradient criterion needs a loss, but the batch has no targets and the "
                    "model returned no .loss; Fix: pass data=[(inputs, targets), ...] or loss_fn."
                )
            return loss
        return torch.nn.functional.cross_entropy(_logits(outputs), batch.targets)


def _logits(outputs: Any) -> Tensor:
    """The output tensor of a model: itself, or ``.logits`` of a transformers output."""
    return outputs if isinstance(outputs, Tensor) else outputs.logits
