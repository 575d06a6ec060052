"""OWL: outlier-weighted layerwise sparsity (Yin et al. 2024, "Outlier Weighed Layerwise
Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity").

Per block ``l``, with the Wanda scores ``A = |W| * ||X||`` of all its Linear layers pooled
(statistics from the dense model):

    D_l = share of entries of A above M * mean(A)            (M = 5)
    D'_l = (D_l - min D) / (max D - min D) * 2 * lambda       (lambda = 0.08)
    density_l = (1 - S) + D'_l - mean(D')

so blocks with more outliers keep more weights; every Linear of a block gets the block's
sparsity ``1 - density_l``. The densities span exactly ``2 * lambda`` (max - min) and their
mean is ``1 - S``, so with equal-sized blocks the overall sparsity stays ``S``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunekit.errors import InvalidSparsityError


def outlier_ratio(scores: list[Tensor], m: float) -> float:
    """Share of all entries of ``scores`` (pooled) above ``m`` times their mean."""
    pooled = torch.cat([s.flatten() for s in scores])
    return float((pooled > m * pooled.mean()).to(torch.float64).mean())


def owl_sparsities(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsities from outlier ratios (module docstring).

    Raises:
        InvalidSparsityError: a block would fall outside [0, 1); the message gives the fix.
    """
    d = torch.tensor(ratios, dtype=torch.float64)
    spread = d.max() - d.min()
    scaled = (d - d.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(d)
    density = (1 - sparsity) + scaled - scaled.mean()
    out = (1 - density).tolist()
    if min(out) < 0 or max(out) >= 1:
        raise InvalidSparsityError(
            f"OWL with sparsity={sparsity:g} and owl_lambda={lam:g} gives block sparsities "
            f"{min(out):.3f}..{max(out):.3f}, outside [0, 1); Fix: lower owl_lambda."
        )
    return out
