"""Pruning after training (chapter 3.6.1; Han et al. 2015, "Learning both weights and
connections"): train -> prune -> retrain -> repeat until the target.

Each of ``rounds`` rounds prunes, then retrains the survivors at ``finetune_lr`` (Han:
a tenth of the original rate), pruned weights never returning. Two ways to set how much
goes in a round:

- a final ``target`` sparsity reached geometrically, ``s_k = 1 - (1 - target)^(k/rounds)``
  (the same fraction of the surviving weights each round);
- Han's threshold ``q``: in every layer the alive weights with ``|w| < q * std`` go,
  ``std`` the standard deviation of that layer's alive weights (rounds repeat the rule);
  one ``q`` for all layers, or one per layer (``{"fc1": 1.0, "fc3": 0.5}``), as Han
  tunes each layer's threshold to its sensitivity.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from rich.table import Table
from torch import nn

from prunekit import coverage
from prunekit.allocation import check_sparsity
from prunekit.criteria.base import Batches
from prunekit.errors import MissingDataError, PruningError
from prunekit.layers import select_layers
from prunekit.masks import get_mask, sparsity
from prunekit.pruner import check_reachable, check_reusable, kept_share
from prunekit.pruning import plan, prune
from prunekit.schedules import check_int, geometric
from prunekit.spec import Constraint, PruneSpec, Settings
from prunekit.tables import TableReport
from prunekit.training import checkpoint
from prunekit.training.configs import COUNT, COUNT_OR_NONE, LR, RUN
from prunekit.training.data import TrainData, source
from prunekit.training.distributed import MaskSync
from prunekit.training.loop import Evaluate, check_fit, fit

logger = logging.getLogger(__name__)


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


Q = float | Mapping[str, float]


@dataclass(frozen=True)
class IterativeArgs(Settings):
    """The numbers :func:`iterative_pruning` takes, checked at entry (``epochs``: of
    retraining after each round's prune; 0 retrains nothing)."""

    label: ClassVar[str] = "iterative_pruning"

    rounds: int
    epochs: int
    finetune_lr: float
    batch_size: int
    seed: int

    constraints: ClassVar[Mapping[str, Constraint]] = {
        "rounds": COUNT,
        "epochs": COUNT_OR_NONE,
        "finetune_lr": LR,
        **RUN,
    }


def han_sparsities(model: nn.Module, q: Q, layers: Any = None) -> dict[str, float]:
    """Per-layer sparsity after removing alive weights below ``q * std`` of each layer
    (``q[name]`` for a per-layer mapping).

    Han et al. 2015 set the threshold to "a quality parameter multiplied by the standard
    deviation of a layer's weights"; here the std is that of the layer's *surviving*
    weights. Each round's survivors all lie above the last threshold ``t``, and their std
    ``s`` grows by less than ``t`` did, so for ``q < 1`` the threshold ``q * s`` reaches a
    fixed point and the kept fraction stops falling (a pilot on LeNet-5's fc1 stalled near
    24% kept at ``q = 0.6``): raise ``q`` for more sparsity.
    """
    chosen = select_layers(model, layers)
    missing = [ly.name for ly in chosen if isinstance(q, Mapping) and ly.name not in q]
    if missing:
        raise PruningError(
            f"q gives no threshold for layers {missing}; Fix: add them to q, or pass "
            "layers=list(q)."
        )
    out = {}
    for layer in chosen:
        w = layer.module.weight.detach()
        mask = get_mask(layer.module)
        alive = w[mask] if mask is not None else w.flatten()
        q_l = q[layer.name] if isinstance(q, Mapping) else q
        cut = (alive.abs() < q_l * alive.std()).sum() if alive.numel() > 1 else 0
        out[layer.name] = 1.0 - (alive.numel() - int(cut)) / w.numel()
    return out


def _check_q(q: Q, chosen: list[str], dense: Mapping[str, coverage.Dense]) -> None:
    """Every ``q`` a number > 0, and a mapping's keys exactly the pruned layers (``dense``:
    the selected layers kept dense by default, named with their flag when ``q`` gives one)."""
    values = list(q.values()) if isinstance(q, Mapping) else [q]
    if not values or any(
        isinstance(v, bool) or not isinstance(v, int | float) or not v > 0 for v in values
    ):
        raise PruningError(f"q={q!r} must be a number > 0 (a multiple of std), or a mapping "
                           "{layer: number > 0}; Fix: e.g. q=0.7.")  # fmt: skip
    if isinstance(q, Mapping) and set(q) != set(chosen):
        named = [n for n in q if n in dense]
        why = "".join(f"; layer {n!r} is kept dense by default as {dense[n].role}" for n in named)
        flags = " / ".join(dict.fromkeys(dense[n].fix for n in named))
        them = ", ".join(map(repr, named))
        fix = f"{flags} to prune {them}, or drop {them} from q" if named else (
            "one q per pruned layer (layers= defaults to the mapping's keys)")  # fmt: skip
        raise PruningError(
            f"q gives thresholds for {sorted(q)} but the pruned layers are {chosen}{why}; "
            f"Fix: {fix}."
        )


def _check(
    model: nn.Module,
    target: float | None,
    q: Q | None,
    rounds: int,
    spec: PruneSpec,
    calibration: Batches | None,
) -> float | None:
    """``target`` as a float, or an error before anything is touched: planning a prune of
    the model to ``target`` (:func:`prunekit.pruning.plan`) checks the layers and the
    calibration data the criterion needs."""
    if (target is None) == (q is None):
        raise PruningError(
            f"target={target!r}, q={q!r}: give exactly one of target= (a sparsity) or q= "
            "(Han's q * std threshold); Fix: e.g. target=0.9 or q=0.7."
        )
    chosen, dense = coverage.select(model, spec.layers, spec.exclude,
                                    include_output=spec.include_output,
                                    include_embeddings=spec.include_embeddings)  # fmt: skip
    if q is not None:
        _check_q(q, [ly.name for ly in chosen], dense)
        return None
    target = check_sparsity(target, "target")
    check_reachable(target, 1 - kept_share((ly.module, ly.weight.numel()) for ly in chosen))
    check_reusable(calibration, "calibration")
    try:
        plan(model, target, spec).check_data(calibration)
    except MissingDataError as err:
        raise MissingDataError(
            f"{err} (iterative_pruning takes them as calibration=, e.g. "
            "calibration=pk.zoo.calibration_batches(data))"
        ) from err
    return target


def _training(
    epochs: int, lr: float, progress: bool, sync: bool, train_kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """The retraining settings iterative pruning sets itself; ``train_kwargs`` may not."""
    training = dict(epochs=epochs, lr=lr, progress=progress, sync=sync)
    clash = sorted(set(training) & set(train_kwargs))
    if clash:
        raise PruningError(
            f"train_kwargs {clash} are set by iterative_pruning itself; Fix: pass epochs= and "
            "finetune_lr= (and progress=) as its own arguments."
        )
    return training


def iterative_pruning(
    model: nn.Module,
    data: TrainData,
    *,
    target: float | None = None,
    q: Q | None = None,
    rounds: int = 5,
    epochs: int = 2,
    finetune_lr: float = 1e-4,
    criterion: str = "magnitude",
    scope: str = "local",
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    include_output: bool = False,
    include_embeddings: bool = False,
    calibration: Batches | None = None,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    distributed: bool | None = None,
    evaluate: Evaluate | None = None,
    **train_kwargs: Any,
) -> IterativeReport:
    """Prune a trained ``model`` over ``rounds`` rounds, retraining ``epochs`` after each.

    Give exactly one of ``target`` (with ``criterion`` / ``scope``; data-driven criteria
    take ``calibration`` batches) or ``q`` (Han's per-layer ``q * std`` threshold,
    magnitude; a ``{layer: q}`` mapping gives each layer its own, and is then the default
    ``layers``); the output layer and the embeddings stay dense unless ``include_output``
    / ``include_embeddings`` (:mod:`prunekit.coverage`). Retraining runs
    :func:`~prunekit.training.loop.fit` on ``data``, a
    dataset in memory (batches of ``batch_size`` drawn from ``seed + k`` in round ``k``)
    or any re-iterable of batches (:mod:`~prunekit.training.data`), with ``train_kwargs``
    (``optimizer``, ``weight_decay``, ``step``, ``loss_fn``, ...). ``evaluate(model)``
    gives the accuracies reported (default: on the test split of ``data``). Returns an
    :class:`IterativeReport`.

    ``checkpoint_dir`` and ``distributed`` work as for :func:`~prunekit.training.lottery`:
    an atomic checkpoint after every round, from which the same call resumes to exactly
    the masks and weights of an uninterrupted run; under ``torch.distributed`` data-parallel
    retraining (each rank takes its share of every batch of ``batch_size``), rank 0's
    masks on every rank after every prune, checkpoints written by rank 0 only.

    Raises:
        PruningError: a subclass for any bad argument (a ``target`` below the sparsity the
            selected layers already have, a data-driven criterion without
            ``calibration``, ...), a corrupted checkpoint or one of another model or run,
            ``distributed=True`` without a process group; the model is left unchanged.
    """
    check_int("rounds", rounds, 1, "e.g. rounds=5")
    IterativeArgs(rounds, epochs, finetune_lr, batch_size, seed)
    hook = MaskSync.resolve(distributed)
    sync = hook is not None
    if isinstance(q, Mapping) and layers is None:
        layers = list(q)
    ends = dict(include_output=include_output, include_embeddings=include_embeddings)
    spec = PruneSpec(criterion=criterion, scope=scope, layers=layers, exclude=exclude, **ends)
    src = source(data, batch_size, evaluate)
    target = _check(model, target, q, rounds, spec, calibration)
    src.check(sync)
    training = _training(epochs, finetune_lr, progress, sync, train_kwargs)
    check_fit(model, src.batches(seed), **training, **train_kwargs)
    config = dict(target=target, q=q, rounds=rounds, epochs=epochs, finetune_lr=finetune_lr,
                  batch_size=batch_size, seed=seed, criterion=criterion, scope=scope,
                  layers=layers, exclude=exclude, **ends, **train_kwargs)  # fmt: skip
    identity = checkpoint.identity("iterative_pruning", model, data, config)

    def accuracy() -> float:
        return src.evaluate(model)

    saved = checkpoint.resume(checkpoint_dir, identity, model, sync=sync)
    if saved is None:
        start, report = 1, IterativeReport(accuracy())
    else:
        rounds_done = [Round(**r) for r in saved.state["rounds"]]
        start, report = saved.round + 1, IterativeReport(saved.state["dense"], rounds_done)
    for k in range(start, rounds + 1):
        if target is not None:
            prune(model, geometric(target, k / rounds), spec=spec, data=calibration)
        else:
            chosen = [ly.name for ly in coverage.select(model, layers, exclude, **ends)[0]]
            alloc = han_sparsities(model, q, chosen)
            prune(model, spec=PruneSpec(allocation=alloc, layers=chosen, **ends))
        if hook is not None:
            hook(model)
        pruned = accuracy()
        fit(model, src.batches(seed + k), **training, **train_kwargs)
        total = sparsity(model, layers, exclude, **ends).total
        report.rounds.append(Round(k, total, pruned, accuracy()))
        logger.info("iterative pruning round %d of %d: sparsity %.2f%%, accuracy %.4f", k,
                    rounds, 100 * total, report.rounds[-1].retrained_accuracy)  # fmt: skip
        if checkpoint_dir is not None:
            state = {"dense": report.dense_accuracy, "rounds": [vars(r) for r in report.rounds]}
            checkpoint.save_round(checkpoint_dir, k, model, identity, state, sync=sync)
    with torch.no_grad():
        kept = sparsity(model, layers, exclude, **ends).layers
        report.kept = {r.name: 1 - r.sparsity for r in kept}
    return report
