"""The fields of a checkpoint's ``state.json``, range-checked before anything is restored
(used by :mod:`prunekit.training.checkpoint`, where the digest has already matched).

Every pipeline that checkpoints has a :class:`Schema` here: what its JSON ``state`` holds
(the per-round history, one entry per completed round, and the other fields) and whether
its extra tensors mirror the dense model (the lottery's rewind point ``theta_k``). Each
rule takes the value and the run's config (``identity["config"]``), so a field can be
checked against the run's own ``rounds``, ``epochs`` or ``rewind``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from prunekit.errors import CheckpointError

RNG_KEY, EXTRA = "rng.torch", "extra."  # the tensor of torch's RNG state; extra tensors' prefix
FIX = "Fix: delete the checkpoint directory to start over, or use another checkpoint_dir."

Rule = tuple[Callable[[Any, dict[str, Any]], bool], str]  # (ok(value, config), expected)


def _real(value: Any, config: dict[str, Any] | None = None) -> bool:
    return type(value) in (int, float)


def _int(value: Any, low: int, high: int | None = None) -> bool:
    return type(value) is int and low <= value and (high is None or value <= high)


def _ints(value: Any, length: int) -> bool:
    return isinstance(value, list) and len(value) == length and all(type(v) is int for v in value)


_SHARE: Rule = (lambda v, c: _real(v) and 0 <= v <= 1, "a fraction in [0, 1]")
_SCORE: Rule = (_real, "a number")


@dataclass(frozen=True)
class Schema:
    """A pipeline's JSON state: ``history`` names the per-round list, whose first entry is
    round ``first``; ``entry`` the rules of an entry's other fields; ``fields`` those of the
    state's other fields; ``extra``: the extra tensors are the dense model's (else none)."""

    history: str
    first: int
    entry: dict[str, Rule]
    fields: dict[str, Rule] = field(default_factory=dict)
    extra: bool = False


SCHEMAS = {
    "lottery": Schema(
        "history",
        0,
        {
            "remaining": _SHARE,
            "best_epoch": (lambda v, c: _int(v, 1, c["epochs"]), "an epoch in [1, epochs]"),
            "accuracy": _SCORE,
            "final_accuracy": _SCORE,
            "control_accuracy": (lambda v, c: v is None or _real(v), "a number or null"),
        },
        {"rewind": (lambda v, c: _int(v, 0) and v == c["rewind"], "the run's rewind step")},
        extra=True,
    ),
    "iterative_pruning": Schema(
        "rounds",
        1,
        {"sparsity": _SHARE, "pruned_accuracy": _SCORE, "retrained_accuracy": _SCORE},
        {"dense": _SCORE},
    ),
}


def prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors whose names start with ``prefix``, under the rest of their names."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def invalid(path: Path, name: str, value: Any, expected: str) -> CheckpointError:
    """The error for field ``name`` of the checkpoint at ``path`` holding ``value``."""
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return CheckpointError(
        f"checkpoint {path}: {name} is {shown}, expected {expected}; nothing was changed. {FIX}"
    )


def numpy_state(saved: list) -> tuple:
    """numpy's RNG state as saved in ``state.json``, as ``np.random.set_state`` takes it."""
    kind, keys, pos, has_gauss, gauss = saved
    return kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss


def python_state(saved: list) -> tuple:
    """Python's RNG state as saved in ``state.json``, as ``random.setstate`` takes it."""
    version, internal, gauss_next = saved
    return version, tuple(internal), gauss_next


# Per RNG: the JSON types of its saved state, and a restore into a throwaway generator.
_RNGS: dict[str, tuple[Callable[[list], bool], Callable[[list], None]]] = {
    "numpy": (
        lambda s: len(s) == 5 and s[0] == "MT19937" and _ints(s[1], 624) and _int(s[2], 0)
        and _int(s[3], 0, 1) and _real(s[4]),
        lambda s: np.random.RandomState().set_state(numpy_state(s)),
    ),
    "python": (
        lambda s: len(s) == 3 and _int(s[0], 0) and _ints(s[1], 625)
        and (s[2] is None or _real(s[2])),
        lambda s: random.Random().setstate(python_state(s)),
    ),
}  # fmt: skip


