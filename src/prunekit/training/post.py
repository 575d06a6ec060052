"""Pruning after training (chapter 3.6.1; Han et al. 2015, "Learning both weights and
connections"): train -> prune -> retrain -> repeat until the target.

Each of ``rounds`` rounds prunes, then retrains the survivors at ``finetune_lr`` (Han:
a tenth of the original rate), pruned weights never returning. Two ways to set how much
goes in a round:

- a final ``target`` sparsity reached geometrically, ``s_k = 1 - (1 - target)^(k/rounds)``
  (the same fraction of the surviving weights each round);
- Han's threshold ``q``: in every layer the alive weights with ``|w| < q * std`` go,
  ``std`` the standard deviation of that layer's alive weights (rounds repeat the rule).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.table import Table
from torch import nn

from prunekit.allocation import check_sparsity
from prunekit.errors import PruningError
from prunekit.layers import select_layers
from prunekit.masks import get_mask, sparsity
from prunekit.pruning import prune
from prunekit.tables import TableReport
from prunekit.zoo.data import Dataset
from prunekit.zoo.train import evaluate, train


@dataclass(frozen=True)
class Round:
    round: int
    sparsity: float
    pruned_accuracy: float
    retrained_accuracy: float


@dataclass
class IterativeReport(TableReport):
    """Accuracy after pruning and after retraining, per round, and the final layer densities."""

    dense_accuracy: float
    rounds: list[Round] = field(default_factory=list)
    kept: dict[str, float] = field(default_factory=dict)

    def table(self) -> Table:
        table = Table(title=f"iterative pruning (dense accuracy {self.dense_accuracy:.2%})")
        for col in ("round", "sparsity", "after pruning", "after retraining"):
            table.add_column(col, justify="right")
        for r in self.rounds:
            table.add_row(str(r.round), f"{r.sparsity:.2%}", f"{r.pruned_accuracy:.2%}",
                          f"{r.retrained_accuracy:.2%}")  # fmt: skip
        return table


def han_sparsities(model: nn.Module, q: float, layers: Any = None) -> dict[str, float]:
    """Per-layer sparsity after removing alive weights below ``q * std`` of each layer."""
    out = {}
    for layer in select_layers(model, layers):
        w = layer.module.weight.detach()
        mask = get_mask(layer.module)
        alive = w[mask] if mask is not None else w.flatten()
        cut = (alive.abs() < q * alive.std()).sum() if alive.numel() > 1 else 0
        out[layer.name] = 1.0 - (alive.numel() - int(cut)) / w.numel()
    return out


def iterative_pruning(
    model: nn.Module,
    data: Dataset,
    *,
    target: float | None = None,
    q: float | None = None,
    rounds: int = 5,
    epochs: int = 2,
    finetune_lr: float = 1e-4,
    criterion: str = "magnitude",
    scope: str = "global",
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    **train_kwargs: Any,
) -> IterativeReport:
    """Prune a trained ``model`` over ``rounds`` rounds, retraining ``epochs`` after each.

    Give exactly one of ``target`` (with ``criterion`` / ``scope``) or ``q`` (Han's
    per-layer ``q * std`` threshold, magnitude). Returns an :class:`IterativeReport`.
    """
    if (target is None) == (q is None):
        raise PruningError("give exactly one of target= (a sparsity) or q= (Han's q * std)")
    if target is not None:
        target = check_sparsity(target, "target")
    if not isinstance(rounds, int) or rounds < 1:
        raise PruningError(f"rounds={rounds!r} must be an int >= 1; Fix: e.g. rounds=5")

    def accuracy() -> float:
        return evaluate(model, data.x_test, data.y_test)

    report = IterativeReport(accuracy())
    for k in range(1, rounds + 1):
        if target is not None:
            goal = 1 - (1 - target) ** (k / rounds)
            prune(model, goal, criterion=criterion, scope=scope, layers=layers, exclude=exclude)
        else:
            chosen = [ly.name for ly in select_layers(model, layers, exclude)]
            prune(model, allocation=han_sparsities(model, q, chosen), layers=chosen)
        pruned = accuracy()
        train(model, data, epochs=epochs, lr=finetune_lr, seed=seed + k, progress=progress,
              **train_kwargs)  # fmt: skip
        total = sparsity(model, layers, exclude).total
        report.rounds.append(Round(k, total, pruned, accuracy()))
    with torch.no_grad():
        report.kept = {r.name: 1 - r.sparsity for r in sparsity(model, layers, exclude).layers}
    return report
