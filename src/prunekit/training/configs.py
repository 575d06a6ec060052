"""Typed settings of each timing method (chapter 3.6), every constraint declared once.

Each timing method is a frozen :class:`~prunekit.spec.Settings` holding exactly the knobs
it takes; what it does not take is not a field, so a setting it would ignore cannot even
be written. A method that prunes in its own fixed way says so in ``fixed`` (the
:class:`~prunekit.PruneSpec` settings it implies) instead of taking a spec, and rules
between its settings are :class:`Rule` s, checked at construction like every field.

- after, ``finetune``: :class:`PostTraining`: train dense, prune (one-shot, or on a
  schedule while fine-tuning), fine-tune.
- during, ``gradual``: :class:`Gradual`: a :class:`~prunekit.Pruner` on a schedule while
  training from scratch (Zhu & Gupta 2017 with ``cubic``).
- during, ``soft-filter`` / ``slimming``: :class:`SoftFilter` (He et al. 2018),
  :class:`Slimming` (Liu et al. 2017), both ending physically smaller.
- before, ``at-init`` / ``lottery``: :class:`AtInit` (SNIP, GraSP, SynFlow; iterative
  SynFlow, Tanaka et al. 2020), :class:`Lottery` (Frankle & Carbin 2019).

Schedules are written in fractions of their training phase (``start=0.0, end=0.8``), so
they stay valid whatever its length. Run-level arguments (the data, batch size, seed,
progress, distributed) are not settings of a method: the caller passes them alongside;
their bounds (:data:`RUN`, :data:`COUNT`) are declared here too, and the pipelines'
argument settings (``IterativeArgs``, ``LotteryArgs``) check them at entry.

    cfg = Lottery(sparsity=0.7, rounds=3, epochs=3)
    Lottery(sparsity=0.7, rewind=-1)   # PruningError: Lottery.rewind=-1 is neither ...
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from prunekit.errors import PruningError
from prunekit.granularity import NM
from prunekit.spec import SEED, Constraint, PruneSpec, Settings, between, boolean, integer, one_of


def _rewind(value: Any) -> str | int:
    if value == "init" or (not isinstance(value, bool) and isinstance(value, int) and value >= 0):
        return value
    raise PruningError("is neither 'init' nor an optimizer step >= 0")


MAX_COUNT = 10**6
"""The most epochs, rounds or steps a setting takes: a bound a real run stays far below
(a larger count would only run without end)."""
COUNT = integer(1, MAX_COUNT)
COUNT_OR_NONE = integer(0, MAX_COUNT)
MAX_BATCH = 2**31 - 1
LR = between(0.0, open_low=True)
RATE = between(0.0, 1.0, open_low=True, open_high=True)
RUN = {"batch_size": integer(1, MAX_BATCH), "seed": SEED}
"""The run-level arguments of every pipeline: in-memory batches of ``batch_size``, ``seed``."""
ELEMENT_WISE = {"granularity": "element", "scope": "local"}
FILTERS = {"granularity": "filter", "scope": "local"}
FRACTION = between(0.0, 1.0, open_high=True)
OPTIONAL_FRACTION = between(0.0, 1.0, open_high=True, optional=True)
TRAINING = {
    "epochs": COUNT,
    "lr": LR,
    "optimizer": one_of("optimizer", "adam", "sgd"),
}


def render(text: str, names: Mapping[str, str]) -> str:
    """``text`` with each ``{name}`` written as ``names[name]`` (a consumer's word for a
    setting, e.g. the recipe's ``prune.sparsity``); unknown names lose their braces."""
    return re.sub(r"\{([\w.]+)\}", lambda m: names.get(m[1], m[1]), text)


@dataclass(frozen=True)
class Rule:
    """A rule between settings: ``problem(settings)`` says what is wrong with ``field``
    given the others (None when nothing is), ``fix`` how to mend it. Texts name settings
    as ``{field}`` and the method as ``{method}`` (see :func:`render`)."""

    field: str
    problem: Callable[[Any], str | None]
    fix: str


@dataclass(frozen=True)
class Method(Settings):
    """Base of the timing methods: a training phase (``epochs``, ``lr``, ``optimizer``)
    and a target ``sparsity``. ``name`` / ``when`` place it in chapter 3.6; ``fixed``: the
    :class:`~prunekit.PruneSpec` settings a method without ``spec`` implies (``why``: in
    words); ``shrinks``: it ends physically smaller; ``rules``: checked after the fields."""

    name: ClassVar[str] = ""
    when: ClassVar[str] = ""
    fixed: ClassVar[Mapping[str, str]] = {}
    why: ClassVar[str] = ""
    shrinks: ClassVar[bool] = False
    rules: ClassVar[tuple[Rule, ...]] = ()

    epochs: int = 2
    lr: float = 1e-3
    optimizer: str = "adam"
    sparsity: float | None = 0.5

    constraints: ClassVar[Mapping[str, Constraint]] = {**TRAINING, "sparsity": FRACTION}

    @classmethod
    def violation(cls, settings: Any) -> tuple[Rule, str] | None:
        """The first rule ``settings`` (parsed fields) break, and its problem; or None."""
        for rule in cls.rules:
            problem = rule.problem(settings)
            if problem is not None:
                return rule, problem
        return None

    def check(self) -> None:
        found = self.violation(self)
        if found is not None:
            rule, problem = found
            names, value = {"method": self.name}, self
            for part in rule.field.split("."):  # e.g. spec.allocation
                value = getattr(value, part)
            raise PruningError(
                f"{type(self).__name__}.{rule.field}={value!r} "
                f"{render(problem, names)}; Fix: {render(rule.fix, names)}"
            )


def _spec(value: Any) -> PruneSpec:
    if not isinstance(value, PruneSpec):
        raise PruningError("is not a PruneSpec")
    return value


def _sparsity(s: Any) -> str | None:
    gran, allocation = s.spec.gran, s.spec.allocation
    if s.sparsity is None and not isinstance(gran, NM) and not isinstance(allocation, Mapping):
        return f"is needed for granularity {gran.name!r}"
    if isinstance(gran, NM) and s.sparsity is not None and abs(s.sparsity - gran.sparsity) > 1e-9:
        return f"contradicts {gran.name}, which fixes it at {gran.sparsity:g}"
    return None


def _no_finetune(s: Any) -> str | None:
    if s.schedule != "one-shot" and s.finetune_epochs == 0:
        return f"leaves no training for the {s.schedule} schedule to spread over"
    return None


SPEC = Constraint(_spec, "a PruneSpec")
SPARSITY = (Rule("sparsity", _sparsity, "a {sparsity} such as 0.8, none for N:M."),)


def _ends_early(s: Any) -> str | None:
    if s.schedule != "one-shot" and s.end <= s.start:
        return f"is not after start {s.start}: the schedule ends before it starts"
    return None


def _grows_nm(s: Any) -> str | None:
    if s.schedule != "one-shot" and isinstance(s.spec.gran, NM):
        return f"grows the sparsity step by step, which {s.spec.gran.name} fixes"
    return None


def _initial_above(s: Any) -> str | None:
    if s.schedule == "cubic" and s.initial > (s.sparsity or 0.0):
        return f"is above the target {s.sparsity or 0.0}"
    return None


def _allocation_map(always: bool) -> Callable[[Any], str | None]:
    def problem(s: Any) -> str | None:
        if (always or s.schedule != "one-shot") and isinstance(s.spec.allocation, Mapping):
            return (
                "fixes every layer's final sparsity, which the {method} schedule cannot grow "
                "step by step (a Pruner would cut it all at once, or never without sparsity)"
            )
        return None

    return problem


def _schedule_rules(always: bool) -> tuple[Rule, ...]:
    """The rules of a schedule; ``always``: the method prunes on it even when one-shot."""
    return (
        Rule("end", _ends_early, "{end} > {start} (fractions of the training phase, e.g. 0.8)."),
        Rule("schedule", _grows_nm, "{schedule}: one-shot."),
        Rule("initial", _initial_above, "{initial} <= {sparsity}."),
        Rule(
            "spec.allocation",
            _allocation_map(always),
            "allocation uniform or erk with a {sparsity}, or a one-shot prune after training.",
        ),
    )


@dataclass(frozen=True)
class Scheduled(Method):
    """Base of the methods that prune with a :class:`~prunekit.PruneSpec` on a schedule
    (fractions of the training phase; ``rounds`` cuts, ``initial`` for cubic), then
    fine-tune ``finetune_epochs`` at ``finetune_lr``."""

    sparsity: float | None = 0.5
    spec: PruneSpec = field(default_factory=PruneSpec)
    schedule: str = "one-shot"
    start: float = 0.0
    end: float = 1.0
    rounds: int = 4
    spacing: str = "geometric"
    initial: float = 0.0
    finetune_epochs: int = 1
    finetune_lr: float = 1e-4

    constraints: ClassVar[Mapping[str, Constraint]] = {
        **TRAINING,
        "sparsity": OPTIONAL_FRACTION,
        "spec": SPEC,
        "schedule": one_of("schedule", "one-shot", "iterative", "cubic"),
        "start": FRACTION,
        "end": between(0.0, 1.0, open_low=True),
        "rounds": COUNT,
        "spacing": one_of("spacing", "equal", "geometric"),
        "initial": FRACTION,
        "finetune_epochs": COUNT_OR_NONE,
        "finetune_lr": LR,
    }


@dataclass(frozen=True)
class PostTraining(Scheduled):
    """Train ``epochs`` dense (0: the model comes trained), prune to ``sparsity`` (one-shot,
    or on the schedule while fine-tuning), fine-tune (Han et al. 2015)."""

    name: ClassVar[str] = "finetune"
    when: ClassVar[str] = "after"

    rules: ClassVar[tuple[Rule, ...]] = (
        *SPARSITY,
        *_schedule_rules(always=False),
        Rule("finetune_epochs", _no_finetune, "{finetune_epochs} >= 1."),
    )
    # the dense training may be skipped (a trained checkpoint)
    constraints: ClassVar[Mapping[str, Constraint]] = {
        **Scheduled.constraints,
        "epochs": COUNT_OR_NONE,
    }


@dataclass(frozen=True)
class Gradual(Scheduled):
    """Prune on the schedule while training ``epochs`` from scratch (Zhu & Gupta 2017),
    then fine-tune ``finetune_epochs``."""

    name: ClassVar[str] = "gradual"
    when: ClassVar[str] = "during"
    rules: ClassVar[tuple[Rule, ...]] = (*SPARSITY, *_schedule_rules(always=True))


@dataclass(frozen=True)
class SoftFilter(Method):
    """Zero the ``sparsity`` of each conv family's filters with the smallest
    ``criterion`` (``l2`` or ``fpgm``) after every epoch, letting them regrow; remove
    them after the last one (He et al. 2018)."""

    name: ClassVar[str] = "soft-filter"
    when: ClassVar[str] = "during"
    fixed: ClassVar[Mapping[str, str]] = FILTERS
    why: ClassVar[str] = "soft filter pruning, which zeroes whole filters in each layer"
    shrinks: ClassVar[bool] = True

    epochs: int = 10
    sparsity: float | None = 0.3
    criterion: str = "l2"

    constraints: ClassVar[Mapping[str, Constraint]] = {
        **Method.constraints,
        "criterion": one_of("soft filter pruning criterion", "l2", "fpgm"),
    }


@dataclass(frozen=True)
class Slimming(Method):
    """Train ``epochs`` on ``loss + sparsity_lambda * sum |gamma|``, remove the
    ``sparsity`` of BatchNorm channels with the smallest ``|gamma|`` (one global
    ranking), fine-tune ``finetune_epochs`` (Liu et al. 2017)."""

    name: ClassVar[str] = "slimming"
    when: ClassVar[str] = "during"
    fixed: ClassVar[Mapping[str, str]] = {**FILTERS, "criterion": "bn_scale", "scope": "global"}
    why: ClassVar[str] = "network slimming, which ranks channels by BatchNorm |gamma|"
    shrinks: ClassVar[bool] = True

    epochs: int = 10
    sparsity: float | None = 0.5
    sparsity_lambda: float = 1e-4
    finetune_epochs: int = 5

    constraints: ClassVar[Mapping[str, Constraint]] = {
        **Method.constraints,
        "sparsity_lambda": between(0.0),
        "finetune_epochs": COUNT_OR_NONE,
    }


def _not_synflow(s: Any) -> str | None:
    if s.schedule == "iterative" and s.spec.crit.name != "synflow":
        return "re-scores round by round, which at initialisation only SynFlow does"
    return None


def _allocation_unused(s: Any) -> str | None:
    if s.schedule == "iterative" and s.spec.allocation != "uniform":
        return "is not used by {method}, which takes {sparsity} alone"
    return None


@dataclass(frozen=True)
class AtInit(Method):
    """Prune the untrained model to ``sparsity`` with ``spec`` (one-shot: SNIP, GraSP,
    SynFlow, ...; ``iterative``: SynFlow in ``rounds`` rounds on the exponential schedule,
    one global ranking), then train ``epochs``."""

    name: ClassVar[str] = "at-init"
    when: ClassVar[str] = "before"
    rules: ClassVar[tuple[Rule, ...]] = (
        *SPARSITY,
        Rule("schedule", _not_synflow, "{schedule}: one-shot, or criterion synflow."),
        Rule("spec.allocation", _allocation_unused, "drop allocation and give one {sparsity}."),
    )

    sparsity: float | None = 0.5
    spec: PruneSpec = field(default_factory=PruneSpec)
    schedule: str = "one-shot"
    rounds: int = 100

    constraints: ClassVar[Mapping[str, Constraint]] = {
        **TRAINING,
        "sparsity": OPTIONAL_FRACTION,
        "spec": SPEC,
        "schedule": one_of("schedule at initialisation", "one-shot", "iterative"),
        "rounds": COUNT,
    }


@dataclass(frozen=True)
class Lottery(Method):
    """Iterative magnitude pruning with rewinding (Frankle & Carbin 2019): ``rounds`` rounds
    (one for ``one-shot``) each removing ``1 - (1 - sparsity)^(1/rounds)`` of the remaining
    weights, rewinding to ``rewind`` (``"init"`` or a step) and training ``epochs``;
    ``control`` also trains each round's masks from a fresh initialisation;
    ``include_output`` prunes the output layer too (at half the rate, as Frankle & Carbin
    do), ``include_embeddings`` the embeddings (:mod:`prunekit.coverage`)."""

    name: ClassVar[str] = "lottery"
    when: ClassVar[str] = "before"
    fixed: ClassVar[Mapping[str, str]] = {**ELEMENT_WISE, "criterion": "magnitude"}
    why: ClassVar[str] = "lottery tickets, which prune by magnitude (Frankle & Carbin 2019)"

    epochs: int = 5
    sparsity: float | None = 0.8
    schedule: str = "iterative"
    rounds: int = 5
    rewind: str | int = "init"
    control: bool = True
    include_output: bool = False
    include_embeddings: bool = False

    constraints: ClassVar[Mapping[str, Constraint]] = {
        **Method.constraints,
        "schedule": one_of("lottery schedule", "one-shot", "iterative"),
        "rounds": COUNT,
        "rewind": Constraint(_rewind, "'init' | an optimizer step >= 0"),
        "control": boolean(),
        "include_output": boolean(),
        "include_embeddings": boolean(),
    }


METHODS: tuple[type[Method], ...] = (PostTraining, Gradual, SoftFilter, Slimming, AtInit, Lottery)
