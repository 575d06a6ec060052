"""ALPS: one-shot pruning of a layer by ADMM with a penalty schedule, then a PCG refit.

Meng, Behdin, Wang & Mazumder 2024, "ALPS: Improved Optimization for Highly Sparse One-Shot
Pruning for Large Language Models" (NeurIPS 2024). Implemented from the paper's description.

For one layer with canonical weight ``W0`` (``out x in``) and ``H = (2/n) X X^T`` from the
engine (the same statistics SparseGPT uses, with the same 1% dampening and dead-input
handling), ALPS minimises the layer's reconstruction error over sparse weights::

    min_W  tr((W - W0) H (W - W0)^T)   s.t.  W in S   (k nonzeros per layer, or N of every M
                                                       consecutive inputs of each row)

1. **Normalise**: ``H <- S^-1 H S^-1``, ``W <- W S`` with ``S = diag(sqrt(H_jj))`` (the
   problem and the sparsity set are unchanged; ``H`` gets a unit diagonal, so one ``rho``
   fits every layer). One float32 eigendecomposition ``H = Q diag(lambda) Q^T`` (the
   damped ``H`` is well conditioned; the refit below uses ``H`` itself) serves every ``rho``.
2. **ADMM** with the split ``W = D`` and dual ``V``; from ``D = P_S(W0)``, ``V = 0``::

       W <- (W0 H - V + rho D) Q diag(1 / (lambda + rho)) Q^T   # (H + rho I) W^T = ...
       D <- P_S(W + V / rho)       # top-k of |.| per layer, or top-N of every M per row
       V <- V + rho (W - D)

   Every ``update_every`` iterations the support of ``D`` is compared with the previous
   check: unchanged ends the loop; otherwise ``rho <- growth * rho`` (the paper's
   increasing-penalty scheme, which makes ADMM converge on this non-convex set).
3. **Refit** on the final support ``K`` by conjugate gradients, every row at once:
   ``min tr((W - W0) H (W - W0)^T)`` with ``W`` zero off ``K``, i.e. ``H_KK w_K = (H w0)_K``
   per row. CG in the normalised coordinates is exactly PCG with the Jacobi (diagonal)
   preconditioner in the original ones.

All iterations run in float32 on the weight's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from prunekit.criteria.second_order import dead_inputs
from prunekit.errors import PruningError, UsageError
from prunekit.granularity import NM
from prunekit.spec import Constraint, Settings, integer

WORK = torch.float32  # the ADMM and CG iterations
DECOMPOSE = torch.float32  # the eigendecomposition: H is damped, so fp32 suffices (3x faster)
CG_TOLERANCE = 1e-6  # stop CG when every row's squared residual fell by this factor


def _usage(constraint: Constraint) -> Constraint:
    """``constraint`` raising :class:`UsageError` (a bad setting of the user's)."""

    def check(value: Any) -> Any:
        try:
            return constraint.check(value)
        except UsageError:
            raise
        except PruningError as err:
            raise UsageError(str(err)) from None

    return Constraint(check, constraint.text)


def _number(low: float, high: float = math.inf, *, open_low: bool = True) -> Constraint:
    """A finite real number (not a bool) above ``low`` (or at least, when ``open_low`` is
    False) and at most ``high``."""

    def check(value: Any) -> float:
        real = isinstance(value, int | float) and not isinstance(value, bool)
        above = real and (value > low if open_low else value >= low)
        if not (above and math.isfinite(value) and value <= high):
            raise UsageError(f"is not a number in {text}")
        return float(value)

    text = f"{'(' if open_low else '['}{low}, {high}{']' if math.isfinite(high) else ')'}"
    return Constraint(check, f"a number in {text}")


@dataclass(frozen=True, repr=False)
class ALPS(Settings):
    """Settings of :func:`alps`; ``pk.llm.prune(model, ids, method=ALPS(iterations=100))``
    (``method="alps"`` takes these defaults). A bad value is a :class:`UsageError`.

    Attributes:
        rho: initial ADMM penalty, on the unit-diagonal (normalised) Hessian.
        growth: ``rho`` is multiplied by this at every support check that saw a change.
        update_every: ADMM iterations between support checks.
        iterations: at most this many ADMM iterations per layer.
        cg_iterations: conjugate-gradient steps of the final refit (0: no refit).
        damping: ``H + damping * mean(diag H) I``, as SparseGPT.
    """

    rho: float = 0.1
    growth: float = 1.3
    update_every: int = 3
    iterations: int = 60
    cg_iterations: int = 50
    damping: float = 0.01

    constraints: ClassVar[Mapping[str, Constraint]] = {
        "rho": _number(0.0),
        "growth": _number(1.0, 100.0),
        "update_every": _usage(integer(1)),
        "iterations": _usage(integer(1)),
        "cg_iterations": _usage(integer(0)),
        "damping": _number(0.0, open_low=False),
    }

    def __repr__(self) -> str:
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != f.default
        ]
        return f"alps({', '.join(changed)})" if changed else "alps"


