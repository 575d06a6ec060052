"""Resumable IMP: kill a real run, restart it, compare bit for bit; refuse bad checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
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


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", flat=True)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_checkpoint_of_another_model_or_run_is_refused(tmp_path, digits):
    pk.training.lottery(tiny(), digits, rounds=1, checkpoint_dir=tmp_path, **FAST)
    files = _files(tmp_path)
    assert [n for n in files if n.endswith(".safetensors")] == ["round-0001.safetensors"]
    model = tiny(hidden=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"another model or run.*model"):
        pk.training.lottery(model, digits, rounds=1, checkpoint_dir=tmp_path, **FAST)
    with pytest.raises(CheckpointError, match=r"another model or run.*config"):
        pk.training.lottery(tiny(), digits, rounds=2, checkpoint_dir=tmp_path, **FAST)
    assert _files(tmp_path) == files
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("damage", ["json", "tensors", "missing"])
def test_corrupted_checkpoint_is_refused(tmp_path, digits, damage):
    pk.training.lottery(tiny(), digits, rounds=0, checkpoint_dir=tmp_path, **FAST)
    tensors = tmp_path / "round-0000.safetensors"
    if damage == "json":
        (tmp_path / checkpoint.STATE).write_text('{"format": 1, "round": ')
    elif damage == "tensors":
        tensors.write_bytes(tensors.read_bytes()[:-7] + b"garbage")
    else:
        tensors.unlink()
    files = _files(tmp_path)
    with pytest.raises(CheckpointError, match="corrupted"):
        pk.training.lottery(tiny(), digits, rounds=0, checkpoint_dir=tmp_path, **FAST)
    assert _files(tmp_path) == files


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
