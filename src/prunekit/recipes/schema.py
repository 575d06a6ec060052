"""The recipe schema: every section, key, type, range and default, declared once.

A small typed schema of our own rather than a library (jsonschema, pydantic): a recipe
error must name ``file:line``, the key, the bad value *and the fix*, and suggest the
closest key for a typo; with our own ~150 lines every message is written for that, where a
library's generic messages would have to be re-mapped after the fact. :func:`check`
returns the recipe as ``{section: {key: value}}`` with every default filled in.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prunekit.errors import RecipeError
from prunekit.export import FORMATS, SPARSE
from prunekit.recipes.source import Path_, Source
from prunekit.zoo.data import DATASETS

REQUIRED = object()
FOLDER = "letters, digits, '.', '_' or '-', starting with a letter or digit"


@dataclass(frozen=True)
class Field:
    """One key: its accepted types, default (``REQUIRED`` for none), allowed ``choices``,
    inclusive numeric bounds ``low`` / ``high`` (``open_low`` / ``open_high`` exclude
    them), an extra ``test`` returning an error text, and an ``example`` for the fix."""

    types: tuple[type, ...]
    default: Any = None
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    test: Callable[[Any], str | None] | None = None
    example: str = ""


def _folder(value: str) -> str | None:
    ok = value[:1].isalnum() and all(c.isalnum() or c in "._-" for c in value)
    return None if ok else f"is not a folder name ({FOLDER})"


def _names(value: list) -> str | None:
    return None if all(isinstance(v, str) for v in value) else "must list layer names"


def _allocation(value: Any) -> str | None:
    if isinstance(value, str):
        return None if value in ("uniform", "erk") else "is neither 'uniform', 'erk' nor a map"
    bad = [k for k, v in value.items() if not isinstance(v, int | float) or not 0 <= v < 1]
    return f"has sparsities outside [0, 1) for {bad}" if bad else None


def _formats(value: list) -> str | None:
    bad = [v for v in value if v not in FORMATS]
    return f"has unknown formats {bad} (valid: {', '.join(FORMATS)})" if bad else None


def _rewind(value: Any) -> str | None:
    ok = value == "init" or (isinstance(value, int) and value >= 0)
    return None if ok else "is neither 'init' nor an optimizer step >= 0"


NUM = (int, float)
FRACTION = {"low": 0.0, "high": 1.0, "open_high": True}
WHEN = ("after", "during", "before")
METHODS = {
    "after": ("finetune",),
    "during": ("gradual", "soft-filter", "slimming"),
    "before": ("at-init", "lottery"),
}

SCHEMA: dict[str, dict[str, Field] | Field] = {
    "name": Field((str,), REQUIRED, test=_folder, example="name: lenet5-filter"),
    "description": Field((str,), ""),
    "kind": Field((str,), "prune", choices=("prune", "llm")),
    "seed": Field((int,), 0, low=0, example="seed: 0"),
    "model": {
        "spec": Field((str,), REQUIRED, example="spec: lenet5"),
        "kwargs": Field((dict,), {}, example="kwargs: {in_features: 64}"),
        "checkpoint": Field((str, type(None)), None),
    },
    "data": {
        "dataset": Field((str,), None, choices=DATASETS),
        "flat": Field((bool,), False),
        "calibration_batches": Field((int,), 4, low=1),
        "batch_size": Field((int,), 64, low=1),
    },
    "train": {
        "epochs": Field((int,), 2, low=0),
        "lr": Field(NUM, 1e-3, low=0, open_low=True),
        "optimizer": Field((str,), "adam", choices=("adam", "sgd")),
    },
    "prune": {
        "granularity": Field((str,), "element", example="granularity: filter"),
        "criterion": Field((str,), "magnitude", example="criterion: l2"),
        "scope": Field((str,), "local", choices=("local", "global")),
        "allocation": Field((str, dict), "uniform", test=_allocation, example="allocation: erk"),
        "sparsity": Field((*NUM, type(None)), None, **FRACTION, example="sparsity: 0.8"),
        "layers": Field((list, type(None)), None, test=_names, example="layers: [fc1, fc2]"),
        "exclude": Field((list, type(None)), None, test=_names, example="exclude: [fc3]"),
    },
    "schedule": {
        "kind": Field((str,), "one-shot", choices=("one-shot", "iterative", "cubic")),
        "start": Field(NUM, 0.0, **FRACTION),
        "end": Field(NUM, 1.0, low=0.0, high=1.0, open_low=True),
        "rounds": Field((int,), 4, low=1, example="rounds: 4"),
        "spacing": Field((str,), "geometric", choices=("equal", "geometric")),
        "initial": Field(NUM, 0.0, **FRACTION),
    },
    "timing": {
        "when": Field((str,), "after", choices=WHEN),
        "method": Field((str, type(None)), None, example="method: gradual"),
        "rewind": Field((str, int), "init", test=_rewind, example="rewind: init (or a step)"),
        "sparsity_lambda": Field(NUM, 1e-4, low=0),
        "control": Field((bool,), False),
    },
    "finetune": {
        "epochs": Field((int,), 1, low=0),
        "lr": Field(NUM, 1e-4, low=0, open_low=True),
    },
    "materialize": {
        "mode": Field((str,), "masks", choices=("masks", "bake", "shrink", "sparse")),
        "format": Field((str,), "auto", choices=SPARSE),
    },
    "export": {
        "formats": Field((list,), [], test=_formats, example="formats: [safetensors, csr]"),
    },
    "llm": {
        "method": Field((str,), "wanda", choices=("magnitude", "wanda", "sparsegpt")),
        "sparsity": Field((*NUM, str), 0.5, example="sparsity: 0.5 (or '2:4')"),
        "allocation": Field((str,), "uniform", choices=("uniform", "owl")),
        "samples": Field((int,), 32, low=1),
        "seq_len": Field((int,), 128, low=2),
    },
}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(types: tuple[type, ...]) -> str:
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        dict: "a mapping",
        list: "a list",
        type(None): "null",
    }
    return " or ".join(dict.fromkeys(names[t] for t in types))


def _fails(value: Any, spec: Field) -> str | None:
    """Why ``value`` does not fit ``spec``, or None."""
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    ok_type = any(
        isinstance(value, t) and (t is bool or not isinstance(value, bool)) for t in spec.types
    ) or (numeric and float in spec.types)
    if not ok_type:
        return f"is {type(value).__name__}, expected {_type_name(spec.types)}"
    if spec.choices is not None and value not in spec.choices:
        return f"is not one of {', '.join(map(str, spec.choices))}"
    if numeric and (isinstance(value, float) and not math.isfinite(value)):
        return "is not a finite number"
    if (
        numeric
        and spec.low is not None
        and (value < spec.low or (spec.open_low and value == spec.low))
    ):
        return f"must be {'>' if spec.open_low else '>='} {spec.low:g}"
    if (
        numeric
        and spec.high is not None
        and (value > spec.high or (spec.open_high and value == spec.high))
    ):
        return f"must be {'<' if spec.open_high else '<='} {spec.high:g}"
    if spec.test is not None and value is not None:
        return spec.test(value)
    return None


def error(source: Source, path: Path_, value: Any, problem: str, fix: str) -> RecipeError:
    """A :class:`RecipeError` reading ``file:line: key = value problem; Fix: fix``."""
    key = ".".join(path) or "recipe"
    tail = "" if "Fix:" in problem else f"; Fix: {fix}"  # a wrapped error brings its own
    return RecipeError(f"{source.where(path)}: {key} = {_show(value)} {problem}{tail}")


def _unknown(source: Source, path: Path_, key: str, known: list[str]) -> RecipeError:
    close = difflib.get_close_matches(key, known, 1, cutoff=0.5)
    fix = f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(known)}."
    where = ".".join((*path, key))
    return RecipeError(f"{source.where((*path, key))}: unknown key {where!r}; Fix: {fix}")


def _value(source: Source, path: Path_, value: Any, spec: Field) -> Any:
    problem = _fails(value, spec)
    if problem is not None:
        fix = spec.example or "see prunekit run --help."
        if spec.choices is not None:
            close = difflib.get_close_matches(str(value), [str(c) for c in spec.choices], 1)
            fix = (
                f"did you mean {close[0]!r}?"
                if close
                else f"one of {', '.join(map(str, spec.choices))}."
            )
        raise error(source, path, value, problem, fix)
    return value


def _section(source: Source, name: str, given: Any, fields: dict[str, Field]) -> dict[str, Any]:
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise error(source, (name,), given, "is not a mapping", f"indent its keys under {name}:")
    for key in given:
        if key not in fields:
            raise _unknown(source, (name,), key, list(fields))
    out = {}
    for key, spec in fields.items():
        if key not in given:
            if spec.default is REQUIRED:
                raise RecipeError(
                    f"{source.where((name,))}: {name}.{key} is missing; Fix: add {spec.example}"
                )
            out[key] = spec.default
        else:
            out[key] = _value(source, (name, key), given[key], spec)
    return out


def check(source: Source) -> dict[str, Any]:
    """Every key of ``source`` checked against :data:`SCHEMA`, defaults filled in."""
    for key in source.data:
        if key not in SCHEMA:
            raise _unknown(source, (), key, list(SCHEMA))
    out: dict[str, Any] = {}
    for key, spec in SCHEMA.items():
        given = source.data.get(key)
        if isinstance(spec, dict):
            if key == "model" and isinstance(given, str):  # shorthand: model: lenet5
                given = {"spec": given}
            out[key] = _section(source, key, given, spec)
        elif key not in source.data:
            if spec.default is REQUIRED:
                raise RecipeError(f"{source.filename}:1: {key} is missing; Fix: add {spec.example}")
            out[key] = spec.default
        else:
            out[key] = _value(source, (key,), given, spec)
    return out