def _normalised(hessian: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """``(S^-1 H_d S^-1, diag S)`` for the damped ``H_d`` (dead inputs get ``H_jj = 1``)."""
    h = hessian.to(WORK).clone()
    dead = dead_inputs(h)
    h[dead, dead] = 1.0
    h.diagonal().add_(damping * torch.diagonal(h).mean())
    scale = torch.diagonal(h).sqrt()
    return h / scale.unsqueeze(0) / scale.unsqueeze(1), scale


def _projector(target: float | NM) -> Callable[[Tensor], Tensor]:
    """``x -> keep-mask`` of the Euclidean projection onto the sparsity set."""
    if isinstance(target, NM):
        return lambda x: target.keep(x.abs())

    def top_k(x: Tensor) -> Tensor:  # a partial selection: ~10x faster than a stable sort
        kept = x.numel() - round(target * x.numel())
        keep = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
        keep[torch.topk(x.abs().flatten(), kept, sorted=False).indices] = True
        return keep.reshape(x.shape)

    return top_k


def _admm(w0: Tensor, h: Tensor, target: float | NM, settings: ALPS) -> tuple[Tensor, Tensor]:
    """``(W, keep)``: the ADMM iterate and the support of ``D`` (module docstring, step 2)."""
    evals, evecs = torch.linalg.eigh(h.to(DECOMPOSE))
    evals, q = evals.to(WORK), evecs.to(WORK)
    project = _projector(target)
    hw0 = w0 @ h
    keep = project(w0)
    d, v, w = w0 * keep, torch.zeros_like(w0), w0
    checked, rho = keep, settings.rho
    for step in range(1, settings.iterations + 1):
        w = ((hw0 - v + rho * d) @ q / (evals + rho)) @ q.T
        shifted = w + v / rho
        keep = project(shifted)
        d = shifted * keep
        v += rho * (w - d)
        if step % settings.update_every == 0:
            if torch.equal(keep, checked):
                break
            checked, rho = keep, rho * settings.growth
    return w, keep


def _refit(w0: Tensor, h: Tensor, keep: Tensor, start: Tensor, steps: int) -> Tensor:
    """CG on ``H_KK x_K = (H w0)_K`` for every row at once, from ``start`` (step 3)."""
    x = start * keep
    r = ((w0 - x) @ h) * keep
    p, rr = r.clone(), r.square().sum(1)
    stop = CG_TOLERANCE * rr
    for _ in range(steps):
        if bool((rr <= stop).all()):
            break
        ap = (p @ h) * keep
        pap = (p * ap).sum(1)
        alpha = torch.where(pap > 0, rr / pap.clamp(min=torch.finfo(WORK).tiny), 0.0)
        x += alpha.unsqueeze(1) * p
        r -= alpha.unsqueeze(1) * ap
        new = r.square().sum(1)
        beta = torch.where(rr > 0, new / rr.clamp(min=torch.finfo(WORK).tiny), 0.0)
        p, rr = r + beta.unsqueeze(1) * p, new
    return x * keep


def alps(
    weight: Tensor, hessian: Tensor, target: float | NM, settings: ALPS | None = None
) -> tuple[Tensor, Tensor]:
    """``(new_weight, keep_mask)`` for a canonical ``(out, in)`` weight (module docstring).

    ``target`` is an unstructured sparsity in [0, 1) (exactly ``round(target * numel)``
    zeros in the layer) or an :class:`~prunekit.granularity.NM` (N kept of every M
    consecutive inputs of each row). ``new_weight`` is float32, zero wherever ``keep_mask``
    is False; the kept weights are refitted to the dense layer's outputs.
    """
    settings = settings or ALPS()
    h, scale = _normalised(hessian, settings.damping)
    w0 = weight.detach().to(WORK) * scale
    w0[:, dead_inputs(hessian)] = 0.0
    w, keep = _admm(w0, h, target, settings)
    w = _refit(w0, h, keep, w, settings.cg_iterations)
    return w / scale, keep
