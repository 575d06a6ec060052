"""Second-order (Optimal Brain Surgeon) statistics, as SparseGPT uses them
(Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot"; OBS: Hassibi & Stork 1993).

For a layer ``y = W x`` and calibration inputs ``X`` (``n`` tokens), the layer-wise
reconstruction loss ``||W X - W' X||^2`` has Hessian ``H = (2/n) X X^T`` (``in x in``).
Removing weight ``w_ij`` costs, to second order and with the best compensating update of
the rest of row ``i``, ``w_ij^2 / [H^-1]_jj`` (the OBS saliency; SparseGPT ranks by
``w_ij^2 / [H^-1]_jj^2`` because it reads ``[H^-1]_jj`` off the Cholesky factor, whose
diagonal is its square root).

These are the statistics only. SparseGPT itself is not a :class:`~prunekit.criteria.Criterion`:
it chooses the mask column block by column block *while updating the remaining weights*,
so no score computed once from the dense weight reproduces it. The sweep lives in
:mod:`prunekit.llm.sparsegpt`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunekit.criteria.activation import flat_inputs


class HessianAccumulator:
    """Running ``H = (2/n) sum_t x_t x_t^T`` over calibration tokens, in fp32."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sum_xxt = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        rows = flat_inputs(x)
        self.sum_xxt.addmm_(rows.T, rows)
        self.tokens += rows.shape[0]

    @property
    def scale(self) -> float:
        """``2 / n`` (``n`` at least 1: no token gives ``H = 0``)."""
        return 2 / max(self.tokens, 1)

    @property
    def hessian(self) -> Tensor:
        """``H``, a new tensor."""
        return self.sum_xxt * self.scale

    def hessian_in_place(self) -> Tensor:
        """``H`` scaled in place in ``sum_xxt`` and returned (no second ``in x in`` matrix);
        the accumulator is spent: add no more tokens and read no other Hessian from it."""
        return self.sum_xxt.mul_(self.scale)


def dead_inputs(hessian: Tensor) -> Tensor:
    """Bool ``(in,)``: inputs that were exactly zero on every calibration token (``H_jj = 0``)."""
    return torch.diagonal(hessian) == 0


def inverse_hessian_cholesky(
    hessian: Tensor, damping: float = 0.01, *, overwrite: bool = False
) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + lambda I)^-1`` with dead inputs made harmless.

    ``lambda = damping * mean(diag H)`` (1% in the paper); dead inputs (``H_jj = 0``) get
    ``H_jj = 1`` so that ``H`` stays invertible (their weights should be zeroed by the
    caller: they never affect the output). Computed in fp32 (float64 on a second try
    when either fp32 Cholesky fails). ``U^T U = H^-1`` and ``U_jj^2 = [H^-1]_jj`` once the
    earlier columns are eliminated, which is what the sweep needs.

    Memory: two ``in x in`` fp32 matrices, the damped ``H`` and one buffer every later
    step writes into (``out=``; the same LAPACK calls as without it, so the same bits).
    ``overwrite``: ``hessian`` is the caller's to give up; when it is fp32 it is damped in
    place instead of copied (it then holds the damped ``H``; the result is the same).
    """
    if overwrite and hessian.dtype == torch.float32:
        h = hessian
    else:
        h = hessian.to(torch.float32, copy=True)
    dead = dead_inputs(h)
    h[dead, dead] = 1.0
    h.diagonal().add_(damping * torch.diagonal(h).mean())
    try:
        factor = torch.linalg.cholesky(h)
        torch.cholesky_inverse(factor, out=factor)
        return torch.linalg.cholesky(factor, upper=True, out=factor)
    except torch.linalg.LinAlgError:  # ``h`` is intact: retry from it in float64
        h64 = h.to(torch.float64)
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(h64))
        return torch.linalg.cholesky(inverse, upper=True).to(torch.float32)


def obs_saliency(weight: Tensor, hinv_diag: Tensor) -> Tensor:
    """SparseGPT's selection score ``w^2 / d^2`` with ``d`` the Cholesky diagonal per column."""
    return weight.square() / hinv_diag.reshape(1, -1).square()
