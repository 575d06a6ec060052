"""Mutated state dicts through ``pk.masks.load_state_dict`` and ``Pruner.load_state_dict``,
and cut, flipped and hostile YAML through the recipe loader.

Every mutation of a state dict is tried (a key dropped, added, reshaped, retyped or its
value replaced by each of :data:`ODD`): each is refused cleanly (a PruningError naming a
key, the model unchanged) or loads. Hypothesis cuts and flips a valid recipe; YAML tags
that would call Python, self-referencing aliases and deep nesting are refused, and the
marker the tags would create never appears.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_bad_inputs import FILES, LIMIT_S, bounded, mlp, pruned, refuses_cleanly, time_limit

import prunekit as pk
from prunekit.recipes import validate

pytestmark = pytest.mark.usefixtures("one_thread")
MARKER = FILES / "yaml-ran"  # what the hostile YAML tags create if anything runs them
TENSORS = [torch.zeros(0), torch.full((3,), float("nan")), torch.zeros(2, 2).long()]
OTHERS = [None, 1.5, "w"]
ODD = [*TENSORS, *OTHERS]


def mutations(state: dict[str, Any], odd: list[Any], drop: bool = True) -> Iterator[tuple]:
    """Every single edit of ``state``: each key dropped (with ``drop``), reshaped, retyped
    or replaced by each of ``odd``, and an extra key holding each of ``odd``."""
    for key in sorted(state):
        yield from [("drop", key)] if drop else []
        yield from [("reshape", key), ("retype", key)]
        yield from (("replace", key, value) for value in odd)
    yield from (("add", "extra", value) for value in odd)


def mutated(state: dict[str, Any], mutation: tuple) -> dict[str, Any]:
    kind, key, *rest = mutation
    state = dict(state)
    value = state.get(key)
    if kind == "drop":
        del state[key]
    elif kind in ("add", "replace"):
        state[key] = rest[0]
    elif kind == "reshape" and isinstance(value, torch.Tensor):
        state[key] = torch.cat([value.flatten(), value.flatten()[:1]])
    elif kind == "retype" and isinstance(value, torch.Tensor):
        state[key] = value.to(torch.float64 if value.is_floating_point() else torch.int64)
    return state


def mask_states(odd: list[Any], drop: bool = True) -> None:
    """Every mutation of a masked state dict through ``pk.masks.load_state_dict``."""
    state = pruned().state_dict()
    for mutation in mutations(state, odd, drop):
        model, edited = mlp(), mutated(state, mutation)
        keys = tuple(str(k) for k in {*edited, *model.state_dict()})  # a message names a key
        call = functools.partial(pk.masks.load_state_dict, model, edited)
        if refuses_cleanly(call, model, mutation[1], keys) is None:
            assert pk.sparsity(model).total > 0, mutation


def pruner_states(odd: list[Any], drop: bool = True) -> None:
    """Every mutation of a Pruner's state through ``Pruner.load_state_dict``."""
    source = pk.Pruner(mlp(), 0.5)
    source.step()
    state = source.state_dict()
    for mutation in mutations(state, odd, drop):
        model = mlp()
        pruner, edited = pk.Pruner(model, 0.5), mutated(state, mutation)
        call = functools.partial(pruner.load_state_dict, edited)
        refuses_cleanly(call, model, mutation[1], (mutation[1],))


def test_mutated_mask_state_dicts_are_refused_or_load() -> None:
    mask_states(ODD)


@pytest.mark.parametrize("state", [None, 3, "w", [torch.zeros(2)], torch.zeros(2), {1: 2}])
def test_mask_states_that_are_no_mapping_of_tensors_are_refused(state: Any) -> None:
    model = mlp()
    keys = ("state_dict", "1")
    err = refuses_cleanly(lambda: pk.masks.load_state_dict(model, state), model, state, keys)
    assert err is not None


def test_mutated_pruner_states_are_refused_or_load() -> None:
    pruner_states(ODD)


def test_a_pruner_state_missing_a_key_names_it() -> None:
    pruner = pk.Pruner(mlp(), 0.5)
    state = pruner.state_dict()
    del state["history"]
    with pytest.raises(pk.PruningError, match=r"lacks \['history'\]"):
        pruner.load_state_dict(state)


RECIPE = """\
name: fuzz
model: lenet300
data: {dataset: digits}
train: {epochs: 1}
prune: {granularity: element, criterion: magnitude, sparsity: 0.5}
"""
LAUGHS = [
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
]
BOMB = [f"&a [{', '.join(['x'] * 9)}]", *(line.split(": ", 1)[1].strip() for line in LAUGHS)]
HOSTILE_YAML = {
    "python tag": f"!!python/object/apply:os.mkdir [{str(MARKER)!r}]\n",
    "python tag in a value": f"name: !!python/object/apply:os.mkdir [{str(MARKER)!r}]\n",
    "python/object/new": f"model: !!python/object/new:os.mkdir [{str(MARKER)!r}]\n",
    "self-referencing alias": "a: &a [*a, *a]\n",
    "billion laughs": "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(LAUGHS),
    "billion laughs in a value": "name: x\ndescription: [" + ", ".join(BOMB) + "]\n",
    "nested 500 deep": "name: x\nmodel: " + "[" * 500 + "]" * 500 + "\n",
    "a NUL byte": "name: x\x00\n",
    "a DEL byte": "name: fuzz\x7f\n",
}


def recipe_refused(path: Path) -> None:
    err = refuses_cleanly(lambda: validate.load(path), None, path.name, (path.name,))
    assert err is not None and not MARKER.exists()


@pytest.mark.parametrize("text", HOSTILE_YAML)
def test_hostile_recipes_are_refused_and_run_nothing(text: str, tmp_path: Path) -> None:
    (tmp_path / "evil.yaml").write_text(HOSTILE_YAML[text])
    with time_limit(LIMIT_S):
        recipe_refused(tmp_path / "evil.yaml")


def test_cut_and_flipped_recipes_are_refused_or_load(tmp_path: Path) -> None:
    validate.loads(RECIPE)  # the untouched recipe is valid

    @bounded(ci=20)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        blob = bytearray(RECIPE.encode())
        for spot in data.draw(st.lists(st.integers(0, len(blob) - 1), max_size=4), "flips"):
            blob[spot] ^= 1 << data.draw(st.integers(0, 7), "bit")
        blob = blob[: data.draw(st.integers(0, len(blob)), "cut")]
        (tmp_path / "r.yaml").write_bytes(bytes(blob))
        refuses_cleanly(lambda: validate.load(tmp_path / "r.yaml"), None, "r.yaml", ("r.yaml",))

    run()
