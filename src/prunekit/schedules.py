"""Pruning schedules: when to prune, and to which sparsity (chapter 3.5).

A schedule is a small frozen dataclass that a :class:`~prunekit.Pruner` asks, after each
optimizer step ``t`` (counted from 1), whether pruning is :meth:`~Schedule.due` and to
which :meth:`~Schedule.target` sparsity. Pruning happens only at the schedule's
*milestones*; between them the target stays at the value of the last milestone, so
``target(t, final)`` is the sparsity the model holds after ``t`` steps. It is 0 before the
first milestone, never decreases, and equals ``final`` exactly from :attr:`~Schedule.end`
on.

- :class:`OneShot`: everything at once (chapter 3.5.2).
- :class:`Iterative`: ``steps`` equal or geometric increments, ``every`` steps apart
  (chapter 3.5.1; Han et al. 2015, Frankle & Carbin 2019).
- :class:`Cubic`: gradual magnitude pruning (Zhu & Gupta 2017).
"""

from __future__ import annotations

from dataclasses import dataclass

from prunekit.allocation import check_sparsity
from prunekit.errors import ScheduleError

SPACINGS = ["equal", "geometric"]


def check_int(name: str, value: object, minimum: int, fix: str) -> None:
    """Raise :class:`~prunekit.errors.ScheduleError` unless ``value`` is an int (not a
    bool) >= ``minimum``; ``fix`` ends the message."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ScheduleError(f"{name}={value!r} must be an int >= {minimum}; Fix: {fix}")


def geometric(final: float, fraction: float) -> float:
    """``1 - (1 - final) ** fraction``: the sparsity after ``fraction`` of the rounds of a
    schedule where every round removes the same share of the weights still alive."""
    return 1 - (1 - final) ** fraction


@dataclass(frozen=True)
class Schedule:
    """Base class: subclasses give their :meth:`milestones` (the last is ``end``, where the
    target reaches ``final``) and the sparsity at each."""

    def milestones(self) -> range:
        """The steps at which pruning happens (a non-empty range)."""
        raise NotImplementedError

    def _sparsity(self, i: int, n: int, final: float) -> float:
        """The target at milestone ``i`` of ``n`` (0-based)."""
        raise NotImplementedError

    def check(self, final: float) -> float:
        """``final`` as a float, or an error when this schedule cannot grow to it."""
        return check_sparsity(final, "target")

    def due(self, step: int) -> bool:
        """Whether to prune after ``step`` optimizer steps."""
        return step in self.milestones()

    def target(self, step: int, final: float) -> float:
        """The sparsity wanted after ``step`` optimizer steps, growing to ``final``."""
        final = self.check(final)
        ms = self.milestones()
        if step < ms.start:
            return 0.0
        i = min((step - ms.start) // ms.step, len(ms) - 1)
        # The last milestone returns `final` itself, so float rounding never misses it.
        return final if i == len(ms) - 1 else self._sparsity(i, len(ms), final)


@dataclass(frozen=True)
class OneShot(Schedule):
    """Prune to the final sparsity once, after ``at`` optimizer steps (chapter 3.5.2).

    ``s_t = 0`` for ``t < at`` and ``s_t = s_f`` from then on. With the default ``at=1``
    the first ``pruner.step()`` prunes and the rest of training fine-tunes the survivors.
    """

    at: int = 1

    def __post_init__(self) -> None:
        check_int("at", self.at, 1, "prune after at least one step, e.g. OneShot(at=1).")

    def milestones(self) -> range:
        return range(self.at, self.at + 1)

    @property
    def end(self) -> int:
        """The step at which the target reaches ``final``."""
        return self.at

    def _sparsity(self, i: int, n: int, final: float) -> float:
        raise AssertionError("a one-shot schedule has a single milestone")  # pragma: no cover


@dataclass(frozen=True)
class Iterative(Schedule):
    """Prune ``steps`` times, ``every`` optimizer steps apart, after ``start`` (chapter 3.5.1).

    Milestone ``i = 1..k`` (``k = steps``) is at step ``start + i * every``, where the
    sparsity becomes

    - ``"equal"``: ``s_i = s_f * i / k`` (the same share of all weights each time);
    - ``"geometric"``: ``s_i = 1 - (1 - s_f) ** (i / k)``, so each round removes the same
      fraction of the weights still alive, as in iterative magnitude pruning (Han et al.
      2015, "Learning both Weights and Connections"; Frankle & Carbin 2019, "The Lottery
      Ticket Hypothesis", which prune p% of the remaining weights per round).

    The training between milestones fine-tunes the survivors before the next cut.
    """

    steps: int
    every: int
    start: int = 0
    spacing: str = "equal"

    def __post_init__(self) -> None:
        check_int("steps", self.steps, 1, "prune at least once, e.g. steps=5.")
        check_int("every", self.every, 1, "prune every 1 or more optimizer steps.")
        check_int("start", self.start, 0, "count the start in optimizer steps from 0.")
        if self.spacing not in SPACINGS:
            raise ScheduleError(
                f"spacing={self.spacing!r} is not one of {', '.join(SPACINGS)}; "
                "Fix: spacing='equal' or spacing='geometric'."
            )

    def milestones(self) -> range:
        return range(self.start + self.every, self.end + 1, self.every)

    @property
    def end(self) -> int:
        """The step at which the target reaches ``final``."""
        return self.start + self.steps * self.every

    def _sparsity(self, i: int, n: int, final: float) -> float:
        fraction = (i + 1) / n
        return final * fraction if self.spacing == "equal" else geometric(final, fraction)


@dataclass(frozen=True)
class Cubic(Schedule):
    """Gradual magnitude pruning: Zhu & Gupta 2017, "To prune, or not to prune".

    With ``t0 = start``, ``dt = every`` and ``n = (end - start) / every``, at the steps
    ``t = t0, t0 + dt, ..., t0 + n dt = end`` the sparsity becomes::

        s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt)) ** 3

    with ``s_i = initial`` and ``s_f`` the Pruner's target: fast cuts early, while the
    network is redundant, and ever smaller ones as it approaches ``s_f``. ``end - start``
    must be a multiple of ``every`` so that ``end`` is a milestone and ``s_f`` is reached
    exactly there. A Pruner counts steps from 1, so with ``start=0`` the first cut comes at
    step ``every`` (a nonzero ``initial`` is then applied with it).
    """

    start: int
    end: int
    every: int
    initial: float = 0.0

    def __post_init__(self) -> None:
        check_int("start", self.start, 0, "count the start in optimizer steps from 0.")
        check_int("every", self.every, 1, "prune every 1 or more optimizer steps.")
        check_int("end", self.end, self.start + 1, f"end after start={self.start}.")
        if (self.end - self.start) % self.every:
            below = self.start + (self.end - self.start) // self.every * self.every
            raise ScheduleError(
                f"end - start = {self.end - self.start} is not a multiple of every={self.every}, "
                f"so the final sparsity would never be reached; Fix: end={below} or "
                f"end={below + self.every}."
            )
        check_sparsity(self.initial, "initial")

    def milestones(self) -> range:
        return range(self.start, self.end + 1, self.every)

    def check(self, final: float) -> float:
        final = super().check(final)
        if self.initial > final:
            raise ScheduleError(
                f"initial={self.initial!r} is above the target {final!r}, so the cubic schedule "
                "would shrink the sparsity; Fix: initial <= target."
            )
        return final

    def _sparsity(self, i: int, n: int, final: float) -> float:
        return final + (self.initial - final) * (1 - i / (n - 1)) ** 3
