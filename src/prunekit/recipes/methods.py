"""The recipe keys of the timing methods, derived from their settings classes.

A timing method's settings (:mod:`prunekit.training.configs`) say which recipe keys it
reads: its field ``f`` is the key ``PATHS[f]`` (``timing.f`` when unlisted); a ``spec``
field brings the ``prune`` keys of :class:`~prunekit.PruneSpec`; a ``fixed`` setting may
be written only as the method fixes it. :func:`sections` types every such key from the
field's annotation and gives it the field's default (:data:`RECIPE_DEFAULTS` where a
recipe differs); :func:`settings` builds the chosen method's settings from a recipe, each
value checked by the method's own constraint and every key it does not take refused,
naming the method's type and the keys it takes.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from types import SimpleNamespace
from typing import Any

from prunekit.errors import PruningError, RecipeError
from prunekit.recipes.fields import Field, constrained, error, item_types, yaml_types
from prunekit.recipes.source import Path_, Source
from prunekit.spec import Constraint, PruneSpec, Settings
from prunekit.training.configs import METHODS, Method, render

# A setting's recipe key where it is not timing.<setting>.
PATHS: dict[str, Path_] = {
    "epochs": ("train", "epochs"),
    "lr": ("train", "lr"),
    "optimizer": ("train", "optimizer"),
    "finetune_epochs": ("finetune", "epochs"),
    "finetune_lr": ("finetune", "lr"),
    "sparsity": ("prune", "sparsity"),
    "criterion": ("prune", "criterion"),
    "schedule": ("schedule", "kind"),
    **{k: ("schedule", k) for k in ("start", "end", "rounds", "spacing", "initial")},
    **{k: ("prune", k) for k in ("include_output", "include_embeddings")},  # lottery's own
}
# The recipe's seed is top-level; a loss function cannot be written in YAML.
SPEC_KEYS = tuple(
    f.name for f in dataclasses.fields(PruneSpec) if f.name not in ("seed", "loss_fn")
)
# A recipe prunes only when told how much, and trains the lottery control only when asked.
RECIPE_DEFAULTS: dict[Path_, Any] = {("prune", "sparsity"): None, ("timing", "control"): False}
WHEN = tuple(dict.fromkeys(m.when for m in METHODS))
BY_WHEN = {when: tuple(m.name for m in METHODS if m.when == when) for when in WHEN}
BY_NAME = {m.name: m for m in METHODS}


def keys(cls: type[Method]) -> dict[Path_, str]:
    """``{recipe key: setting}`` of the keys ``cls`` takes (``spec.<field>`` for prune keys)."""
    out: dict[Path_, str] = {}
    for f in dataclasses.fields(cls):
        if f.name == "spec":
            out.update({("prune", k): f"spec.{k}" for k in SPEC_KEYS})
        else:
            out[PATHS.get(f.name, ("timing", f.name))] = f.name
    return out


def _owner(cls: type[Method], name: str) -> tuple[type[Settings], str]:
    return (PruneSpec, name[5:]) if name.startswith("spec.") else (cls, name)


def constraint(cls: type[Method], name: str) -> Constraint | None:
    """The constraint ``cls`` declares for its setting ``name`` (None: any YAML value)."""
    owner, field = _owner(cls, name)
    return owner.constraints.get(field)


@functools.cache
def homes() -> dict[Path_, tuple[type[Method], str]]:
    """Each method key's first declaring method and setting, in :data:`METHODS` order."""
    out: dict[Path_, tuple[type[Method], str]] = {}
    for cls in METHODS:
        for path, name in keys(cls).items():
            out.setdefault(path, (cls, name))
    return out


def _field(path: Path_, cls: type[Method], name: str) -> Field:
    owner, attr = _owner(cls, name)
    hint = typing.get_type_hints(owner)[attr]
    spec = next(f for f in dataclasses.fields(owner) if f.name == attr)  # type: ignore[arg-type]
    factory = spec.default_factory
    default = spec.default if factory is dataclasses.MISSING else factory()
    return Field(yaml_types(hint), RECIPE_DEFAULTS.get(path, default), items=item_types(hint))


