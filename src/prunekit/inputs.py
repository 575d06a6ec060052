"""Example inputs, as every prunekit function that runs a model accepts them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from prunekit.errors import CalibrationError, MissingDataError, guarded

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
    if any(flag != training for _, flag in modes):  # (a flag set is an nn.Module.__setattr__)
        model.train(training)
    try:
        yield
    finally:
        for module, flag in modes:
            if module.training != flag:
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
        if isinstance(data, Tensor | Mapping | str | bytes) or not isinstance(data, Iterable):
            raise MissingDataError(
                f"data of type {type(data).__name__} is not an iterable of batches; Fix: pass "
                "a list of batches, e.g. data=[(x, y)] or data=[x], or a DataLoader."
            )
        if loss_fn is not None:  # the user's: what it raises is named as theirs
            loss_fn = guarded(loss_fn, f"loss_fn {getattr(loss_fn, '__qualname__', loss_fn)!r}")
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
        inputs, targets = (
            (batch[0], batch[1]) if pair and self.targets is not False else (batch, None)
        )
        if not isinstance(inputs, Tensor | Mapping | tuple | list):
            raise CalibrationError(
                f"calibration data holds a batch whose inputs are {inputs!r:.60} "
                f"({type(inputs).__name__}), which no model is called with; Fix: batches of "
                "tensors (x or (x, y)), tuples of positional arguments, or mappings of keyword "
                "arguments."
            )
        return Batch(inputs, targets)

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

    @classmethod
    def ragged(
        cls,
        sequences: Iterable[Any],
        *,
        batch_size: int = 8,
        side: str = "right",
        tokenizer: Callable[[str], Any] | None = None,
    ) -> Calibration:
        """Token sequences of different lengths as padded batches ``{"input_ids",
        "attention_mask"}`` of ``batch_size`` rows (:func:`pad`): the mask is 1 on real
        tokens, 0 on the padding (id 0) on ``side``, and statistics skip the padding.

        ``sequences``: lists of token ids, 1-D integer tensors, or texts with
        ``tokenizer`` (a callable text -> ids, e.g. a Hugging Face tokenizer).

        Example:
            >>> pk.llm.prune(model, Calibration.ragged(texts, tokenizer=tok), method="wanda")
        """
        rows = _token_rows(sequences, tokenizer)
        _check_count("batch_size", batch_size)
        return cls(
            [pad(rows[i : i + batch_size], side) for i in range(0, len(rows), batch_size)],
            targets=False,
        )

    @classmethod
    def packed(
        cls,
        sequences: Iterable[Any],
        seq_len: int,
        *,
        batch_size: int = 8,
        separator: int | None = None,
        tokenizer: Callable[[str], Any] | None = None,
    ) -> Calibration:
        """Sequences (as for :meth:`ragged`) concatenated, with the id ``separator`` between
        them when given (an end-of-text token), and cut into windows of ``seq_len`` tokens,
        ``batch_size`` windows a batch (SparseGPT's and Wanda's calibration form); the last,
        shorter window is right-padded (:func:`pad`), so no token is dropped."""
        rows = _token_rows(sequences, tokenizer)
        _check_count("seq_len", seq_len)
        _check_count("batch_size", batch_size)
        sep = [] if separator is None else [separator]
        stream = [t for i, row in enumerate(rows) for t in (sep if i else []) + row]
        windows = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
        batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
        return cls([pad(rows) for rows in batches], targets=False)


def pad(rows: list[list[int]], side: str = "right") -> dict[str, Tensor]:
    """``{"input_ids": (len(rows), longest), "attention_mask": ...}``: ``rows`` padded with
    id 0 on ``side`` (``"right"`` or ``"left"``), the mask 1 on real tokens, 0 on padding."""
    if side not in ("left", "right"):
        raise CalibrationError(f"side={side!r} is not 'left' or 'right'; Fix: pass one of them.")
    longest = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(longest - len(row), longest) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**31:
        raise CalibrationError(f"{name}={value!r} is not an int in 1..2**31; Fix: e.g. 8.")


def _token_ids(item: Any, index: int, tokenizer: Callable[[str], Any] | None) -> list[int]:
    """One sequence as a list of ids: a text through ``tokenizer``, a 1-D integer tensor,
    or a list of ints."""
    if isinstance(item, str):
        if tokenizer is None:
            raise CalibrationError(
                f"calibration sequence {index} is text; Fix: pass tokenizer= (e.g. the model's "
                "AutoTokenizer), or token ids."
            )
        item = guarded(tokenizer, "tokenizer")(item)
        item = item["input_ids"] if isinstance(item, Mapping) else item
    if isinstance(item, Tensor) and not item.dtype.is_floating_point and item.dim() <= 2:
        item = item.reshape(-1).tolist()
    if isinstance(item, list) and len(item) == 1 and isinstance(item[0], list):
        item = item[0]  # a tokenizer's batch of one
    ok = isinstance(item, list | tuple) and len(item) > 0
    if not ok or not all(type(t) is int and t >= 0 for t in item):
        raise CalibrationError(
            f"calibration sequence {index} ({type(item).__name__}) is not a non-empty list of "
            "token ids (ints >= 0); Fix: pass lists of ids, 1-D integer tensors, or texts with "
            "tokenizer=."
        )
    return list(item)


def _token_rows(
    sequences: Iterable[Any], tokenizer: Callable[[str], Any] | None
) -> list[list[int]]:
    if isinstance(sequences, str | Tensor | Mapping) or not isinstance(sequences, Iterable):
        raise CalibrationError(
            f"calibration sequences of type {type(sequences).__name__} is not a list of "
            "sequences; Fix: pass a list of texts, id lists or 1-D id tensors."
        )
    rows = [_token_ids(item, i, tokenizer) for i, item in enumerate(sequences)]
    if not rows:
        raise CalibrationError("calibration sequences is empty; Fix: pass at least one.")
    return rows


def _logits(outputs: Any) -> Tensor:
    """The output tensor of a model: itself, or ``.logits`` of a transformers output."""
    return outputs if isinstance(outputs, Tensor) else outputs.logits
