"""Typed, frozen settings: :class:`PruneSpec` and the :class:`Settings` base every method
config shares.

A settings class declares each field's constraint once, in ``constraints`` (the model is
scikit-learn's ``_parameter_constraints``); :meth:`Settings.__post_init__` checks every
field at construction, so an instance is always valid, and the recipe schema is derived
from the same declarations. A string choice (``"magnitude"``,
``"2:4"``) is parsed once, at construction, into the object the engines use.

    spec = pk.PruneSpec(granularity="filter", criterion="l2", scope="global")
    pk.prune(model, 0.5, spec=spec)
    pk.prune(model, 0.5, granularity="filter", criterion="l2", scope="global")  # the same
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from prunekit import criteria as criteria_mod
from prunekit import granularity as granularity_mod
from prunekit.allocation import ALLOCATIONS, Allocation
from prunekit.criteria import Criterion
from prunekit.errors import PruningError, UnknownChoiceError
from prunekit.granularity import Granularity
from prunekit.inputs import LossFn
from prunekit.layers import Selector


@dataclass(frozen=True)
class Constraint:
    """One field's rule: ``check(value)`` returns the (parsed) value or raises; ``text``
    says in words what is accepted (error messages, recipe ``--help``)."""

    check: Callable[[Any], Any]
    text: str


def one_of(kind: str, *choices: str) -> Constraint:
    """A string among ``choices`` (case-insensitive); ``kind`` names it in errors."""

    def check(value: Any) -> str:
        key = value.strip().lower() if isinstance(value, str) else value
        if key not in choices:
            raise UnknownChoiceError(kind, value, list(choices))
        return key

    return Constraint(check, " | ".join(choices))


def integer(low: int = 0, high: int | None = None) -> Constraint:
    """An ``int`` (not a bool) in ``[low, high]``."""

    def check(value: Any) -> int:
        bad = isinstance(value, bool) or not isinstance(value, int)
        if bad or value < low or (high is not None and value > high):
            bound = f"{low}..{high}" if high is not None else f">= {low}"
            raise PruningError(f"is not an int {bound}")
        return value

    return Constraint(check, f"int >= {low}" if high is None else f"int {low}..{high}")


SEED = integer(0, 2**63 - 1)
"""A seed: what ``torch.manual_seed`` takes (an int in ``0..2**63 - 1``, not a bool)."""


def between(
    low: float | None = None,
    high: float | None = None,
    *,
    open_low: bool = False,
    open_high: bool = False,
    optional: bool = False,
) -> Constraint:
    """A finite real number (not a bool, not NaN) within the bounds (``open_*`` excludes them;
    ``optional`` lets ``None`` through); a failure reads ``must be < 1``."""
    parts = [f"{'>' if open_low else '>='} {low:g}"] if low is not None else []
    parts += [f"{'<' if open_high else '<='} {high:g}"] if high is not None else []

    def check(value: Any) -> float | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise PruningError("is not set" if value is None else "is not a number (or NaN)")
        if math.isinf(value):
            raise PruningError("is not a finite number")
        if low is not None and (value < low or (open_low and value == low)):
            raise PruningError(f"must be {parts[0]}")
        if high is not None and (value > high or (open_high and value == high)):
            raise PruningError(f"must be {parts[-1]}")
        return float(value)

    return Constraint(check, " ".join(["a number", " and ".join(parts)]).strip())


def boolean() -> Constraint:
    """``True`` or ``False``."""

    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise PruningError("is not true or false")
        return value

    return Constraint(check, "true | false")


def checked(owner: str, name: str, value: Any, constraint: Constraint) -> Any:
    """``constraint.check(value)``; a failure is a :class:`~prunekit.errors.PruningError`
    reading ``owner.name=value <what is wrong>; Fix: pass <constraint.text>.`` (an
    :class:`~prunekit.errors.UnknownChoiceError` already names the valid values)."""
    try:
        return constraint.check(value)
    except UnknownChoiceError:
        raise
    except PruningError as err:
        err.args = (f"{owner}.{name}={value!r} {err}; Fix: pass {constraint.text}.",)
        raise


class Settings:
    """Base of frozen settings dataclasses: checks ``constraints`` at construction.

    Subclasses are ``@dataclass(frozen=True)`` and map field names to :class:`Constraint`.
    A bad value raises a :class:`~prunekit.errors.PruningError` naming the class, the
    field, the value and what is accepted.
    """

    constraints: ClassVar[Mapping[str, Constraint]] = {}
    label: ClassVar[str] = ""
    """How messages name the settings (default: the class name)."""

    def __post_init__(self) -> None:
        label = self.label or type(self).__name__
        for name, constraint in self.constraints.items():
            value = checked(label, name, getattr(self, name), constraint)
            object.__setattr__(self, name, value)
        self.check()

    def check(self) -> None:
        """Cross-field rules (override); fields are already parsed."""

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    @classmethod
    def merged(cls, settings: Any, options: Mapping[str, Any], *, what: str, argument: str,
               public: str) -> Any:
        """``settings`` (an instance, or None for the defaults) with keyword ``options``
        applied: what a function taking ``argument=`` and ``**options`` runs with. An
        unknown option, or ``settings`` of another type, is a
        :class:`~prunekit.errors.PruningError` (``what`` and ``public`` name them)."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise PruningError(
                f"unknown {what} setting(s) {unknown}; Fix: use {', '.join(names)}."
            )
        if settings is None:
            return cls(**options)
        if not isinstance(settings, cls):
            raise PruningError(
                f"{argument}={settings!r} is not a {cls.__name__}; Fix: pass {public}(...)."
            )
        return settings.replace(**options) if options else settings


