"""The package as users get it: ``python -m build`` makes a wheel and an sdist, and the
wheel installed into a fresh virtual environment imports, prunes, ships ``py.typed`` and
runs the ``prunekit`` command.

The fresh environment has no prunekit and no source tree on its path. It sees torch and
the other dependencies through a ``.pth`` line naming this venv's site-packages (a path
line only: the editable install's own ``.pth`` there is not processed), so the test needs
no network. One build per session (about 15 s in all on 2 cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SMOKE = """
import importlib.resources, sys, torch
from torch import nn
import prunekit as pk

assert pk.__file__.startswith(sys.prefix), pk.__file__   # the wheel, not the source tree
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
pk.prune(model, 0.5, layers=["0"])
assert pk.sparsity(model)["0"] == 0.5, pk.sparsity(model)
assert importlib.resources.files("prunekit").joinpath("py.typed").is_file()
print("smoke ok", pk.__version__)
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """wheel and sdist built once: the sdist first, the wheel from the unpacked sdist."""
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the venv's setuptools, so the build needs no network.
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out)], ROOT)
    return out


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only the wheel (dependencies seen through a .pth line)."""
    env_dir = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], env_dir)
    python = env_dir / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                   env_dir).strip()
    (Path(purelib) / "outer_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    (wheel,) = dist.glob("*.whl")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
          "--no-index", str(wheel)], env_dir)
    return env_dir


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def test_build_makes_a_wheel_and_an_sdist_with_license_and_py_typed(dist: Path) -> None:
    (wheel,) = dist.glob("prunekit-*.whl")
    (sdist,) = dist.glob("prunekit-*.tar.gz")
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        metadata = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
        entry_points = whl.read(next(n for n in names if n.endswith("entry_points.txt")))
    assert "prunekit/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "src/")) for n in names)
    assert b"License-Expression: Apache-2.0" in metadata
    assert b"prunekit = prunekit.cli:main" in entry_points
    with tarfile.open(sdist) as tar:
        members = tar.getnames()
    root = members[0].split("/")[0]
    for path in ("LICENSE", "README.md", "pyproject.toml", "src/prunekit/py.typed",
                 "src/prunekit/__init__.py"):
        assert f"{root}/{path}" in members, path


def test_wheel_in_a_fresh_venv_imports_prunes_and_ships_py_typed(venv: Path, tmp_path: Path
                                                                 ) -> None:
    out = _run([str(venv / "bin" / "python"), "-c", SMOKE], tmp_path, _clean_env())
    assert out.startswith("smoke ok 0.1.0"), out


def test_installed_command_line_answers_help(venv: Path, tmp_path: Path) -> None:
    out = _run([str(venv / "bin" / "prunekit"), "--help"], tmp_path, _clean_env())
    assert "usage: prunekit" in out and "prune" in out
