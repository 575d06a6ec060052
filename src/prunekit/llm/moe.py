"""Pruning fused MoE experts (:mod:`prunekit.llm.experts`) one expert matrix at a time.

Every ``gate_up_proj[e]`` and ``down_proj[e]`` is pruned by the run's method at the
block's target, from the statistics of the tokens routed to expert ``e``
(:func:`prunekit.llm.methods.solve`). **Fallback**: an expert that received no
calibration token has no statistics; it is pruned by magnitude (one threshold over each
of its two matrices, or N of every M by ``|W|`` for an N:M target) and reported in
:attr:`LLMPruneReport.notes <prunekit.llm.report.LLMPruneReport.notes>`.

The zeros (and SparseGPT's / ALPS's updated weights) are written into the 3-D parameter
directly: prunekit's masks hold whole ``weight`` tensors of Linear-like layers, so expert
matrices are baked even with ``keep_masks=True``.
"""

from __future__ import annotations

import torch

from prunekit import criteria
from prunekit.errors import IncompatibleLayerError, InvalidWeightError
from prunekit.granularity import NM
from prunekit.llm.engine import LayerStats
from prunekit.llm.experts import PARAMS, FusedExperts
from prunekit.llm.methods import Method, Target, solve

NO_TOKENS = (
    "no calibration token was routed to this expert: pruned by magnitude instead "
    "(Fix: more or longer calibration samples)"
)


def prune_experts(
    method: Method, experts: list[FusedExperts], target: Target, stats: dict[str, LayerStats]
) -> list[tuple[str, str]]:
    """Prune every expert matrix of ``experts`` in place; ``(key, note)`` per matrix that
    fell back to magnitude (module docstring)."""
    notes = []
    for ex in experts:
        for key, param, e in ex.matrices():
            chosen = method
            if stats[key].tokens == 0:
                chosen = criteria.get("magnitude", units="rows")
                notes.append((key, NO_TOKENS))
            new_weight, keep = solve(chosen, param[e].detach(), target, stats[key], key)
            with torch.no_grad():
                if new_weight is not None:
                    param[e].copy_(new_weight.to(param.dtype))
                param[e].masked_fill_(~keep, 0)
    return notes


def check_experts(experts: FusedExperts, target: Target) -> None:
    """Finite floating-point expert weights, whose inputs split into N:M groups.

    Raises:
        InvalidWeightError: NaN / inf or a non-floating dtype.
        IncompatibleLayerError: an N:M ``M`` that does not divide an expert's input size.
    """
    for param in PARAMS:
        tensor = getattr(experts.module, param).detach()
        name = f"{experts.name}.{param}"
        if not tensor.dtype.is_floating_point or not bool(tensor.isfinite().all()):
            raise InvalidWeightError(
                f"expert tensor {name!r} ({tensor.dtype}) holds NaN / inf or is not floating "
                "point; Fix: load the checkpoint again, or repair those weights first."
            )
        if isinstance(target, NM) and tensor.shape[-1] % target.m:
            raise IncompatibleLayerError(
                f"expert tensor {name!r}: its {tensor.shape[-1]} inputs do not split into "
                f"groups of M={target.m} ({target.name}); Fix: choose an M that divides it."
            )


def zeros_fraction(tensor: torch.Tensor) -> float:
    """Share of exact zeros in ``tensor``."""
    return float((tensor == 0).to(torch.float64).mean()) if tensor.numel() else 0.0
