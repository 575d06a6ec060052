"""Fault suite: SIGKILL every resumable pipeline and every save at random points, and fill
the disk under every save, in subprocesses; assert an exact resume or an intact state.

The kill points are events, not times, so that a seed reproduces them: every file-system
step of a save (``os.fsync``, ``os.replace``, ``os.rename``, ``os.unlink``, ``os.mkdir``,
``os.rmdir``) and every optimizer step counts as one, and a run armed with ``kill_at=n``
SIGKILLs itself when event ``n`` starts. An unkilled run counts its events first; the kill
points are drawn from them with :data:`SEED`.

Saves are also killed in the middle of a write: armed with a byte offset, the process
dies by SIGXFSZ in the write that crosses it (``RLIMIT_FSIZE``).

CI draws :data:`KILLS` events and as many byte offsets per scenario.
``PRUNEKIT_FUZZ=<n>`` draws ``n`` of each (``n`` at or above a scenario's event count: every
event; 50 covers every event of these runs), ``PRUNEKIT_FUZZ_SEED`` changes the draw;
``make fuzz`` runs that.

The runs are forked from one worker process that has imported torch and prunekit and
loaded the data once (a fresh interpreter per run would spend ~10 s importing).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prunekit.training import checkpoint

FUZZ = os.environ.get("PRUNEKIT_FUZZ", "")
KILLS = int(FUZZ) if FUZZ else 5
SEED = int(os.environ.get("PRUNEKIT_FUZZ_SEED", "0"))
IDENTITY = {"model": [2]}

FACTORY = """
import torch
from torch import nn


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
"""

WORKER = r"""
import json, os, signal, sys, traceback
import torch
torch.set_num_threads(1)
import prunekit as pk
from prunekit import export
from prunekit.cli import main
from prunekit.training import checkpoint
from prunekit.zoo import load_dataset
from safetensors.torch import save_file
from torch import nn
import torch._dynamo, torch.utils.benchmark  # imported by the CLI's profile: once, here

DIGITS = load_dataset("digits", flat=True)
EVENTS = {"n": 0, "armed": False, "kill_at": 0}


def event(*_):
    if EVENTS["armed"]:
        EVENTS["n"] += 1
        if EVENTS["n"] == EVENTS["kill_at"]:
            os.kill(os.getpid(), signal.SIGKILL)


def hook(name):
    real = getattr(os, name)
    def hooked(*args, **kwargs):
        event()
        return real(*args, **kwargs)
    setattr(os, name, hooked)


for name in ("fsync", "replace", "rename", "unlink", "mkdir", "rmdir"):
    hook(name)
from torch.optim.optimizer import register_optimizer_step_post_hook
register_optimizer_step_post_hook(event)


def mlp(sparsity=0.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    if sparsity:
        pk.prune(model, sparsity, include_output=True)
    return model


def pipeline(job):
    if job["kind"] == "lottery":
        report = pk.training.lottery(
            mlp(), DIGITS, rounds=2, rate=0.3, rewind=2, epochs=1, lr=1e-2, batch_size=256,
            seed=3, control=False, checkpoint_dir=job["dir"],
        )
        model = report.model
    else:
        model = mlp()
        pk.training.iterative_pruning(
            model, DIGITS, target=0.7, rounds=2, epochs=1, batch_size=256, progress=False,
            checkpoint_dir=job["dir"],
        )
    EVENTS["armed"] = False
    save_file(model.state_dict(), job["out"])


def save(job):
    value = job["value"]
    if job["kind"] == "checkpoint":
        tensors = {"w": torch.full((256,), float(value))}
        arm(job)
        checkpoint.save(job["dir"], value, tensors, {"model": [2]}, {"n": value})
    elif job["kind"] == "export":
        model = mlp(value)
        arm(job)
        export.export(model, job["format"], job["dir"], stem="mlp")
    else:
        arm(job)
        argv = ["prune", "--model", "faultnets:mlp", "--input-shape", "1,64", "--sparsity",
                str(value), "--out", job["dir"]]
        sys.exit(main(argv))


def arm(job):
    # Count events; with fsize, writes past that many bytes fail (EFBIG, as on a full
    # disk) or, with crash, kill the process there (SIGXFSZ).
    if job.get("fsize"):
        import resource
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL if job.get("crash") else signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], resource.RLIM_INFINITY))
    EVENTS.update(armed=True, kill_at=job.get("kill_at", 0))


