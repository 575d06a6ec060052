"""Corrupted, truncated, bit-flipped, foreign and hostile files through every loader:
``pk.sparse.load``, ``NMTensor.load``, ``pk.load_shrunk`` (either file of the directory),
a training checkpoint resumed by ``pk.training.iterative_pruning`` and a weights file
through ``model_spec.load_checkpoint`` (safetensors and weights-only torch files; the CLI's
``--checkpoint``). State dicts and recipes: ``test_bad_inputs_states.py``.

Hypothesis cuts a valid file at any byte or flips up to four bits anywhere (the header
more often); a fixed pool replaces a file by something else entirely (empty, zeros, a
PNG, JSON, a zip, a safetensors header claiming 2**62 bytes, another loader's file,
``/dev/zero``), and two pickles would create a marker file if anything unpickled them.
Each load is refused cleanly (a PruningError naming the file, the target model
unchanged) or loads exactly what was saved (the formats that carry a digest) or a model
of the same shapes (plain weights files carry no digest); the marker never appears.
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_bad_inputs import (
    DATA,
    FILES,
    IMAGES,
    bounded,
    cnn,
    mlp,
    pruned,
    refuses_cleanly,
    shrunk_dir,
    sparse_file,
)
from torch import nn

import prunekit as pk
from prunekit import model_spec

pytestmark = pytest.mark.usefixtures("one_thread")
MARKER = FILES / "unpickled"  # what the hostile pickles create when unpickled
X = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))


class Plant:
    """Unpickling it creates :data:`MARKER`."""

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(MARKER),))


def _outputs(model: nn.Module) -> torch.Tensor:
    first = next(model.modules())
    x = IMAGES if isinstance(first, nn.Sequential) and isinstance(first[0], nn.Conv2d) else X
    with torch.no_grad():
        return model(x)


@dataclass(frozen=True)
class Loader:
    """``save()`` writes the valid file or directory (cached); ``load(model, path)`` reads
    it into ``make()``; a load that succeeds gives ``expected()`` outputs (None: no
    digest, only the shapes are checked)."""

    save: Callable[[], Path]
    make: Callable[[], nn.Module]
    load: Callable[[nn.Module, Path], object]
    exact: bool = True


def _sparse_load(model: nn.Module, path: Path) -> object:
    return pk.sparse.load(model, path)


def _nm_load(model: nn.Module, path: Path) -> object:
    packed = pk.sparse.NMTensor.load(path)
    with torch.no_grad():
        model[0].weight.copy_(packed.to_dense())
    return packed


def _checkpoint(target: float = 0.5) -> Callable[[nn.Module, Path], object]:
    def resume(model: nn.Module, path: Path) -> object:
        return pk.training.iterative_pruning(
            model, DATA, target=target, rounds=2, epochs=1, batch_size=16, progress=False,
            checkpoint_dir=path,
        )  # fmt: skip

    return resume


@functools.cache
def nm_file() -> Path:
    model = pruned("2:4")
    pk.sparse.NMTensor.compress(pk.bake(model)[0].weight.detach()).save(FILES / "nm.safetensors")
    return FILES / "nm.safetensors"


@functools.cache
def checkpoint_dir() -> Path:
    _checkpoint()(mlp(), FILES / "checkpoint")
    return FILES / "checkpoint"


@functools.cache
def weights_file(suffix: str) -> Path:
    state = {k: v.clone() for k, v in mlp().state_dict().items()}
    path = FILES / f"weights{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    return path


LOADERS: dict[str, Loader] = {
    "sparse.load": Loader(sparse_file, mlp, _sparse_load),
    "NMTensor.load": Loader(nm_file, mlp, _nm_load),
    "load_shrunk": Loader(shrunk_dir, cnn, pk.load_shrunk),
    "checkpoint resume": Loader(checkpoint_dir, mlp, _checkpoint()),
    "load_checkpoint (safetensors)": Loader(
        lambda: weights_file(".safetensors"), mlp, model_spec.load_checkpoint, exact=False
    ),
    "load_checkpoint (torch)": Loader(
        lambda: weights_file(".pt"), mlp, model_spec.load_checkpoint, exact=False
    ),
}


@functools.cache
def expected(name: str) -> torch.Tensor:
    """The outputs a successful load of the untouched file gives."""
    loader = LOADERS[name]
    model = loader.make()
    loader.load(model, loader.save())
    return _outputs(model)


def _targets(root: Path) -> list[Path]:
    """The files of a saved file or directory (sorted)."""
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]


def attempt(name: str, root: Path) -> None:
    """Load ``root`` (a tampered copy) with loader ``name`` and assert the module
    docstring's outcome."""
    loader = LOADERS[name]
    model = loader.make()
    names = (root.name, str(root), *(p.name for p in _targets(root)))
    err = refuses_cleanly(lambda: loader.load(model, root), model, root, names)
    assert not MARKER.exists(), "a pickle was unpickled"
    if err is not None:
        return
    outputs = _outputs(model)
    if loader.exact:
        torch.testing.assert_close(outputs, expected(name), rtol=0, atol=0)
    else:
        assert outputs.shape == expected(name).shape


