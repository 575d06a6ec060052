"""Criteria: one module per family; :func:`get` resolves a name, instance or function."""

from __future__ import annotations

from collections.abc import Callable

from prunekit.criteria.activation import Wanda
from prunekit.criteria.base import (
    Criterion,
    ElementwiseCriterion,
    FunctionCriterion,
    PreparedCriterion,
    ScoreContext,
)
from prunekit.criteria.channel import FPGM, LAMP, BNScale
from prunekit.criteria.gradient import Gradient, Taylor
from prunekit.criteria.init import SNIP, GraSP, SynFlow
from prunekit.criteria.magnitude import L1, L2, Magnitude
from prunekit.criteria.random import Random
from prunekit.errors import UnknownChoiceError, guarded

_ALL = (Magnitude, L1, L2, Gradient, Taylor, Random, Wanda, SNIP, GraSP, SynFlow, BNScale, FPGM)
REGISTRY: dict[str, type[Criterion]] = {c.name: c for c in (*_ALL, LAMP)}
"""Every criterion of every engine, by name (``criterion.units`` says which engines)."""


_ENGINES = {"groups": "pk.prune", "channels": "pk.shrink", "rows": "pk.llm.prune"}
_KIND = {None: "criterion", "groups": "criterion", "channels": "structured criterion",
         "rows": "LLM criterion"}  # fmt: skip


def users_code(criterion: Criterion) -> bool:
    """Whether ``criterion`` runs the user's code: a function, or a class from outside."""
    outside = type(criterion).__module__.split(".")[0] != "prunekit"
    return outside or isinstance(criterion, FunctionCriterion)


def guard(criterion: Criterion, method: Callable, where: str) -> Callable:
    """``method`` (a bound method of ``criterion``) wrapped, when it is the user's code, so
    an exception it raises is a :class:`~prunekit.errors.UserCallbackError` naming the
    criterion and ``where`` (the original as ``__cause__``)."""
    if not users_code(criterion):
        return method
    return guarded(method, f"criterion {criterion!r} ({where})")


def names(units: str | None = None) -> list[str]:
    """Registered criteria (that score ``units``, when given), sorted."""
    return sorted(n for n, c in REGISTRY.items() if units is None or units in c.units)


def _resolve(spec: str | Criterion | Callable, units: str | None) -> Criterion:
    if isinstance(spec, Criterion):
        return spec
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in REGISTRY:
            return REGISTRY[key]()
        raise UnknownChoiceError(_KIND[units], spec, names(units))
    if isinstance(spec, type) and issubclass(spec, Criterion):
        return spec()
    if callable(spec):
        return FunctionCriterion(spec)
    raise UnknownChoiceError(_KIND[units], spec, names(units))


def get(spec: str | Criterion | Callable, units: str | None = None) -> Criterion:
    """A criterion from a registered name, a class or instance, or ``f(weight) -> scores``.

    ``units`` (``"groups"``, ``"channels"``, ``"rows"``) also checks that it can score
    that kind of unit, naming the engines that take it when it cannot.
    """
    criterion = _resolve(spec, units)
    if units is not None and units not in criterion.units:
        where = ", ".join(_ENGINES[u] for u in sorted(criterion.units))
        raise UnknownChoiceError(
            f"criterion for {_ENGINES[units]} (criterion {criterion.name!r} only works with "
            f"{where})",
            criterion.name,
            names(units),
        )
    return criterion


__all__ = [
    "L1",
    "L2",
    "REGISTRY",
    "SNIP",
    "Criterion",
    "ElementwiseCriterion",
    "GraSP",
    "Gradient",
    "Magnitude",
    "PreparedCriterion",
    "Random",
    "ScoreContext",
    "SynFlow",
    "Taylor",
    "Wanda",
    "get",
]