def _allocation(value: Any) -> Allocation:
    if isinstance(value, Mapping):
        return dict(value)
    key = value.strip().lower() if isinstance(value, str) else value
    if key not in ALLOCATIONS:
        raise UnknownChoiceError("allocation", value, [*ALLOCATIONS, "{layer: sparsity}"])
    return key


SCOPES = ("local", "global")


@dataclass(frozen=True)
class PruneSpec(Settings):
    """How :func:`prunekit.prune` chooses what to mask (everything but the sparsity and
    the data, which change from call to call).

    Attributes:
        granularity: what one unit is: ``"element"``, ``"2:4"`` (any ``"N:M"``), ``"row"``,
            ``"column"``, ``"kernel"``, ``"filter"``, ``"channel"``, ``"block:AxB"`` or a
            :class:`~prunekit.granularity.Granularity`; parsed at construction.
        criterion: a registered name (``prunekit.criteria.REGISTRY``), a
            :class:`~prunekit.criteria.Criterion` or ``f(weight) -> scores``.
        scope: ``"local"`` (every layer to its allocated sparsity) or ``"global"`` (one
            ranking over all selected layers).
        allocation: local scope only: ``"uniform"``, ``"erk"`` or ``{layer: sparsity}``.
        layers / exclude: layer selectors (names, glob patterns, types or a predicate).
        min_keep: groups each layer keeps at least, in either scope (0 allows emptying).
        seed: seeds the random criterion and the sampling of large pools.
        loss_fn: ``loss_fn(outputs, targets)`` for gradient criteria (default
            cross-entropy; see :class:`~prunekit.inputs.Calibration`).
        include_output / include_embeddings: also prune the output layer (classifier,
            ``lm_head``) / the embeddings, which are kept dense by default
            (:mod:`prunekit.coverage` says how they are found).
    """

    granularity: str | Granularity = "element"
    criterion: str | Criterion | Callable[..., Any] = "magnitude"
    scope: str = "local"
    allocation: Allocation = "uniform"
    layers: Selector = None
    exclude: Selector = None
    min_keep: int = 1
    seed: int = 0
    loss_fn: LossFn | None = None
    include_output: bool = False
    include_embeddings: bool = False

    constraints: ClassVar[Mapping[str, Constraint]] = {
        "granularity": Constraint(
            granularity_mod.parse, "a granularity name, e.g. element, 2:4, filter"
        ),
        "criterion": Constraint(
            lambda c: criteria_mod.get(c, units="groups"),
            "a criterion name, a Criterion or f(weight)",
        ),
        "scope": one_of("scope", *SCOPES),
        "allocation": Constraint(_allocation, "uniform | erk | {layer: sparsity}"),
        "min_keep": integer(0),
        "seed": SEED,
        "include_output": boolean(),
        "include_embeddings": boolean(),
    }

    def check(self) -> None:
        if self.scope == "global" and self.allocation != "uniform":
            raise PruningError(
                "global scope ranks all layers together, so it takes no allocation; "
                "Fix: use scope='local' with an allocation, or drop the allocation."
            )
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise PruningError(
                f"loss_fn={self.loss_fn!r} is not callable; Fix: pass f(outputs, targets)."
            )

    @property
    def gran(self) -> Granularity:
        """The parsed granularity."""
        assert isinstance(self.granularity, Granularity)
        return self.granularity

    @property
    def crit(self) -> Criterion:
        """The parsed criterion."""
        assert isinstance(self.criterion, Criterion)
        return self.criterion


SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(PruneSpec))


def spec_of(spec: PruneSpec | None, settings: Mapping[str, Any]) -> PruneSpec:
    """``spec`` with ``settings`` (keyword arguments of :func:`prunekit.prune`) applied;
    an unknown keyword is a :class:`~prunekit.errors.PruningError`."""
    return PruneSpec.merged(spec, settings, what="pruning", argument="spec", public="pk.PruneSpec")