def child(job):
    os.dup2(os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the CLI's tables
    code = 0
    try:
        if job["kind"] in ("lottery", "iterative"):
            EVENTS["armed"] = True
            EVENTS["kill_at"] = job.get("kill_at", 0)
            pipeline(job)
        else:
            save(job)
    except SystemExit as exit_:
        code = exit_.code
    except BaseException:
        import resource
        unlimited = resource.RLIM_INFINITY
        resource.setrlimit(resource.RLIMIT_FSIZE, (unlimited, unlimited))  # room to report
        traceback.print_exc()
        code = 1
    with open(job["stderr"] + ".events", "w") as f:
        f.write(str(EVENTS["n"]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


print("ready", flush=True)
for line in sys.stdin:
    pids = []
    for job in json.loads(line):
        pid = os.fork()
        if pid == 0:
            child(job)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    print(json.dumps(codes), flush=True)
"""


class Worker:
    """The worker process: runs batches of jobs in forked children; their exit codes."""

    def __init__(self, folder: Path) -> None:
        script = folder / "worker.py"
        script.write_text(WORKER)
        (folder / "faultnets.py").write_text(FACTORY)  # the CLI's --model faultnets:mlp
        self.folder = folder
        self.process = subprocess.Popen(
            [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert self.process.stdout.readline().strip() == "ready"
        self.count = 0

    def run(self, jobs: list[dict]) -> list[dict]:
        """Run ``jobs`` (two at a time); each comes back with its exit ``code``, its
        ``events`` count and its ``output``."""
        for job in jobs:
            self.count += 1
            job["stderr"] = str(self.folder / f"job-{self.count}.log")
        for start in range(0, len(jobs), 2):
            batch = jobs[start : start + 2]
            self.process.stdin.write(json.dumps(batch) + "\n")
            self.process.stdin.flush()
            codes = json.loads(self.process.stdout.readline())
            for job, code in zip(batch, codes, strict=True):
                job["code"] = code
                job["output"] = Path(job["stderr"]).read_text()
                events = Path(job["stderr"] + ".events")
                job["events"] = int(events.read_text()) if events.exists() else None
        return jobs

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    process = Worker(tmp_path_factory.mktemp("worker"))
    yield process
    process.close()


def kill_points(events: int, name: str) -> list[int]:
    """:data:`KILLS` of the events ``1..events``, drawn with :data:`SEED` and ``name``."""
    draw = random.Random(f"{SEED}-{name}")
    return sorted(draw.sample(range(1, events + 1), min(KILLS, events)))


def _ok(job: dict) -> dict:
    assert job["code"] == 0, job["output"]
    return job


# ---------------------------------------------------------------- resumable pipelines


@pytest.mark.parametrize("kind", ["lottery", "iterative"])
def test_a_killed_pipeline_resumes_to_exactly_the_uninterrupted_result(worker, tmp_path, kind):
    whole = _ok(worker.run([{"kind": kind, "dir": str(tmp_path / "whole"),
                             "out": str(tmp_path / "whole.safetensors")}])[0])  # fmt: skip
    expected = load_file(tmp_path / "whole.safetensors")
    assert any(k.endswith(".packed") for k in expected)
    points = kill_points(whole["events"], kind)
    victims = [{"kind": kind, "dir": str(tmp_path / f"k{n}"), "kill_at": n,
                "out": str(tmp_path / f"k{n}.safetensors")} for n in points]  # fmt: skip
    for victim in worker.run(victims):
        assert victim["code"] == -9, victim["output"]
        assert not Path(victim["out"]).exists()
    reruns = worker.run([{"kind": kind, "dir": job["dir"], "out": job["out"]} for job in victims])
    for n, rerun in zip(points, reruns, strict=True):
        _ok(rerun)
        resumed = load_file(rerun["out"])
        assert resumed.keys() == expected.keys(), n
        for key, value in expected.items():
            assert torch.equal(resumed[key], value), (n, key)
        assert sorted(os.listdir(rerun["dir"])) == ["round-0002.safetensors", checkpoint.STATE]


# ---------------------------------------------------------------- saves


def _kill_saves(worker: Worker, tmp_path: Path, old: dict, new: dict) -> tuple[Path, list[dict]]:
    """Write ``old`` into a folder, then for every kill point a copy of it with ``new``
    killed there; the folder of the unkilled ``new`` save, and the killed jobs.

    The kill points: events (SIGKILL as a file-system step starts), and byte offsets (the
    process dies by SIGXFSZ in the write that crosses it: a kill in the middle of a write).
    """
    _ok(worker.run([{**old, "dir": str(tmp_path / "old")}])[0])
    full = _ok(worker.run([{**new, "dir": str(_copy(tmp_path / "old", tmp_path / "new"))}])[0])
    name = f"{new['kind']}-{new.get('format')}"
    size = max(p.stat().st_size for p in (tmp_path / "new").iterdir())
    kills = [{"kill_at": n} for n in kill_points(full["events"], name)]
    kills += [{"fsize": n, "crash": True} for n in kill_points(size - 1, f"{name}-bytes")]
    jobs = [{**new, **kill, "dir": str(_copy(tmp_path / "old", tmp_path / f"k{i}"))}
            for i, kill in enumerate(kills)]  # fmt: skip
    for job in worker.run(jobs):
        expected = -signal.SIGXFSZ if job.get("crash") else -signal.SIGKILL
        assert job["code"] == expected, job["output"]
    return tmp_path / "new", jobs


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _visible(folder: Path) -> dict[str, bytes]:
    """The files of ``folder`` that are not hidden temporary files."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")}


def _hidden(folder: Path, names: set[str]) -> list[str]:
    """Hidden files of ``folder`` that are not the temporary siblings of ``names``."""
    temps = tuple(f".{name}.tmp-" for name in names)
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and not
            p.name.startswith(temps)]  # fmt: skip