def _check_rng(path: Path, rng: Any, torch_state: Any) -> None:
    """The RNG states, typed and then restored into throwaway generators (which check them
    as the global ones would), so that restoring them cannot fail half-way."""
    if not isinstance(rng, dict) or set(rng) != set(_RNGS):
        raise invalid(path, "rng", rng, "an object with the numpy and python states")
    for name, (typed, restore) in _RNGS.items():
        try:
            if not (isinstance(rng[name], list) and typed(rng[name])):
                raise TypeError("wrong types")
            restore(rng[name])
        except (TypeError, ValueError, OverflowError, IndexError) as err:
            raise invalid(path, f"rng.{name}", rng[name], f"a {name} RNG state ({err})") from err
    reference = torch.get_rng_state()
    ok = isinstance(torch_state, Tensor) and torch_state.dtype == reference.dtype
    if not (ok and torch_state.shape == reference.shape):
        shown = torch_state if not ok else (torch_state.dtype, tuple(torch_state.shape))
        raise invalid(path, "the rng.torch tensor", shown, f"uint8 of {tuple(reference.shape)}")
    try:
        torch.Generator().set_state(torch_state)
    except RuntimeError as err:
        raise invalid(
            path, "the rng.torch tensor", "invalid", f"a torch RNG state ({err})"
        ) from err


def _check_state(path: Path, state: Any, round: int, schema: Schema, config: dict) -> None:
    expected = {schema.history, *schema.fields}
    if not isinstance(state, dict) or set(state) != expected:
        raise invalid(path, "state", state, f"an object with the fields {sorted(expected)}")
    for name, (ok, what) in schema.fields.items():
        if not ok(state[name], config):
            raise invalid(path, f"state.{name}", state[name], what)
    history = state[schema.history]
    count = round - schema.first + 1
    if not isinstance(history, list) or len(history) != count:
        shown = len(history) if isinstance(history, list) else history
        raise invalid(path, f"state.{schema.history} (length)", shown,
                      f"{count}: one entry per completed round")  # fmt: skip
    keys = {"round", *schema.entry}
    for i, entry in enumerate(history):
        name = f"state.{schema.history}[{i}]"
        if not isinstance(entry, dict) or set(entry) != keys:
            raise invalid(path, name, entry, f"an object with the fields {sorted(keys)}")
        if not _int(entry["round"], i + schema.first, i + schema.first):
            raise invalid(path, f"{name}.round", entry["round"], str(i + schema.first))
        for key, (ok, what) in schema.entry.items():
            if not ok(entry[key], config):
                raise invalid(path, f"{name}.{key}", entry[key], what)


def _check_extra(path: Path, tensors: dict[str, Tensor], schema: Schema, identity: dict) -> None:
    """The extra tensors: the dense model's names and shapes (``schema.extra``), or none."""
    model, extra = identity["model"], prefixed(tensors, EXTRA)
    if not schema.extra:
        if extra:
            raise invalid(path, "the extra tensors", sorted(extra)[:4], "none")
        return
    if set(extra) != set(model):
        raise invalid(path, "the extra tensors", sorted(set(extra) ^ set(model))[:4],
                      "the dense model's state-dict names")  # fmt: skip
    for key, value in extra.items():
        if list(value.shape) != model[key]:
            raise invalid(path, f"the shape of extra tensor {key}", list(value.shape), model[key])


def check(path: Path, doc: dict[str, Any], tensors: dict[str, Tensor], identity: dict) -> None:
    """Range-check the fields of ``state.json``'s document ``doc`` (its digest matched and
    its ``identity`` is the caller's) and the tensors it names.

    Raises:
        CheckpointError: naming the first field out of range and the fix.
    """
    schema = SCHEMAS.get(identity.get("pipeline"))  # None: a bare save(), no pipeline schema
    config = identity.get("config", {})
    first, last = (schema.first, config.get("rounds")) if schema else (0, None)
    round = doc.get("round")
    if not _int(round, first, last):
        raise invalid(path, "round", round, f"a completed round in [{first}, {last or 'any'}]")
    if schema is not None:
        _check_state(path, doc.get("state"), round, schema, config)
        _check_extra(path, tensors, schema, identity)
    elif not isinstance(doc.get("state"), dict):
        raise invalid(path, "state", doc.get("state"), "an object")
    if doc.get("tensors") != f"round-{round:04d}.safetensors":
        raise invalid(path, "tensors", doc.get("tensors"), f"round-{round:04d}.safetensors")
    _check_rng(path, doc.get("rng"), tensors.get(RNG_KEY))
