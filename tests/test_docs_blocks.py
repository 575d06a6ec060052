"""Every Python block of README.md and docs/*.md runs as written, and so do the shell
blocks of README.md marked runnable.

Blocks are run offline (``HF_HUB_OFFLINE``), each in its own empty working directory
with a fresh namespace, all by one child process so that torch is imported once; a block
passes when it raises nothing. A block that cannot run here carries a marker line
``# doc: skip (why)`` (a GPU, torchrun, several machines): it is counted and listed, never
run. A ```bash block whose first line is ``# doc: run`` has each command run in one
working directory in order, with the venv's ``prunekit`` first on the PATH.

Docs that hold numbers from long runs keep them in the example scripts (``--quick``), so
every block here is small enough to run as it stands.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)
SKIP = re.compile(r"^# doc: skip \((.+)\)$", re.M)
RUN = "# doc: run"


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language and its text."""

    path: Path
    line: int
    lang: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def skip(self) -> str | None:
        found = SKIP.search(self.code)
        return found.group(1) if found else None


def blocks(lang: str, paths: list[Path] = DOCS) -> list[Block]:
    """Every ```lang block of ``paths``, with the line of its opening fence."""
    found = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match.group(1) == lang:
                line = text.count("\n", 0, match.start()) + 1
                found.append(Block(path, line, lang, match.group(2)))
    return found


PYTHON = blocks("python")
RUNNABLE = [b for b in PYTHON if b.skip is None]

# Executes each block in a fresh namespace and its own directory; one JSON line per block.
RUNNER = """
import json, os, sys, time, traceback
for item in json.load(sys.stdin):
    os.makedirs(item["dir"]); os.chdir(item["dir"])
    start = time.perf_counter()
    try:
        exec(compile(item["code"], item["id"], "exec"), {"__name__": "__main__"})
        error = None
    except BaseException:
        error = traceback.format_exc()
    print(json.dumps({"id": item["id"], "error": error,
                      "seconds": time.perf_counter() - start}), flush=True)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg",
               OMP_NUM_THREADS="1")  # tiny models: one thread is fastest on a busy machine
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every runnable Python block, run once by one child process."""
    work = tmp_path_factory.mktemp("docs")
    items = [{"id": b.id, "code": b.code, "dir": str(work / f"block{i}")}
             for i, b in enumerate(RUNNABLE)]
    done = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(items), cwd=work,
                          env=_env(), capture_output=True, text=True, timeout=900)
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith('{"id"')]
    assert len(lines) == len(items), f"the runner stopped early:\n{done.stderr[-3000:]}"
    return {r["id"]: r for r in lines}


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_python_block_runs(block: Block, results: dict[str, dict]) -> None:
    assert results[block.id]["error"] is None, results[block.id]["error"]


def test_skipped_blocks_are_counted_listed_and_give_a_reason(capsys: pytest.CaptureFixture
                                                            ) -> None:
    skipped = [b for b in PYTHON if b.skip is not None]
    with capsys.disabled():
        print(f"\n{len(RUNNABLE)} Python doc blocks run, {len(skipped)} skipped:")
        for b in skipped:
            print(f"  {b.id}: {b.skip}")
    assert all(b.skip.strip() for b in skipped)
    # A marker that does not match the pattern would silently run or fail: refuse it.
    for b in PYTHON:
        for line in b.code.splitlines():
            if line.startswith("# doc:"):
                assert SKIP.match(line), f"{b.id}: malformed marker {line!r}"


def test_runnable_shell_blocks_of_the_readme_run(tmp_path: Path) -> None:
    shell = [b for b in blocks("bash", [ROOT / "README.md"]) if b.code.startswith(RUN)]
    assert shell, "README.md has no shell block marked runnable"
    for block in shell:
        commands = [c for c in block.code.replace("\\\n", " ").splitlines()
                    if c.strip() and not c.startswith("#")]
        for command in commands:
            done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=_env(),
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{block.id}: {command}\n{done.stdout}\n{done.stderr}"