def tampered(name: str, tmp: Path) -> tuple[Path, list[Path]]:
    """A fresh copy of loader ``name``'s saved file or directory, and its files."""
    source = LOADERS[name].save()
    root = tmp / source.name
    if source.is_dir():
        shutil.copytree(source, root)
    else:
        shutil.copyfile(source, root)
    return root, _targets(root)


@pytest.mark.parametrize("name", LOADERS)
def test_cut_and_flipped_files_are_refused_or_load_exactly(name: str) -> None:
    @bounded(ci=15)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            root, files = tampered(name, Path(tmp))
            target = data.draw(st.sampled_from(files), "file")
            blob = bytearray(target.read_bytes())
            if data.draw(st.booleans(), "cut"):
                blob = blob[: data.draw(st.integers(0, len(blob) - 1), "at")]
            else:
                head = st.integers(0, min(len(blob), 256) - 1)
                spots = st.lists(head | st.integers(0, len(blob) - 1), min_size=1, max_size=4)
                for spot in data.draw(spots, "flipped bytes"):
                    blob[spot] ^= 1 << data.draw(st.integers(0, 7), "bit")
            target.write_bytes(bytes(blob))
            attempt(name, root)

    run()


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data.pkl", b"not a pickle")
    return buffer.getvalue()


def _pickle_zip() -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": Plant()}, buffer)
    return buffer.getvalue()


FOREIGN: dict[str, Callable[[], bytes]] = {
    "empty": lambda: b"",
    "zeros": lambda: bytes(4096),
    "png": lambda: b"\x89PNG\r\n\x1a\n" + bytes(64),
    "json": lambda: json.dumps({"weight": [1, 2, 3]}).encode(),
    "zip": _zip,
    "header of 2**62 bytes": lambda: struct.pack("<Q", 2**62) + b"{" * 64,
    "header not JSON": lambda: struct.pack("<Q", 8) + b"\xff" * 8,
    "pickle": lambda: pickle.dumps({"weight": Plant()}),
    "torch.save pickle": _pickle_zip,
    "another loader's file (sparse)": lambda: sparse_file().read_bytes(),
    "another loader's file (shrunk)": lambda: (shrunk_dir() / "model.safetensors").read_bytes(),
}


@pytest.mark.parametrize("foreign", FOREIGN)
@pytest.mark.parametrize("name", LOADERS)
def test_foreign_and_hostile_files_are_refused(name: str, foreign: str, tmp_path: Path) -> None:
    root, files = tampered(name, tmp_path)
    blob = FOREIGN[foreign]()
    for i, target in enumerate(files):
        if target.read_bytes() == blob:
            continue  # the loader's own file is not foreign to it
        copy = tmp_path / f"copy{i}"
        shutil.copytree(root, copy) if root.is_dir() else shutil.copyfile(root, copy)
        (copy / target.relative_to(root) if root.is_dir() else copy).write_bytes(blob)
        attempt(name, copy)


PATHS = {
    "missing": lambda tmp: tmp / "missing",
    "a file": lambda tmp: tmp / "a file",
    "/dev/zero": lambda tmp: Path("/dev/zero"),
    "a folder": lambda tmp: tmp,
}


def not_the_file(name: str, path: str, tmp: Path) -> None:
    (tmp / "a file").write_text("not a folder")
    attempt(name, PATHS[path](tmp))


@pytest.mark.parametrize(("name", "path"), [(n, p) for n in LOADERS for p in PATHS])
def test_paths_that_are_not_the_file_are_refused(name: str, path: str, tmp_path: Path) -> None:
    not_the_file(name, path, tmp_path)
