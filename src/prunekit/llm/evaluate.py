"""Measuring what pruning cost: perplexity for causal LMs, embedding similarity for encoders.

Perplexities are comparable only under one protocol (text, sequence length, calibration
source and sample count, seed: REFERENCES.md); print it next to every number.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.errors import CalibrationError
from prunekit.inputs import call_eval


def perplexity(model: nn.Module, ids: Tensor, *, seq_len: int = 256, batch_size: int = 8) -> float:
    """``exp`` of the mean next-token loss over non-overlapping ``seq_len`` windows of ``ids``.

    ``ids`` is 1-D; the tail shorter than ``seq_len`` is dropped. Each window predicts its
    last ``seq_len - 1`` tokens from the ones before (no context carried across windows).
    """
    windows = len(ids) // seq_len
    if windows == 0:
        raise CalibrationError(
            f"{len(ids)} evaluation tokens is less than one window of seq_len={seq_len}; "
            "Fix: pass more text or a shorter seq_len."
        )
    rows = ids[: windows * seq_len].reshape(windows, seq_len)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for chunk in rows.split(batch_size):
        chunk = chunk.to(device)
        logits = call_eval(model, {"input_ids": chunk}).logits[:, :-1].float()
        loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
        total += float(loss)
        count += chunk[:, 1:].numel()
    return math.exp(total / count)


def mean_pooled(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Sentence embeddings: the encoder's last hidden states (eval mode) averaged over real
    tokens (``attention_mask``), as sentence-transformers' mean pooling does."""
    hidden = call_eval(model, batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def embedding_similarity(
    model: nn.Module, reference: nn.Module, batch: dict[str, Tensor]
) -> Tensor:
    """Cosine similarity, per sentence, of ``model``'s mean-pooled embeddings to ``reference``'s."""
    return F.cosine_similarity(mean_pooled(model, batch), mean_pooled(reference, batch), dim=-1)
