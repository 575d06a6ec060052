"""The SparseGPT sweep (Frantar & Alistarh 2023), implemented from the paper's definition.

For one layer with canonical weight ``W`` (``out x in``) and Hessian ``H = (2/n) X X^T``:

1. dead inputs (``H_jj = 0``) get ``W[:, j] = 0``; ``U`` = upper Cholesky factor of
   ``(H + 0.01 mean(diag H) I)^-1``
   (:func:`~prunekit.criteria.second_order.inverse_hessian_cholesky`);
2. sweep the columns in blocks of 128. Unstructured: at each block start, prune the
   ``w^2 / U_jj^2``-lowest entries of the ``out x 128`` block (the count is cumulative over
   blocks, so the layer ends at exactly ``round(sparsity * numel)`` zeros). N:M: at every
   column ``j`` with ``j mod M == 0``, keep per row the N best of columns ``j..j+M-1``,
   scored on the already-updated weights;
3. for each column: ``err = (w_j - q_j) / U_jj`` (``q_j`` = ``w_j`` with pruned entries
   zeroed); update the block's later columns by ``-err * U[j, j:]``; after the block,
   apply the deferred (lazy batch) update ``-Err @ U[block, later]`` to all later columns.

Everything runs in fp32. Memory beyond the weight: its fp32 working copy (none with
``in_place`` on an fp32 weight) and ``U``, and
``H`` while ``U`` is computed when the caller hands ``H`` over (``overwrite=True``: it is
damped in place instead of copied). The *kept* weights change (that is the point: they
compensate for the pruned ones), so the result is a new dense weight with zeros at pruned
positions and a mask; the caller writes both into the model.

Not a :class:`~prunekit.criteria.Criterion` because the mask is chosen during the sweep on
weights the sweep itself updates; it has no fixed per-weight score.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunekit.criteria.second_order import dead_inputs, inverse_hessian_cholesky, obs_saliency
from prunekit.granularity import NM, nm_mask_topn

BLOCK_SIZE = 128


def _block_prune_count(sparsity: float, rows: int, i1: int, i2: int) -> int:
    return round(sparsity * rows * i2) - round(sparsity * rows * i1)


def sparsegpt(
    weight: Tensor,
    hessian: Tensor,
    target: float | NM,
    *,
    block_size: int = BLOCK_SIZE,
    damping: float = 0.01,
    overwrite: bool = False,
    in_place: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(new_weight, keep_mask)`` for a canonical ``(out, in)`` weight (see module docstring).

    ``target`` is an unstructured sparsity in [0, 1) or an :class:`~prunekit.granularity.NM`.
    ``new_weight`` is fp32, zero wherever ``keep_mask`` is False. ``overwrite``: the fp32
    ``hessian`` is the caller's to give up; it is damped in place (same ``U``, less memory).
    ``in_place``: so is ``weight``; when it is fp32 and contiguous the sweep runs in its
    storage and ``new_weight`` is ``weight`` (same bits, one weight-sized copy less).
    """
    w = weight.detach()
    if not (in_place and w.dtype == torch.float32 and w.is_contiguous()):
        w = w.to(torch.float32).clone(memory_format=torch.contiguous_format)
    rows, cols = w.shape
    dead = dead_inputs(hessian)
    w[:, dead] = 0.0
    u = inverse_hessian_cholesky(hessian, damping, overwrite=overwrite)
    del hessian
    nm = target if isinstance(target, NM) else None
    if nm is not None:
        block_size = max(nm.m, block_size - block_size % nm.m)
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        d1 = torch.diagonal(u1)
        err1 = torch.zeros_like(w1)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)
        if nm is None:
            n_prune = _block_prune_count(float(target), rows, i1, i2)
            order = torch.sort(obs_saliency(w1, d1).flatten(), stable=True).indices[:n_prune]
            mask1.view(-1)[order] = True
        for i in range(i2 - i1):
            if nm is not None and i % nm.m == 0:
                scores = obs_saliency(w1[:, i : i + nm.m], d1[i : i + nm.m])
                mask1[:, i : i + nm.m] = ~nm_mask_topn(scores, nm.n, nm.m)
            col = w1[:, i]
            q = col.masked_fill(mask1[:, i], 0.0)
            err = (col - q) / d1[i]
            w1[:, i:] -= err.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        pruned[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w, ~pruned
