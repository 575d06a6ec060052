"""Resumable pipelines: kill a real IMP run, restart it, compare bit for bit; interrupt
iterative pruning likewise; refuse bad checkpoints without touching model or files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_unchanged, killed_after_round, snapshot
from safetensors.torch import load_file
from torch import nn

import prunekit as pk
from prunekit.errors import CheckpointError
from prunekit.training import checkpoint
from prunekit.zoo import load_dataset

ROUNDS = 3

# The run under test; SLOW=1 pauses after each checkpoint so that the kill lands mid-run.
SCRIPT = f"""
import os, sys, time
import torch
from safetensors.torch import save_file
from torch import nn
import prunekit as pk
from prunekit.training import checkpoint
from prunekit.zoo import load_dataset

torch.set_num_threads(1)
if os.environ.get("SLOW"):
    save = checkpoint.save
    def slow_save(*args, **kwargs):
        path = save(*args, **kwargs)
        time.sleep(1)
        return path
    checkpoint.save = slow_save
model = lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
report = pk.training.lottery(
    model, load_dataset("digits", flat=True), rounds={ROUNDS}, rate=0.3, rewind=2, epochs=1,
    lr=1e-2, batch_size=256, seed=3, checkpoint_dir=sys.argv[1],
)
save_file(report.model.state_dict(), sys.argv[2])
"""


def _run(tmp: Path, ckpt: Path, out: Path, slow: bool = False) -> subprocess.Popen:
    script = tmp / "imp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "SLOW": "1" if slow else ""}
    return subprocess.Popen([sys.executable, str(script), str(ckpt), str(out)], env=env)


def test_killed_run_resumes_to_the_same_masks_and_weights(tmp_path):
    reference = _run(tmp_path, tmp_path / "ref", tmp_path / "ref.safetensors")
    victim = _run(tmp_path, tmp_path / "ckpt", tmp_path / "out.safetensors", slow=True)
    state = tmp_path / "ckpt" / checkpoint.STATE
    deadline = time.monotonic() + 60
    while not state.exists():
        assert time.monotonic() < deadline and victim.poll() is None, "no checkpoint appeared"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert json.loads(state.read_text())["round"] < ROUNDS  # really interrupted
    assert not (tmp_path / "out.safetensors").exists()

    assert _run(tmp_path, tmp_path / "ckpt", tmp_path / "out.safetensors").wait() == 0
    assert reference.wait() == 0
    resumed = load_file(tmp_path / "out.safetensors")
    expected = load_file(tmp_path / "ref.safetensors")
    assert resumed.keys() == expected.keys()
    assert any(k.endswith(".packed") for k in resumed)
    for key, value in expected.items():
        assert torch.equal(resumed[key], value), key
    assert json.loads(state.read_text())["round"] == ROUNDS


def tiny(hidden: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


FAST = {"epochs": 1, "batch_size": 256, "control": False}
ITERATIVE = {"target": 0.7, "epochs": 1, "batch_size": 256, "progress": False}


def lottery(model: nn.Module, data, checkpoint_dir: Path, rounds: int = 1):
    return pk.training.lottery(model, data, rounds=rounds, checkpoint_dir=checkpoint_dir, **FAST)


def iterative(model: nn.Module, data, checkpoint_dir: Path, rounds: int = 1):
    return pk.training.iterative_pruning(
        model, data, rounds=rounds, checkpoint_dir=checkpoint_dir, **ITERATIVE
    )


PIPELINES = [lottery, iterative]
BY_NAME = {p.__name__: p for p in PIPELINES}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", flat=True)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_checkpoint_of_another_model_or_run_is_refused(tmp_path, digits, pipeline):
    pipeline(tiny(), digits, tmp_path)
    files = _files(tmp_path)
    assert [n for n in files if n.endswith(".safetensors")] == ["round-0001.safetensors"]
    model = tiny(hidden=8)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"another model or run.*model"):
        pipeline(model, digits, tmp_path)
    assert_unchanged(model, before)
    model = tiny()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"another model or run \(differs in: config\)"):
        pipeline(model, digits, tmp_path, rounds=2)
    assert_unchanged(model, before)
    assert _files(tmp_path) == files


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("damage", ["json", "tensors", "missing"])
def test_corrupted_checkpoint_is_refused(tmp_path, digits, damage, pipeline):
    pipeline(tiny(), digits, tmp_path)
    tensors = tmp_path / "round-0001.safetensors"
    if damage == "json":
        (tmp_path / checkpoint.STATE).write_text('{"format": 1, "round": ')
    elif damage == "tensors":
        tensors.write_bytes(tensors.read_bytes()[:-7] + b"garbage")
    else:
        tensors.unlink()
    files = _files(tmp_path)
    model = tiny()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"is corrupted .*nothing was changed\. Fix: delete"):
        pipeline(model, digits, tmp_path)
    assert _files(tmp_path) == files
    assert_unchanged(model, before)


def test_iterative_pruning_resumes_to_the_same_masks_and_weights(tmp_path, digits):
    whole = tiny()
    iterative(whole, digits, tmp_path / "whole", rounds=3)
    with killed_after_round(1):
        iterative(tiny(), digits, tmp_path / "ckpt", rounds=3)
    assert json.loads((tmp_path / "ckpt" / checkpoint.STATE).read_text())["round"] == 1
    resumed = tiny()
    report = iterative(resumed, digits, tmp_path / "ckpt", rounds=3)
    assert [r.round for r in report.rounds] == [1, 2, 3]
    assert report.rounds[-1].sparsity == pytest.approx(0.7, abs=1e-3)
    expected = whole.state_dict()
    assert resumed.state_dict().keys() == expected.keys()
    assert any(k.endswith(".packed") for k in expected)
    for key, value in expected.items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_save_load_round_trip_restores_rng(tmp_path):
    import random

    import numpy as np

    identity = {"model": [1, 2]}
    checkpoint.save(tmp_path, 4, {"w": torch.arange(3.0)}, identity, {"history": [1]})
    expected = (torch.rand(2), np.random.rand(2), random.random())
    saved = checkpoint.load(tmp_path, identity)
    assert saved.round == 4 and saved.state["history"] == [1]
    assert torch.equal(saved.tensors["w"], torch.arange(3.0))
    saved.restore_rng()
    assert torch.equal(torch.rand(2), expected[0])
    assert np.array_equal(np.random.rand(2), expected[1]) and random.random() == expected[2]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert checkpoint.load(tmp_path / "absent", identity) is None


def test_a_failed_write_raises_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    identity = {"model": [1]}
    checkpoint.save(tmp_path, 1, {"w": torch.zeros(2)}, identity, {"n": 1})
    atomic_write = checkpoint.atomic_write

    def disk_full_on_state(path: Path, data: bytes) -> None:
        if path.name == checkpoint.STATE:
            raise OSError(28, "No space left on device")
        atomic_write(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write", disk_full_on_state)
    with pytest.raises(CheckpointError, match=r"could not write the round-2 .*No space.*Fix"):
        checkpoint.save(tmp_path, 2, {"w": torch.ones(2)}, identity, {"n": 2})
    saved = checkpoint.load(tmp_path, identity)
    assert saved.round == 1 and torch.equal(saved.tensors["w"], torch.zeros(2))


def _seal(doc: dict) -> str:
    """``doc`` sealed as the module docstring says: SHA-256 of its canonical JSON."""
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return json.dumps({**doc, "digest": hashlib.sha256(canonical.encode()).hexdigest()})


@pytest.fixture(scope="module")
def halfway(tmp_path_factory, digits) -> dict[str, Path]:
    """Each pipeline's checkpoint after round 1 of 2 (interrupted there)."""
    out = {}
    for pipeline in PIPELINES:
        directory = tmp_path_factory.mktemp(pipeline.__name__)
        with killed_after_round(1):
            pipeline(tiny(), digits, directory, rounds=2)
        out[pipeline.__name__] = directory
    return out


