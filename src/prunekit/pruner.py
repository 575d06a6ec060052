"""``pk.Pruner``: :func:`prunekit.prune` on a schedule, inside any training loop."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict
from typing import Any, NamedTuple, Protocol

import torch.distributed as dist
from torch import nn

from prunekit.criteria.base import Batches
from prunekit.errors import (
    DistributedError,
    InvalidSparsityError,
    MissingDataError,
    PrunerStateError,
    ScheduleError,
)
from prunekit.granularity import NM
from prunekit.inputs import Calibration
from prunekit.masks import kept_fraction
from prunekit.pruning import PruneReport, apply, plan
from prunekit.schedules import OneShot, Schedule
from prunekit.spec import PruneSpec, spec_of

_ONE_SHOT = OneShot()  # frozen, so one shared default is safe


def kept_share(layers: Iterable[tuple[nn.Module, int]]) -> float:
    """``sum_l k_l n_l / sum_l n_l``: the fraction of all the weights of ``layers``
    (module, weight count ``n_l``) that their masks keep, ``k_l`` being each module's
    :func:`~prunekit.masks.kept_fraction`."""
    pairs = list(layers)
    return sum(kept_fraction(m) * n for m, n in pairs) / sum(n for _, n in pairs)


def check_reusable(data: Batches | None, name: str) -> None:
    """Raise :class:`~prunekit.errors.MissingDataError` when calibration ``data`` (the
    argument ``name``) is a one-pass iterator: pruning again would find it empty."""
    if isinstance(data, Iterator):
        raise MissingDataError(
            f"{name} is a one-pass iterator ({type(data).__name__}), which would be empty the "
            f"second time it is pruned with; Fix: pass a list of batches, e.g. list({name})."
        )


def check_reachable(target: float, current: float) -> None:
    """Raise :class:`~prunekit.errors.InvalidSparsityError` when ``target`` is below the
    ``current`` sparsity of the selected layers: masks only grow, so it is never met."""
    if current > target:
        raise InvalidSparsityError(
            f"target={target!r} is below the sparsity the selected layers already have "
            f"({current:.6g}); masks only grow, so it could never be met; "
            f"Fix: target >= {current:.6g}."
        )


class MaskSync(Protocol):
    """A hook that keeps masks identical across processes (the Pruner calls it; the
    ``torch.distributed`` implementation is :class:`prunekit.training.distributed.MaskSync`)."""

    def register(self, modules: Iterable[nn.Module]) -> None:
        """Give each of ``modules`` a mask (all kept) before DDP wraps the model."""
        ...

    def __call__(self, model: nn.Module) -> Any:
        """Make every process hold the same masks (a collective)."""
        ...


def _resolve_sync(sync: MaskSync | bool | None) -> MaskSync | None:
    """The hook to call, None for none; refuses to guess inside a process group."""
    if sync is None and dist.is_available() and dist.is_initialized():
        raise DistributedError(
            "a Pruner inside a torch.distributed process group must say how ranks agree on "
            "masks; Fix: sync=pk.training.distributed.MaskSync() (rank 0's masks everywhere) "
            "or sync=False (each rank prunes on its own)."
        )
    if sync is None or sync is False:
        return None
    if sync is True or not callable(sync) or not hasattr(sync, "register"):
        raise DistributedError(
            f"sync={sync!r} is not a mask-sync hook; Fix: pass "
            "pk.training.distributed.MaskSync(), False or None."
        )
    return sync


class Event(NamedTuple):
    """One milestone of the schedule: after ``step`` steps, ``target`` asked, ``achieved`` got."""

    step: int
    target: float
    achieved: float


class Pruner:
    """Prune ``model`` gradually to ``target`` while it trains: call :meth:`step` after
    every ``optimizer.step()``.

    At each milestone of ``schedule`` the Pruner calls :func:`prunekit.prune` with the
    scheduled sparsity and the same granularity / criterion / scope / layers arguments
    (see there). Masks only grow: pruned weights stay exactly zero whatever the optimizer
    does, and the sparsity of the selected layers never decreases. Every argument is
    checked when the Pruner is built, by planning the prune to ``target``
    (:func:`prunekit.pruning.plan`: nothing runs, nothing is copied), so a bad argument
    fails before training starts and leaves the model as it was.

    Example (gradual magnitude pruning, Zhu & Gupta 2017)::

        import torch, prunekit as pk
        from prunekit.zoo import LeNet300100, batches, evaluate, load_dataset

        data = load_dataset("digits")
        model = LeNet300100(in_features=64)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        pruner = pk.Pruner(model, target=0.9, schedule=pk.Cubic(start=0, end=200, every=20))
        for epoch in range(10):
            for x, y in batches(data.x_train, data.y_train, 64, shuffle=True):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                pruner.step()                   # after optimizer.step()
        print(f"sparsity {pruner.sparsity:.1%}")   # 90.0%
        print(f"accuracy {evaluate(model, data.x_test, data.y_test):.1%}")

    Args:
        model: the model to prune in place.
        target: the final sparsity in [0, 1) of the selected layers; at least their
            current sparsity.
        spec / settings: a :class:`~prunekit.PruneSpec`, or its fields as keywords
            (``granularity``, ``criterion``, ``scope``, ``allocation``, ``layers``,
            ``exclude``, ``min_keep``, ``seed``, ``loss_fn``, ``include_output``,
            ``include_embeddings``), with the defaults of :func:`prunekit.prune` (local
            scope; the output layer and embeddings kept dense).
        data: calibration batches for data-driven criteria; re-iterable (a list, a
            DataLoader): it is used at every milestone.
        schedule: :class:`~prunekit.OneShot` (default), :class:`~prunekit.Iterative` or
            :class:`~prunekit.Cubic`. N:M granularities fix the sparsity, so they take
            ``OneShot`` only.
        sync: a :class:`MaskSync` hook called at construction and after every prune. Under
            ``torch.distributed`` (DDP) pass ``pk.training.distributed.MaskSync()``: every
            rank gets rank 0's masks; every rank must then build the Pruner (before
            wrapping the model in DDP: it registers all-kept masks DDP has to see) and call
            :meth:`step` alike. ``False``: never. ``None`` (default): none, and a
            :class:`~prunekit.errors.DistributedError` inside a process group, where
            ranks would otherwise silently disagree.

    Raises:
        PruningError: a subclass naming the value and the fix, for any bad argument.
    """

    def __init__(
        self,
        model: nn.Module,
        target: float = 0.9,
        *,
        schedule: Schedule = _ONE_SHOT,
        spec: PruneSpec | None = None,
        data: Batches | Calibration | None = None,
        sync: MaskSync | bool | None = None,
        **settings: Any,
    ) -> None:
        if not isinstance(schedule, Schedule):
            raise ScheduleError(
                f"schedule={schedule!r} is not a schedule; Fix: pass pk.OneShot(), "
                "pk.Iterative(steps, every) or pk.Cubic(start, end, every)."
            )
        target = schedule.check(target)
        self.spec = spec_of(spec, settings)
        if isinstance(self.spec.gran, NM) and not isinstance(schedule, OneShot):
            raise ScheduleError(
                f"granularity {self.spec.gran.name!r} fixes the sparsity, so {schedule!r} cannot "
                "grow it step by step; Fix: schedule=pk.OneShot()."
            )
        self._sync = _resolve_sync(sync)
        # The plan validates everything (layers, targets, criterion) without touching the
        # model; the data is only checked for presence and reusability here.
        first = plan(model, target, self.spec)
        self.data = first.check_data(data)
        if self.data is not None and not self.data.reusable:
            check_reusable(self.data.data, "data")
        self.model, self.target, self.schedule = model, target, schedule
        self._layers = [(layer.module, layer.weight.numel()) for layer in first.layers]
        check_reachable(target, self.sparsity)
        self.step_count = 0
        self.history: list[Event] = []
        if self._sync is not None:
            # Masks DDP can see (build the Pruner before wrapping the model in DDP), equal on
            # every rank so the ranks agree on which milestones prune.
            self._sync.register(m for m, _ in self._layers)
            self._sync(model)

    @property
    def sparsity(self) -> float:
        """Fraction of the selected layers' weights that are masked now."""
        return 1 - kept_share(self._layers)

    def step(self) -> PruneReport | None:
        """Count one optimizer step and prune if the schedule is due; the report, or None.

        A milestone whose target the model already meets (an earlier, larger cut) is
        recorded in :attr:`history` without pruning.
        """
        self.step_count += 1
        if not self.schedule.due(self.step_count):
            return None
        wanted = self.schedule.target(self.step_count, self.target)
        report = None
        if wanted > self.sparsity:
            report = apply(plan(self.model, wanted, self.spec), self.data)
        if report is not None and self._sync is not None:
            self._sync(self.model)
        self.history.append(Event(self.step_count, wanted, self.sparsity))
        return report

    def _identity(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "schedule": {"type": type(self.schedule).__name__, **asdict(self.schedule)},
        }

    def state_dict(self) -> dict[str, Any]:
        """The step count and history, with the target and schedule they belong to.

        Save it next to the model's state dict (see :mod:`prunekit.masks` for loading
        masks into a fresh model), and :meth:`load_state_dict` it to resume.
        """
        return {
            **self._identity(),
            "step": self.step_count,
            "history": [list(e) for e in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the target and schedule must be this Pruner's."""
        keys = ("target", "schedule", "step", "history")
        missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
        if missing:
            raise PrunerStateError(
                f"not a Pruner state: {state!r:.200} lacks {missing}; Fix: pass what "
                "Pruner.state_dict() returned."
            )
        ours = self._identity()
        theirs = {"target": state["target"], "schedule": state["schedule"]}
        try:  # a tensor in the state compares element-wise, and its truth is ambiguous
            same = bool(theirs == ours)
        except (RuntimeError, TypeError, ValueError):
            same = False
        if not same:
            raise PrunerStateError(
                f"the state belongs to {theirs}, this Pruner is {ours}; Fix: build the Pruner "
                "with the same target and schedule as the run that saved it."
            )
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise PrunerStateError(f"state step={step!r} is not an int >= 0; Fix: a saved state.")
        try:
            history = [Event(int(s), float(t), float(a)) for s, t, a in state["history"]]
        except (TypeError, ValueError) as err:
            raise PrunerStateError(
                f"state history is not a list of (step, target, achieved): {err}; "
                "Fix: pass what Pruner.state_dict() returned."
            ) from err
        self.step_count, self.history = step, history

    def __repr__(self) -> str:
        return (
            f"Pruner(target={self.target}, schedule={self.schedule!r}, step={self.step_count}, "
            f"sparsity={self.sparsity:.4f})"
        )
