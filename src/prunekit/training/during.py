"""Pruning during training (chapter 3.6): soft filter pruning and network slimming, both
ending in a physically smaller model (:func:`prunekit.shrink`).

- **Soft filter pruning** (He et al. 2018, "Soft Filter Pruning for Accelerating Deep
  Convolutional Neural Networks"): after every epoch, in every conv family, zero the
  ``floor(P * n)`` filter groups with the smallest ``||w_S||_2`` (or FPGM score
  ``sum_j ||v_S - v_j||_2``). Nothing is masked: zeroed filters keep receiving gradients
  and may regrow. After the last epoch the zeroed groups are removed.
- **Network slimming** (Liu et al. 2017, "Learning Efficient Convolutional Networks
  through Network Slimming"): train on ``loss + lambda * sum_BN |gamma|``, remove the
  fraction ``P`` of channels with the smallest ``|gamma|`` under one global ranking, then
  fine-tune.

Groups are the structured engine's coupled channel groups (conv filter, its BatchNorm,
its consumers' input channels), so every coupled tensor is zeroed or removed together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.table import Table
from torch import Tensor, nn

from prunekit.allocation import check_sparsity
from prunekit.errors import PruningError, UnknownChoiceError
from prunekit.inputs import Inputs
from prunekit.structured import ShrinkReport, build, plan, score, shrink
from prunekit.structured.surgery import removed_groups, zero_groups
from prunekit.tables import TableReport
from prunekit.training import distributed as dist_mod
from prunekit.training.data import TrainData, source
from prunekit.training.loop import Evaluate, fit, training_step


@dataclass
class DuringReport(TableReport):
    """Accuracy of the model as given, after every epoch, after shrinking and at the end;
    sizes before and after from the :class:`~prunekit.structured.ShrinkReport`."""

    method: str
    dense_accuracy: float
    epoch_accuracy: list[float] = field(default_factory=list)
    pruned_accuracy: float = 0.0
    final_accuracy: float = 0.0
    shrink: ShrinkReport | None = None

    def table(self) -> Table:
        s = self.shrink
        caption = "" if s is None else (f"params {s.params_before:,} -> {s.params_after:,}, "
                                        f"MACs {s.macs_before:,} -> {s.macs_after:,}")  # fmt: skip
        table = Table(title=self.method, caption=caption)
        table.add_column("stage")
        table.add_column("accuracy", justify="right")
        rows = [("dense", self.dense_accuracy)]
        rows += [(f"epoch {i}", a) for i, a in enumerate(self.epoch_accuracy, 1)]
        rows += [("after shrink", self.pruned_accuracy), ("final", self.final_accuracy)]
        for stage, acc in rows:
            table.add_row(stage, f"{acc:.2%}")
        return table


def soft_filter_pruning(
    model: nn.Module,
    data: TrainData,
    example_inputs: Inputs,
    *,
    ratio: float = 0.3,
    epochs: int = 10,
    lr: float = 1e-3,
    criterion: str = "l2",
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
    distributed: bool | None = None,
    evaluate: Evaluate | None = None,
    **train_kwargs: Any,
) -> DuringReport:
    """Train ``model`` for ``epochs``, zeroing the fraction ``ratio`` of each conv family's
    filter groups with the smallest ``criterion`` (``"l2"`` or ``"fpgm"``) after every
    epoch, then remove them physically (in place). See the module docstring.

    Training runs :func:`~prunekit.training.loop.fit` on ``data`` (a dataset in memory or
    any re-iterable of batches, :mod:`~prunekit.training.data`) with ``train_kwargs``
    (``optimizer``, ``weight_decay``, ``step``, ...); ``evaluate(model)`` gives the
    accuracies reported (default: on the test split of ``data``).
    ``distributed``: under ``torch.distributed``, train data-parallel as
    :func:`~prunekit.training.lottery` does; the weights stay identical on every rank, so
    every rank zeroes and removes the same filters.
    """
    sync = dist_mod.resolve(distributed)
    ratio = check_sparsity(ratio, "ratio")
    if criterion not in ("l2", "fpgm"):
        raise UnknownChoiceError("soft filter pruning criterion", criterion, ["l2", "fpgm"])
    src = source(data, batch_size, evaluate)
    src.check(sync)
    graph = build(model, example_inputs)
    report = DuringReport("soft filter pruning", src.evaluate(model))

    def zero_weakest() -> None:
        decisions = plan(graph, score(model, graph, criterion), ratio)
        zero_groups(model, removed_groups(graph, {d.name: d.removed for d in decisions}))
        report.epoch_accuracy.append(src.evaluate(model))

    fit(model, src.batches(seed), sync=sync, epochs=epochs, lr=lr, progress=progress,
        on_epoch=zero_weakest, **train_kwargs)  # fmt: skip
    report.shrink = shrink(model, example_inputs, ratio=None)
    report.pruned_accuracy = report.final_accuracy = src.evaluate(model)
    return report


def bn_l1(model: nn.Module) -> Tensor:
    """``sum |gamma|`` over the scales of every affine BatchNorm of ``model``."""
    gammas = [
        m.weight
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None
    ]
    if not gammas:
        raise PruningError(f"{type(model).__name__} has no affine BatchNorm to slim")
    return sum(g.abs().sum() for g in gammas)  # type: ignore[return-value]


def network_slimming(
    model: nn.Module,
    data: TrainData,
    example_inputs: Inputs,
    *,
    ratio: float = 0.5,
    sparsity_lambda: float = 1e-4,
    epochs: int = 10,
    finetune_epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
    distributed: bool | None = None,
    evaluate: Evaluate | None = None,
    **train_kwargs: Any,
) -> DuringReport:
    """Train ``model`` for ``epochs`` on ``loss + sparsity_lambda * sum |gamma|``, remove
    the fraction ``ratio`` of all BatchNorm channels by one global ranking of ``|gamma|``
    (in place), and fine-tune ``finetune_epochs`` without the penalty.

    ``data``, ``evaluate`` and ``train_kwargs`` as for :func:`soft_filter_pruning`; the
    ``loss`` is the training step's (``step`` or ``loss_fn``, default cross-entropy).
    ``distributed``: as for :func:`soft_filter_pruning` (BatchNorm statistics are each
    rank's; DDP broadcasts rank 0's buffers at every forward).
    """
    sync = dist_mod.resolve(distributed)
    ratio = check_sparsity(ratio, "ratio")
    bn_l1(model)  # fail before training on a model without BatchNorm
    src = source(data, batch_size, evaluate)
    src.check(sync)
    report = DuringReport("network slimming", src.evaluate(model))
    step = training_step(train_kwargs.pop("step", None), train_kwargs.pop("loss_fn", None))

    def log_accuracy() -> None:
        report.epoch_accuracy.append(src.evaluate(model))

    def penalised(net: nn.Module, batch: Any) -> Tensor:
        return step(net, batch) + sparsity_lambda * bn_l1(model)

    common = dict(lr=lr, progress=progress, sync=sync, on_epoch=log_accuracy, **train_kwargs)
    fit(model, src.batches(seed), epochs=epochs, step=penalised, **common)
    report.shrink = shrink(model, example_inputs, ratio=ratio, criterion="bn_scale",
                           scope="global")  # fmt: skip
    report.pruned_accuracy = src.evaluate(model)
    fit(model, src.batches(seed + 1), epochs=finetune_epochs, step=step, **common)
    report.final_accuracy = src.evaluate(model)
    return report