def _numpy_keys(doc: dict) -> None:
    doc["rng"]["numpy"][1] = doc["rng"]["numpy"][1][:3]


def _python_index(doc: dict) -> None:
    doc["rng"]["python"][1][-1] = 10**6


# (pipeline, what is edited, the edit, the field the error names)
EDITS = [
    ("lottery", "round past the run", lambda d: d.update(round=5), r"round is 5, expected a "),
    ("lottery", "round as final", lambda d: d.update(round=2), r"state\.history \(length\) is 2"),
    ("lottery", "round as text", lambda d: d.update(round="1"), r"round is '1'"),
    ("iterative", "round before the first", lambda d: d.update(round=0), r"round is 0"),
    ("lottery", "history entry dropped", lambda d: d["state"]["history"].pop(),
     r"state\.history \(length\) is 1, expected 2"),
    ("lottery", "history share", lambda d: d["state"]["history"][1].update(remaining=1.5),
     r"state\.history\[1\]\.remaining is 1\.5"),
    ("lottery", "history epoch", lambda d: d["state"]["history"][0].update(best_epoch=7),
     r"state\.history\[0\]\.best_epoch is 7"),
    ("iterative", "history round", lambda d: d["state"]["rounds"][0].update(round=2),
     r"state\.rounds\[0\]\.round is 2, expected 1"),
    ("iterative", "dense accuracy", lambda d: d["state"].update(dense="high"),
     r"state\.dense is 'high'"),
    ("lottery", "rewind point", lambda d: d["state"].update(rewind=3), r"state\.rewind is 3"),
    ("lottery", "numpy rng", _numpy_keys, r"rng\.numpy is"),
    ("iterative", "python rng", _python_index, r"rng\.python is"),
    ("lottery", "rng missing", lambda d: d["rng"].pop("python"), r"rng is"),
]  # fmt: skip