def sections() -> dict[str, dict[str, Field]]:
    """The sections the timing methods read, every key typed and defaulted (ranges and
    choices are the methods' own: :func:`settings` checks them)."""
    out: dict[str, dict[str, Field]] = {
        "timing": {
            "when": Field((str,), WHEN[0], choices=WHEN),
            "method": Field((str, type(None)), None, example="method: gradual"),
        }
    }
    spec_first = sorted(homes().items(), key=lambda item: item[0][1] not in SPEC_KEYS)
    for path, (cls, name) in spec_first:  # prune: the spec's keys, then the sparsity
        out.setdefault(path[0], {})[path[1]] = _field(path, cls, name)
    return out


def method(source: Source, timing: dict[str, Any]) -> type[Method]:
    """The settings class of ``timing.when`` / ``timing.method`` (filling in the default
    method of ``when``)."""
    valid = BY_WHEN[timing["when"]]
    timing["method"] = timing["method"] or valid[0]
    if timing["method"] not in valid:
        raise error(
            source,
            ("timing", "method"),
            timing["method"],
            f"is not a method for when: {timing['when']}",
            f"one of {', '.join(valid)}.",
        )
    return BY_NAME[timing["method"]]


def _given(source: Source) -> list[Path_]:
    paths = [(s, k) for s in dict.fromkeys(p[0] for p in homes()) for k in source.data.get(s) or {}]
    return sorted((p for p in paths if p[0] != "timing" or p[1] not in ("when", "method")),
                  key=source.line)  # fmt: skip


def _refuse(source: Source, cls: type[Method], path: Path_, value: Any) -> RecipeError:
    taken = list(keys(cls))
    here = [".".join(p) for p in taken if p[0] == path[0]]
    takes = f"{here[0]} alone" if len(here) == 1 else ", ".join(here) or f"no {path[0]} keys"
    listed = ", ".join(".".join(p) for p in taken)
    return error(source, path, value, f"is not used by {cls.name}, which takes {takes}",
                 f"drop {path[1]} ({cls.__name__} takes {listed}).")  # fmt: skip


def _parse(source: Source, cls: type[Method], settings: dict[str, Any]) -> dict[str, Any]:
    """``{setting: parsed value}`` of ``cls``; a given key it does not take is refused
    (after its value is checked where another method takes it)."""
    taken = keys(cls)
    given = [p for p in _given(source) if p not in taken]
    fixed = {p: cls.fixed[p[1]] for p in given if p[0] == "prune" and p[1] in cls.fixed}
    for path in given:
        check = constraint(*homes()[path])
        if path not in fixed and check is not None:
            constrained(source, path, settings[path[0]][path[1]], check)
    for path in given:
        if path not in fixed:
            raise _refuse(source, cls, path, settings[path[0]][path[1]])
    for path, value in fixed.items():
        written = settings[path[0]][path[1]]
        if str(written).strip().lower() != value:
            raise error(source, path, written, f"is not used by {cls.why}",
                        f"{path[1]}: {value}, or drop it.")  # fmt: skip
    values = {}
    for path, name in sorted(taken.items(), key=lambda item: source.line(item[0])):
        check = constraint(cls, name)
        raw = settings[path[0]][path[1]]
        values[name] = raw if check is None else constrained(source, path, raw, check)
    return values


def _spec(source: Source, values: dict[str, Any], seed: int, prune: Any) -> None:
    """Replace the ``spec.*`` values by one :class:`PruneSpec`."""
    fields = {name[5:]: values.pop(name) for name in list(values) if name.startswith("spec.")}
    if fields:
        try:
            values["spec"] = PruneSpec(**fields, seed=seed)
        except PruningError as err:
            raise error(source, ("prune",), prune, f"is invalid: {err}", "fix prune:.") from err


def settings(source: Source, recipe: dict[str, Any], cls: type[Method]) -> Method:
    """``cls``'s settings from the checked ``recipe`` sections; the first error at its line."""
    values = _parse(source, cls, recipe)
    _spec(source, values, recipe["seed"], recipe["prune"])
    paths = {name: path for path, name in keys(cls).items()}
    found = cls.violation(SimpleNamespace(**values))
    if found is not None:
        rule, problem = found
        path = paths[rule.field]
        names = {"method": cls.name, **{n: ".".join(p) for n, p in paths.items()}}
        raise error(source, path, recipe[path[0]][path[1]], render(problem, names),
                    render(rule.fix, names))  # fmt: skip
    return cls(**values)  # passes: every check it runs has run above, at its line
