"""Example inputs, as every prunekit function that runs a model accepts them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

Inputs = Tensor | tuple[Any, ...] | list[Any] | Mapping[str, Any]
"""A tensor (``model(x)``), a tuple of positional arguments (``model(*args)``) or a mapping
of keyword arguments (``model(**kwargs)``, e.g. ``{"input_ids": ids}`` for transformers)."""


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
