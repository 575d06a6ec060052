"""One recipe key: its YAML type, default and range (:class:`Field`), and the errors that
name ``file:line``, the key, the value and the fix.

A small typed schema of our own rather than a library (jsonschema, pydantic): a recipe
error must name ``file:line``, the key, the bad value *and the fix*, and suggest the
closest key for a typo; with our own code every message is written for that, where a
library's generic messages would have to be re-mapped after the fact.
"""

from __future__ import annotations

import collections.abc as abc
import difflib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prunekit.errors import PruningError, RecipeError
from prunekit.recipes.source import Path_, Source
from prunekit.spec import Constraint

REQUIRED = object()
_NAMES = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    dict: "a mapping",
    list: "a list",
    type(None): "null",
}


@dataclass(frozen=True)
class Field:
    """One key: its accepted YAML ``types`` (``items``: of a list's elements), default
    (``REQUIRED`` for none), allowed ``choices`` (``also``: a test admitting other values,
    checked later: a data function beside the dataset names), inclusive numeric bounds ``low`` /
    ``high`` (``open_low`` / ``open_high`` exclude them), an extra ``test`` returning an
    error text, and an ``example`` for the fix. Keys a timing method reads carry no range
    here: the method's own :class:`~prunekit.spec.Constraint` checks them."""

    types: tuple[type, ...]
    default: Any = None
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    test: Callable[[Any], str | None] | None = None
    example: str = ""
    items: tuple[type, ...] = ()
    also: Callable[[Any], bool] | None = None


def yaml_types(hint: Any) -> tuple[type, ...]:
    """The YAML types a Python annotation admits: ``float | None`` gives
    ``(float, NoneType)``, ``Sequence[str]`` gives ``(list,)``; types YAML cannot write
    (classes, callables) give nothing."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        found = [t for arg in typing.get_args(hint) for t in yaml_types(arg)]
        return tuple(dict.fromkeys(found))
    if hint in _NAMES:
        return (hint,)
    if origin in (dict, abc.Mapping):
        return (dict,)
    if origin in (list, tuple, abc.Sequence):
        return (list,)
    return ()


def item_types(hint: Any) -> tuple[type, ...]:
    """The YAML types of the elements of the list an annotation admits (empty: none)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    for arg in typing.get_args(hint) if union else (hint,):
        if typing.get_origin(arg) in (list, tuple, abc.Sequence):
            return yaml_types(typing.get_args(arg)[0])
    return ()


def _small(value: Any, limit: int = 1000) -> bool:
    """Whether ``value`` holds at most ``limit`` items, counting shared ones each time they
    appear (a value built from nested YAML aliases can be exponentially large)."""
    stack, seen = [value], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > limit:
            return False
        if isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list | tuple | set):
            stack += list(item)
    return True


def _show(value: Any) -> str:
    if not _small(value):
        return f"<a {type(value).__name__} too large to show>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(types_: tuple[type, ...]) -> str:
    return " or ".join(dict.fromkeys(_NAMES[t] for t in types_))


def _is(value: Any, types_: tuple[type, ...]) -> bool:
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    exact = any(isinstance(value, t) and (t is bool or not isinstance(value, bool)) for t in types_)
    return exact or (numeric and float in types_)


def _bounds(value: float, spec: Field) -> str | None:
    if not math.isfinite(value):
        return "is not a finite number"
    if spec.low is not None and (value < spec.low or (spec.open_low and value == spec.low)):
        return f"must be {'>' if spec.open_low else '>='} {spec.low:g}"
    if spec.high is not None and (value > spec.high or (spec.open_high and value == spec.high)):
        return f"must be {'<' if spec.open_high else '<='} {spec.high:g}"
    return None


def fails(value: Any, spec: Field) -> str | None:
    """Why ``value`` does not fit ``spec``, or None."""
    if not _is(value, spec.types):
        return f"is {type(value).__name__}, expected {_type_name(spec.types)}"
    if isinstance(value, list) and spec.items and not all(_is(v, spec.items) for v in value):
        return f"must list {_type_name(spec.items).removeprefix('a ')}s"
    admitted = spec.also is not None and spec.also(value)
    if spec.choices is not None and value not in spec.choices and not admitted:
        return f"is not one of {', '.join(map(str, spec.choices))}"
    if isinstance(value, int | float) and not isinstance(value, bool):
        problem = _bounds(value, spec)
        if problem is not None:
            return problem
    if spec.test is not None and value is not None:
        return spec.test(value)
    return None


def error(source: Source, path: Path_, value: Any, problem: str, fix: str) -> RecipeError:
    """A :class:`RecipeError` reading ``file:line: key = value problem; Fix: fix``."""
    key = ".".join(path) or "recipe"
    tail = "" if "Fix:" in problem else f"; Fix: {fix}"  # a wrapped error brings its own
    return RecipeError(f"{source.where(path)}: {key} = {_show(value)} {problem}{tail}")


def unknown(source: Source, path: Path_, key: str, known: list[str]) -> RecipeError:
    """``key`` under ``path`` is no key of the schema: suggest the closest of ``known``."""
    close = difflib.get_close_matches(key, known, 1, cutoff=0.5)
    fix = f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(known)}."
    where = ".".join((*path, key))
    return RecipeError(f"{source.where((*path, key))}: unknown key {where!r}; Fix: {fix}")


def value(source: Source, path: Path_, given: Any, spec: Field) -> Any:
    """``given`` when it fits ``spec``; else the error at ``path``."""
    problem = fails(given, spec)
    if problem is not None:
        fix = spec.example or "see prunekit run --help."
        if spec.choices is not None:
            close = difflib.get_close_matches(str(given), [str(c) for c in spec.choices], 1)
            choices = ", ".join(map(str, spec.choices))
            fix = f"did you mean {close[0]!r}?" if close else f"one of {choices}."
        raise error(source, path, given, problem, fix)
    return given


def constrained(source: Source, path: Path_, given: Any, constraint: Constraint) -> Any:
    """``given`` parsed by a settings ``constraint`` (e.g. ``"2:4"`` into its granularity);
    its error at ``path``, with what the constraint accepts as the fix."""
    try:
        return constraint.check(given)
    except PruningError as err:
        text = str(err)
        problem = text if text.startswith(("is ", "must ")) else f"is invalid: {text}"
        raise error(source, path, given, problem, f"{path[-1]}: {constraint.text}.") from err
