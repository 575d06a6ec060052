"""Calibration input: validated token-id batches for a model's forward.

Accepted forms (``calibration`` of :func:`prunekit.llm.prune`):

- a :class:`prunekit.inputs.Calibration` (the one data type of prunekit: a DataLoader or
  any iterable of batches; each batch's inputs are one of the forms below);
- an integer tensor ``(samples, seq_len)`` (split into batches of ``batch_size`` rows) or
  ``(seq_len,)`` (one sample);
- a sequence of such tensors, one batch each;
- a sequence of dicts of tensors with at least ``input_ids`` (e.g. with ``attention_mask``),
  one batch each, passed to the model as keyword arguments;
- a list of token-id lists of different lengths (ragged), padded into batches of
  ``batch_size`` rows with an ``attention_mask`` (:meth:`Calibration.ragged
  <prunekit.inputs.Calibration.ragged>`; :meth:`~prunekit.inputs.Calibration.packed` cuts
  texts or ids into full windows instead).

Padding: an ``attention_mask`` (1 = real token, 0 = padding, left or right) marks the
positions every statistic skips (:class:`prunekit.llm.engine.RealTokens`). When a row is
left-padded (or has holes) and the batch holds no ``position_ids``, they are added as the
mask's running count (as ``generate`` does), so real tokens keep the positions they have
unpadded in models with absolute position embeddings.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from prunekit.errors import CalibrationError
from prunekit.inputs import Calibration
from prunekit.llm.placement import execution_device

TokenData = Calibration | Tensor | Sequence[Tensor] | Sequence[Mapping[str, Tensor]]
Batch = dict[str, Tensor]


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the input embedding (the ids the model accepts), or None when unknown."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    return getattr(embedding, "num_embeddings", None)


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model takes (``config.max_position_embeddings``; GPT-2's
    ``n_positions`` is the same attribute), or None when it declares none."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def _check_length(batch: Batch, where: str, limit: int | None) -> None:
    length = batch["input_ids"].shape[-1]
    if limit is not None and length > limit:
        raise CalibrationError(
            f"calibration {where} holds sequences of {length} tokens, longer than the "
            f"{limit} positions the model takes (config.max_position_embeddings); Fix: cut "
            f"the text into windows of at most {limit} tokens."
        )


def _check(ids: object, where: str, vocab: int | None) -> Tensor:
    if not isinstance(ids, Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise CalibrationError(
            f"calibration {where} is {getattr(ids, 'dtype', type(ids).__name__)}, not token ids; "
            "Fix: pass integer token ids (e.g. tokenizer(text, return_tensors='pt').input_ids)."
        )
    if ids.numel() == 0:
        raise CalibrationError(f"calibration {where} is empty; Fix: give at least one token.")
    if ids.dim() > 2:
        raise CalibrationError(
            f"calibration {where} has shape {tuple(ids.shape)}; Fix: token ids of shape "
            "(samples, seq_len) or (seq_len,)."
        )
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise CalibrationError(
            f"calibration {where} holds token ids {low}..{high}, outside the model's vocabulary "
            f"0..{(vocab or 0) - 1}; Fix: tokenize with the model's own tokenizer."
        )
    return ids if ids.dim() == 2 else ids.reshape(1, -1)


def calibration_batches(
    calibration: TokenData, model: nn.Module, batch_size: int = 8
) -> list[Batch]:
    """``calibration`` as validated batches on the model's device (see the module docstring).

    Raises:
        CalibrationError: empty, not integer ids, ids outside the vocabulary, or sequences
            longer than the model's positions (:func:`max_positions`).
    """
    bad = isinstance(batch_size, bool) or not isinstance(batch_size, int)
    if bad or not 1 <= batch_size <= 2**31:
        raise CalibrationError(
            f"batch_size={batch_size!r} is not an int >= 1 (at most 2**31); Fix: e.g. 8."
        )
    vocab = vocab_size(model)
    if _ragged(calibration):
        calibration = Calibration.ragged(calibration, batch_size=batch_size)
    if isinstance(calibration, Calibration):
        calibration = list(calibration.inputs())
    if isinstance(calibration, Tensor):
        ids = _check(calibration, "tensor", vocab)
        raw: list[Batch] = [{"input_ids": chunk} for chunk in ids.split(batch_size)]
    elif isinstance(calibration, Sequence) and not isinstance(calibration, str):
        raw = []
        for i, item in enumerate(calibration):
            batch = dict(item) if isinstance(item, Mapping) else {"input_ids": item}
            if "input_ids" not in batch:
                raise CalibrationError(
                    f"calibration batch {i} has keys {sorted(batch)} but no 'input_ids'; "
                    "Fix: pass the tokenizer's output dict."
                )
            batch["input_ids"] = _check(batch["input_ids"], f"batch {i}", vocab)
            others = [k for k, v in batch.items() if not isinstance(v, Tensor)]
            if others:
                raise CalibrationError(
                    f"calibration batch {i}: {others[0]!r} is a "
                    f"{type(batch[others[0]]).__name__}, not a tensor; Fix: pass the "
                    "tokenizer's output with return_tensors='pt'."
                )
            _check_mask(batch, i)
            raw.append(batch)
    else:
        raise CalibrationError(
            f"calibration of type {type(calibration).__name__} is not supported; Fix: pass a "
            "(samples, seq_len) tensor of token ids, or a list of tensors / tokenizer dicts."
        )
    if not raw:
        raise CalibrationError(
            "calibration is empty; Fix: pass at least one sample (128 is usual)."
        )
    limit = max_positions(model)
    for i, batch in enumerate(raw):
        _check_length(batch, f"batch {i}", limit)
    device = execution_device(model)
    positions = _takes_positions(model)
    return [
        {k: v.to(device) for k, v in _with_positions(batch, positions).items()} for batch in raw
    ]


def _ragged(calibration: object) -> bool:
    """A list of id lists (or texts, which :meth:`Calibration.ragged` refuses with a fix)."""
    return (
        isinstance(calibration, list | tuple)
        and len(calibration) > 0
        and all(isinstance(row, list | tuple | str) for row in calibration)
    )


def _check_mask(batch: Batch, index: int) -> None:
    """An ``attention_mask`` shaped like the ids, of 0 / 1, with at least one real token."""
    mask = batch.get("attention_mask")
    if mask is None:
        return
    ids = batch["input_ids"]
    mask = mask.reshape(1, -1) if mask.dim() == 1 else mask
    if mask.shape != ids.shape:
        raise CalibrationError(
            f"calibration batch {index} (input_ids: {tuple(ids.shape)}, attention_mask: "
            f"{tuple(mask.shape)}): the mask does not match the ids; Fix: pass the "
            "tokenizer's own mask (1 = token, 0 = padding)."
        )
    if not ((mask == 0) | (mask == 1)).all() or not mask.any():
        raise CalibrationError(
            f"calibration batch {index}: attention_mask holds values other than 0 and 1, "
            "or no real token (1); Fix: pass the tokenizer's own mask (1 = token, 0 = padding)."
        )
    batch["attention_mask"] = mask


def real_tokens(batch: Batch) -> int:
    """The tokens of ``batch`` that are not padding."""
    mask = batch.get("attention_mask")
    return batch["input_ids"].numel() if mask is None else int((mask != 0).sum())


def _takes_positions(model: nn.Module) -> bool:
    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _with_positions(batch: Batch, takes_positions: bool) -> Batch:
    """``batch`` with ``position_ids`` counted along the mask when a row is not
    right-padded only (module docstring)."""
    mask = batch.get("attention_mask")
    if mask is None or "position_ids" in batch or not takes_positions:
        return batch
    real = mask != 0
    right_padded = (real.long().cummin(-1).values == real.long()).all()
    if right_padded:
        return batch
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    return {**batch, "position_ids": positions}