def test_a_killed_checkpoint_save_leaves_the_previous_or_the_new_checkpoint(worker, tmp_path):
    old, new = {"kind": "checkpoint", "value": 1}, {"kind": "checkpoint", "value": 2}
    _, jobs = _kill_saves(worker, tmp_path, old, new)
    for job in jobs:
        saved = checkpoint.load(job["dir"], IDENTITY)
        assert saved is not None, job
        assert torch.equal(saved.tensors["w"], torch.full((256,), float(saved.round)))
        assert saved.state == {"n": saved.round, "rng": saved.state["rng"]}
        checkpoint.save(job["dir"], 3, {"w": torch.zeros(1)}, IDENTITY, {})
        assert sorted(os.listdir(job["dir"])) == ["round-0003.safetensors", checkpoint.STATE]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ({"kind": "export", "format": "safetensors", "value": 0.5},
         {"kind": "export", "format": "safetensors", "value": 0.8}),
        ({"kind": "export", "format": "csr", "value": 0.8},
         {"kind": "export", "format": "csr", "value": 0.9}),
        ({"kind": "cli", "value": 0.5}, {"kind": "cli", "value": 0.8}),
    ],
    ids=["export-safetensors", "export-csr", "cli-prune"],
)  # fmt: skip
def test_a_killed_export_or_cli_save_leaves_the_previous_or_the_new_file(
    worker, tmp_path, old, new
):
    new_folder, jobs = _kill_saves(worker, tmp_path, old, new)
    before, after = _visible(tmp_path / "old"), _visible(new_folder)
    assert len(before) == 1 and before.keys() == after.keys() and before != after
    for job in jobs:
        folder = Path(job["dir"])
        assert _visible(folder) in (before, after), job
        assert not _hidden(folder, set(before)), job


# ---------------------------------------------------------------- a full disk


DISK_FULL = [  # (the value saved first, the save that fills the disk: a limit below its size)
    (1, {"kind": "checkpoint", "value": 2, "fsize": 4096}),
    (0.5, {"kind": "export", "format": "safetensors", "value": 0.8, "fsize": 4096}),
    (0.8, {"kind": "export", "format": "csr", "value": 0.9, "fsize": 256}),
    (0.5, {"kind": "cli", "value": 0.8, "fsize": 4096}),
]


@pytest.mark.parametrize(("value", "new"), DISK_FULL, ids=lambda v: str(v))
def test_a_full_disk_is_a_checkpoint_error_and_changes_nothing(worker, tmp_path, value, new):
    """Writes past RLIMIT_FSIZE fail with EFBIG, as on a full disk; the previous state
    stays, no temporary file is left, and the error is one line naming the path."""
    old = {**new, "value": value, "fsize": None}
    _ok(worker.run([{**old, "dir": str(tmp_path / "old")}])[0])
    folder = _copy(tmp_path / "old", tmp_path / "full")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    job = worker.run([{**new, "dir": str(folder)}])[0]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    lines = job["output"].strip().splitlines()
    if new["kind"] == "cli":
        assert job["code"] == 2 and len(lines) == 1 and "Traceback" not in job["output"]
        assert lines[0].startswith("error: ") and str(folder) in lines[0] and "Fix" in lines[0]
    else:
        assert job["code"] == 1 and "CheckpointError" in lines[-1] and str(folder) in lines[-1]
        assert "Fix" in lines[-1]