@pytest.mark.parametrize("reseal", [False, True], ids=["edited", "edited-and-resealed"])
@pytest.mark.parametrize(("pipeline", "what", "edit", "error"), EDITS, ids=[e[1] for e in EDITS])
def test_an_edited_state_is_refused(tmp_path, digits, halfway, pipeline, what, edit, error, reseal):
    """Edited (digest mismatch) or edited and resealed (the field's range check): refused,
    with the model, the RNGs and the files as they were."""
    shutil.copytree(halfway[pipeline], tmp_path, dirs_exist_ok=True)
    state = tmp_path / checkpoint.STATE
    doc = json.loads(state.read_text())
    digest = doc.pop("digest", None)
    edit(doc)
    state.write_text(_seal(doc) if reseal else json.dumps({**doc, "digest": digest}))
    files = _files(tmp_path)
    model = tiny()
    before, rng = snapshot(model), torch.get_rng_state()
    match = error if reseal else r"state\.json does not match its digest: edited"
    with pytest.raises(CheckpointError, match=match + r".*nothing was changed\. Fix: delete"):
        BY_NAME[pipeline](model, digits, tmp_path, rounds=2)
    assert_unchanged(model, before)
    assert torch.equal(torch.get_rng_state(), rng)
    assert _files(tmp_path) == files


LEFTOVERS = [".state.json.tmp-x1y2", ".round-0002.safetensors.tmp-abc", "round-0009.safetensors"]


def test_leftovers_of_interrupted_saves_go_with_the_next_save_or_resume(tmp_path, digits):
    lottery(tiny(), digits, tmp_path)  # complete: a rerun resumes and saves nothing
    kept = _files(tmp_path)
    for name in LEFTOVERS:
        (tmp_path / name).write_bytes(b"partial")
    lottery(tiny(), digits, tmp_path)
    assert _files(tmp_path) == kept
    identity = {"model": [1]}
    checkpoint.save(tmp_path / "bare", 1, {"w": torch.zeros(1)}, identity, {})
    for name in LEFTOVERS:
        (tmp_path / "bare" / name).write_bytes(b"partial")
    checkpoint.save(tmp_path / "bare", 2, {"w": torch.ones(1)}, identity, {})
    assert sorted(_files(tmp_path / "bare")) == ["round-0002.safetensors", checkpoint.STATE]


def test_tensors_outside_the_checkpoint_or_of_another_dtype_are_refused(tmp_path, digits, halfway):
    shutil.copytree(halfway["iterative"], tmp_path / "a")
    (tmp_path / "a" / "sub").mkdir()
    shutil.move(tmp_path / "a" / "round-0001.safetensors", tmp_path / "a" / "sub")
    state = tmp_path / "a" / checkpoint.STATE
    doc = json.loads(state.read_text())
    doc.pop("digest", None)
    state.write_text(_seal({**doc, "tensors": "sub/round-0001.safetensors"}))
    model = tiny()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"corrupted .*not a round-NNNN\.safetensors file"):
        iterative(model, digits, tmp_path / "a", rounds=2)
    assert_unchanged(model, before)
    shutil.copytree(halfway["iterative"], tmp_path / "b")
    model = tiny().double()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"do not fit Sequential .*dtype torch\.float32 vs"):
        iterative(model, digits, tmp_path / "b", rounds=2)
    assert_unchanged(model, before)


def test_the_schemas_name_every_field_of_the_round_records():
    from prunekit.training.checkpoint_fields import SCHEMAS
    from prunekit.training.lottery import RoundResult
    from prunekit.training.post import Round

    for record, schema in [(RoundResult, "lottery"), (Round, "iterative_pruning")]:
        assert {f.name for f in dataclasses.fields(record)} == {"round", *SCHEMAS[schema].entry}
