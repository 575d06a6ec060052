"""Hostile shrunk layouts and weights through ``pk.load_shrunk``, pickles through every
loader, and ``pk.save_shrunk`` killed at every step.

Malformed ``shrunk.json`` (wrong types, missing or unknown keys, negative, zero, huge or
growing sizes, invalid or cut JSON, and a hypothesis mutation of a valid one), cut,
flipped or mismatched weights, and a pickle that would create a folder if it were ever
unpickled: each is a CheckpointError (a ShrunkLayoutError for a layout of another model)
and leaves the model exactly as it was. A save killed at any point leaves the old save or
the new one.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import pickle
import random
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import assert_unchanged, small_cnn, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hostile_files import REFUSED, Net, refuse
from torch import nn

import prunekit as pk
from prunekit import sparse
from prunekit.errors import CheckpointError
from prunekit.structured import io as shrunk_io
from prunekit.structured.surgery import size_attributes


def small_net() -> nn.Module:
    return small_cnn()


def shrunk(ratio: float) -> nn.Module:
    model = small_net().eval()
    pk.shrink(model, torch.randn(2, 3, 6, 6), ratio=ratio)
    return model


def fingerprint(model: nn.Module) -> tuple[dict, dict]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, {n: size_attributes(m) for n, m in model.named_modules()}


def same(model: nn.Module, print_: tuple[dict, dict]) -> bool:
    state, attrs = fingerprint(model)
    return (
        attrs == print_[1]
        and state.keys() == print_[0].keys()
        and all(
            v.shape == print_[0][k].shape and torch.equal(v, print_[0][k]) for k, v in state.items()
        )
    )


@pytest.fixture(scope="module")
def saved_a(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[dict, dict]]:
    model, path = shrunk(0.5), tmp_path_factory.mktemp("a") / "model"
    pk.save_shrunk(model, path)
    return path, fingerprint(model)


def with_layout(a: Path, to: Path, edit: Callable) -> Path:
    """A copy of save ``a`` whose shrunk.json is ``edit(layout)`` (text, or JSON)."""
    to.mkdir(parents=True, exist_ok=True)
    (to / "model.safetensors").write_bytes((a / "model.safetensors").read_bytes())
    text = edit(json.loads((a / "shrunk.json").read_text()))
    (to / "shrunk.json").write_text(text if isinstance(text, str) else json.dumps(text))
    return to


def _at(section: str, name: str, value: object) -> Callable:
    return lambda lay: {**lay, section: {**lay[section], name: value}}


def _attr(attr: str, value: object) -> Callable:
    return lambda lay: {**lay, "attributes": {**lay["attributes"], "0": {attr: value}}}


LAYOUT_EDITS = {
    "not json": (lambda lay: "{", "JSON"),
    "cut": (lambda lay: json.dumps(lay)[:200], "JSON"),
    "empty": (lambda lay: "", "JSON"),
    "a list": (lambda lay: [], r"\[\]"),
    "null": (lambda lay: None, "None"),
    "missing shapes": (lambda lay: {k: v for k, v in lay.items() if k != "shapes"}, "shapes"),
    "unknown key": (lambda lay: {**lay, "evil": 1}, "evil"),
    "other format": (lambda lay: {**lay, "format": "x/9"}, "x/9"),
    "shapes a list": (lambda lay: {**lay, "shapes": []}, "shapes"),
    "shape a string": (_at("shapes", "0.weight", "4"), "'4'"),
    "shape of fewer axes": (_at("shapes", "0.weight", [4]), r"\[4\]"),
    "negative size": (_at("shapes", "0.weight", [-1, 3, 3, 3]), "-1"),
    "zero size": (_at("shapes", "0.weight", [0, 3, 3, 3]), "= 0"),
    "huge size": (_at("shapes", "0.weight", [2**40, 3, 3, 3]), str(2**40)),
    "larger than the model": (_at("shapes", "0.weight", [9, 3, 3, 3]), "= 9 is larger"),
    "float size": (_at("shapes", "0.weight", [4.0, 3, 3, 3]), "4.0"),
    "unknown tensor": (_at("shapes", "nope.weight", [1]), "nope"),
    "attributes not objects": (_at("attributes", "0", 5), "5"),
    "unknown module": (_at("attributes", "nope", {"out_channels": 1}), "nope"),
    "unknown attribute": (_attr("__class__", 1), "__class__"),
    "attribute the module lacks": (_attr("num_heads", 2), "num_heads"),
    "negative attribute": (_attr("out_channels", -4), "-4"),
    "huge attribute": (_attr("out_channels", 2**40), str(2**40)),
    "bool attribute": (_attr("out_channels", True), "True"),
    "string attribute": (_attr("out_channels", "4"), "'4'"),
    "in-bounds tampering": (_attr("out_channels", 3), "SHA-256"),
    "other digest": (lambda lay: {**lay, "sha256": "0" * 64}, "SHA-256"),
}


@pytest.mark.parametrize("case", LAYOUT_EDITS)
def test_malformed_layouts_are_refused(saved_a, tmp_path: Path, case: str) -> None:
    edit, match = LAYOUT_EDITS[case]
    path = with_layout(saved_a[0], tmp_path / "bad", edit)
    refuse(lambda m: pk.load_shrunk(m, path), small_net(), match)


def test_bad_weight_files_are_refused(saved_a, tmp_path: Path) -> None:
    a, b = saved_a[0], tmp_path / "b"
    pk.save_shrunk(shrunk(0.25), b)
    blob = (a / "model.safetensors").read_bytes()
    layout = json.loads((a / "shrunk.json").read_text())
    old = {k: v for k, v in layout.items() if k != "sha256"}  # as saved before digests
    cases = [
        (layout, blob[:-9] + bytes([blob[-9] ^ 4]) + blob[-8:], "SHA-256"),
        (layout, blob[:-9], "SHA-256"),
        (old, blob[:-9], "cannot read"),
        (layout, (b / "model.safetensors").read_bytes(), "SHA-256"),
        (old, (b / "model.safetensors").read_bytes(), "does not match its shrunk.json"),
    ]
    for i, (text, data, match) in enumerate(cases):
        path = with_layout(a, tmp_path / f"bad{i}", lambda lay, text=text: text)
        (path / "model.safetensors").write_bytes(data)
        refuse(lambda m, p=path: pk.load_shrunk(m, p), small_net(), match)
    (path / "model.safetensors").unlink()
    refuse(lambda m: pk.load_shrunk(m, path), small_net(), "cannot read")


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else []
    )
    return [p for k, v in items for p in [(*prefix, k), *_paths(v, (*prefix, k))]]


SCALARS = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text()
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=5,
)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_mutated_layouts_load_exactly_or_are_refused(saved_a, data: st.DataObject) -> None:
    a, print_a = saved_a
    layout = json.loads((a / "shrunk.json").read_text())
    *parent, key = data.draw(st.sampled_from(_paths(layout)))
    node = mutated = copy.deepcopy(layout)
    for k in parent:
        node = node[k]
    action = data.draw(st.sampled_from(["replace", "nudge", "delete", "add"]))
    if action == "nudge" and type(node[key]) is int:
        node[key] += data.draw(st.integers(-3, 3))
    elif action == "delete" and isinstance(node, dict):
        del node[key]
    elif action == "add" and isinstance(node, dict):
        node[data.draw(st.text(max_size=8))] = data.draw(JSON)
    else:
        node[key] = data.draw(JSON)
    with tempfile.TemporaryDirectory() as tmp:
        path = with_layout(a, Path(tmp), lambda lay: mutated)
        model = small_net()
        before = snapshot(model), fingerprint(model)
        try:
            pk.load_shrunk(model, path)
        except REFUSED:
            assert_unchanged(model, before[0])
            assert fingerprint(model)[1] == before[1][1]
        else:
            assert same(model, print_a)


def test_pickles_are_never_unpickled(saved_a, tmp_path: Path) -> None:
    class Plant:
        def __init__(self, marker: Path) -> None:
            self.marker = marker

        def __reduce__(self) -> tuple:
            return (os.mkdir, (str(self.marker),))

    pickle.loads(pickle.dumps(Plant(tmp_path / "proof")))
    assert (tmp_path / "proof").is_dir()  # the payload works when unpickled
    marker = tmp_path / "marker"
    raw, zipped = tmp_path / "raw.pkl", tmp_path / "zipped.pt"
    raw.write_bytes(pickle.dumps({"w": Plant(marker)}))
    torch.save({"w": Plant(marker)}, zipped)
    for evil in (raw, zipped):
        refuse(lambda m, p=evil: sparse.load(m, p), Net())
        with pytest.raises(CheckpointError):
            sparse.NMTensor.load(evil)
        for name in ("model.safetensors", "shrunk.json"):
            path = with_layout(saved_a[0], tmp_path / "dir", lambda lay: lay)
            (path / name).write_bytes(evil.read_bytes())
            refuse(lambda m, p=path: pk.load_shrunk(m, p), small_net())
    assert not marker.exists()


def test_save_shrunk_keeps_other_folders_and_the_old_save(saved_a, tmp_path, monkeypatch) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="did not write"):
        pk.save_shrunk(shrunk(0.5), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    a = with_layout(saved_a[0], tmp_path / "a", lambda lay: lay)
    monkeypatch.setattr(shrunk_io, "_layout", lambda model: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        pk.save_shrunk(shrunk(0.25), a)
    assert same(pk.load_shrunk(small_net(), a), saved_a[1])


def _save_then_die(path: Path, model: nn.Module, kill_at: int) -> None:
    """In a forked child: save ``model`` to ``path``, SIGKILLed at its ``kill_at``-th step
    (building the layout, every fsync and rename); exits 0 if it gets through."""
    count = iter(range(10**6))

    def step(fn: Callable) -> Callable:
        def stepped(*args: object, **kwargs: object) -> object:
            if next(count) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return stepped

    for module, name in ((os, "fsync"), (os, "rename"), (os, "replace"), (shrunk_io, "_layout")):
        setattr(module, name, step(getattr(module, name)))
    pk.save_shrunk(model, path)
    os._exit(0)


def _alternate(path: Path, models: list[nn.Module]) -> None:
    """In a forked child: save the models over ``path`` in turn until killed."""
    while True:
        for model in models:
            pk.save_shrunk(model, path)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks the test process")
def test_killed_shrunk_saves_leave_the_old_save_or_the_new(saved_a, tmp_path: Path) -> None:
    fork, rng = multiprocessing.get_context("fork"), random.Random(0)
    model_a, model_b = shrunk(0.5), shrunk(0.25)
    prints = [saved_a[1], fingerprint(model_b)]
    runs = [(_save_then_die, (model_b, k)) for k in range(12)]
    runs += [(_alternate, ([model_b, model_a],)) for _ in range(8)]
    for i, (main, args) in enumerate(runs):
        path = with_layout(saved_a[0], tmp_path / str(i) / "save", lambda lay: lay)
        child = fork.Process(target=main, args=(path, *args))
        child.start()
        if main is _alternate:
            time.sleep(rng.uniform(0.01, 0.4))
            os.kill(child.pid, signal.SIGKILL)
        child.join(60)
        assert child.exitcode in (0, -signal.SIGKILL)
        loaded = pk.load_shrunk(small_net(), path)
        assert any(same(loaded, p) for p in prints), (main.__name__, args[1:])
    pk.save_shrunk(model_b, tmp_path / str(i) / "save")  # and clears what killed saves left
    assert sorted(p.name for p in (tmp_path / str(i)).iterdir()) == ["save"]
