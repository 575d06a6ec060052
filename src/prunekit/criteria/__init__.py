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
from prunekit.criteria.gradient import Gradient, GradientStatistic, Taylor
from prunekit.criteria.init import SNIP, GraSP, SynFlow
from prunekit.criteria.magnitude import L1, L2, Magnitude
from prunekit.criteria.random import Random
from prunekit.errors import UnknownChoiceError

REGISTRY: dict[str, type[Criterion]] = {
    c.name: c for c in (Magnitude, L1, L2, Gradient, Taylor, Random, Wanda, SNIP, GraSP, SynFlow)
}


def get(spec: str | Criterion | Callable) -> Criterion:
    """A criterion from a registered name, an instance, or a function ``f(weight) -> scores``."""
    if isinstance(spec, Criterion):
        return spec
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in REGISTRY:
            return REGISTRY[key]()
        raise UnknownChoiceError("criterion", spec, sorted(REGISTRY))
    if isinstance(spec, type) and issubclass(spec, Criterion):
        return spec()
    if callable(spec):
        return FunctionCriterion(spec)
    raise UnknownChoiceError("criterion", spec, sorted(REGISTRY))


__all__ = [
    "L1",
    "L2",
    "REGISTRY",
    "SNIP",
    "Criterion",
    "ElementwiseCriterion",
    "FunctionCriterion",
    "GraSP",
    "Gradient",
    "GradientStatistic",
    "Magnitude",
    "PreparedCriterion",
    "Random",
    "ScoreContext",
    "SynFlow",
    "Taylor",
    "Wanda",
    "get",
]
