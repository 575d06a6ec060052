"""Group importance: one score per group, aggregated over every member of the group.

For group ``S`` with parameter slices ``w_S`` (the positions of every member parameter;
buffers such as BatchNorm running statistics are not scored):

==========  ==============================================================================
l1          ``sum |w_S|`` (Li et al. 2017, filter L1 norm, over all coupled tensors)
l2          ``sqrt(sum w_S^2)``
taylor      ``mean over batches of (sum w_S * g_S)^2``: the first-order change of the loss
            when the group is removed (Molchanov et al. 2019); needs ``data``
bn_scale    ``sum |gamma_S|`` of the BatchNorm scales in the group (Liu et al. 2017,
            network slimming); families without BatchNorm are not pruned
fpgm        ``sum_j ||v_S - v_j||_2`` over the family's groups ``j`` (He et al. 2019):
            groups nearest the geometric median are redundant and go first
lamp        ``||w_S||^2 / sum_{j: ||w_j|| >= ||w_S||} ||w_j||^2`` within the family
            (Lee et al. 2021); comparable across families without normalisation
random      uniform, seeded per family
==========  ==============================================================================

A custom criterion is a callable ``f(vectors) -> scores``: ``vectors`` is the list of a
family's group vectors (every member parameter slice, flattened and concatenated); it
returns one score per group, higher meaning more important.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.errors import MissingDataError, UnknownChoiceError
from prunekit.inputs import call
from prunekit.structured.graph import DependencyGraph, Family, Group, owner

StructuredCriterion = str | Callable[[list[Tensor]], Tensor]
CRITERIA = ("l1", "l2", "taylor", "bn_scale", "fpgm", "lamp", "random")
NORMALIZED = ("lamp",)  # scores already comparable across families


def _params(model: nn.Module) -> dict[str, Tensor]:
    return dict(model.named_parameters(remove_duplicate=False))


def _slices(group: Group, params: dict[str, Tensor], f: Callable[[Tensor], Tensor]) -> list:
    """``f`` of every member parameter slice of ``group`` (buffers are skipped)."""
    return [
        f(params[m.name].detach().index_select(m.dim, m.index))
        for m in group.members
        if m.name in params
    ]


def _vector(group: Group, params: dict[str, Tensor]) -> Tensor:
    parts = _slices(group, params, lambda s: s.reshape(-1))
    return torch.cat(parts) if parts else torch.zeros(1)


def _powers(family: Family, params: dict[str, Tensor], p: int) -> Tensor:
    """``sum |w|^p`` over every member parameter position of each group of ``family``."""
    total = torch.zeros(len(family.groups), dtype=torch.float64)
    for k, member in enumerate(family.groups[0].members):
        if member.name not in params:
            continue
        w = params[member.name].detach()
        per_position = w.abs().pow(p).movedim(member.dim, 0).reshape(w.shape[member.dim], -1)
        per_position = per_position.sum(1, dtype=torch.float64)
        total += torch.stack([per_position[g.members[k].index].sum() for g in family.groups])
    return total.float()


def _bn_scale(family: Family, params: dict[str, Tensor], bns: set[str]) -> Tensor | None:
    """Sum of ``|gamma|`` of the BatchNorm weights (modules ``bns``) in each group."""
    if not any(
        owner(m.name) in bns and m.name.endswith(".weight") for m in family.groups[0].members
    ):
        return None
    return torch.tensor([
        sum(float(params[m.name].detach()[m.index].abs().sum()) for m in g.members
            if m.name.endswith(".weight") and owner(m.name) in bns)
        for g in family.groups
    ])  # fmt: skip


def _lamp(l2sq: Tensor) -> Tensor:
    order = torch.argsort(l2sq, descending=True, stable=True)
    suffix = torch.cumsum(l2sq[order], 0)  # sum over groups at least as large
    scores = torch.empty_like(l2sq)
    scores[order] = l2sq[order] / suffix.clamp_min(1e-30)
    return scores


def _taylor(
    model: nn.Module,
    graph: DependencyGraph,
    data: Iterable[Any] | None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
) -> dict[str, Tensor]:
    if data is None:
        raise MissingDataError(
            "criterion 'taylor' needs batches; Fix: pass data=[(inputs, targets), ...] and, "
            "unless it is cross-entropy, loss_fn."
        )
    loss_fn = loss_fn or F.cross_entropy
    params = _params(model)
    names = sorted({m.name for g in graph.groups() for m in g.members if m.name in params})
    totals = {f.name: torch.zeros(len(f.groups)) for f in graph.families}
    was_training, batches = model.training, 0
    model.eval()
    try:
        for inputs, targets in data:
            grads = torch.autograd.grad(
                loss_fn(call(model, inputs), targets),
                [params[n] for n in names],
                allow_unused=True,
            )
            wg = {
                n: params[n].detach() * (torch.zeros_like(params[n]) if g is None else g)
                for n, g in zip(names, grads, strict=True)
            }
            for fam in graph.families:
                totals[fam.name] += torch.tensor(
                    [
                        float(
                            sum(
                                wg[m.name].index_select(m.dim, m.index).sum()
                                for m in g.members
                                if m.name in wg
                            )
                        )
                        ** 2
                        for g in fam.groups
                    ]
                )
            batches += 1
    finally:
        model.train(was_training)
    if not batches:
        raise MissingDataError("criterion 'taylor' got an empty data iterable")
    return {name: total / batches for name, total in totals.items()}


def score(
    model: nn.Module,
    graph: DependencyGraph,
    criterion: StructuredCriterion = "l2",
    *,
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    seed: int = 0,
) -> dict[str, Tensor | None]:
    """Scores per family (``None``: the criterion cannot rank it, e.g. no BatchNorm)."""
    if isinstance(criterion, str) and criterion not in CRITERIA:
        raise UnknownChoiceError("structured criterion", criterion, list(CRITERIA))
    if criterion == "taylor":
        return dict(_taylor(model, graph, data, loss_fn))
    params = _params(model)
    bns = {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    out: dict[str, Tensor | None] = {}
    for fam in graph.families:
        if callable(criterion):
            out[fam.name] = torch.as_tensor(criterion([_vector(g, params) for g in fam.groups]))
        elif criterion == "bn_scale":
            out[fam.name] = _bn_scale(fam, params, bns)
        elif criterion == "random":
            gen = torch.Generator().manual_seed(seed + zlib.crc32(fam.name.encode()))
            out[fam.name] = torch.rand(len(fam.groups), generator=gen)
        elif criterion == "fpgm":
            vectors = [_vector(g, params) for g in fam.groups]
            width = max(v.numel() for v in vectors)
            stacked = torch.stack([F.pad(v, (0, width - v.numel())) for v in vectors])
            out[fam.name] = torch.cdist(stacked[None], stacked[None])[0].sum(1)
        else:
            power = 1 if criterion == "l1" else 2
            values = _powers(fam, params, power)
            out[fam.name] = {"l1": values, "l2": values.sqrt(), "lamp": _lamp(values)}[criterion]
    return out
