"""``prunekit export``: every format written, reloaded and compared with the model."""

from __future__ import annotations

import errno
import os
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model

import prunekit as pk
from prunekit import fsio, model_spec
from prunekit.cli import main

FACTORY = """
import torch
from torch import nn

def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
"""
X = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"export_factory_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}:mlp"


def _checkpoint(spec: str, tmp_path: Path, granularity: str) -> tuple[torch.nn.Module, Path]:
    """The factory's model pruned by ``granularity`` (baked), and its safetensors file."""
    model = model_spec.load_model(spec).model
    sparsity = None if granularity == "2:4" else 0.75  # every layer: a sparse format takes all
    pk.prune(model, sparsity, granularity=granularity, include_output=True)
    pk.bake(model)
    path = tmp_path / f"{granularity.replace(':', '-')}.safetensors"
    save_model(model, str(path))
    return model, path


def _export(spec: str, checkpoint: Path, fmt: str, out: Path) -> int:
    return main(["export", "--model", spec, "--checkpoint", str(checkpoint), "--format", fmt,
                 "--input-shape", "4,32", "--out", str(out)])  # fmt: skip


@pytest.mark.parametrize(
    ("fmt", "granularity", "file"),
    [
        ("safetensors", "element", "mlp.safetensors"),
        ("csr", "element", "mlp.csr.safetensors"),
        ("bsr", "block:4x4", "mlp.bsr.safetensors"),
        ("nm", "2:4", "mlp.nm.safetensors"),
        ("auto", "element", "mlp.auto.safetensors"),
    ],
)
def test_export_round_trip(
    spec: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str, granularity: str,
    file: str,
) -> None:  # fmt: skip
    model, checkpoint = _checkpoint(spec, tmp_path, granularity)
    out = tmp_path / "out"
    assert _export(spec, checkpoint, fmt, out) == 0
    printed = capsys.readouterr().out
    path = out / file
    assert path.name in printed and f"{path.stat().st_size:,}" in printed
    fresh = model_spec.load_model(spec).model
    if fmt == "safetensors":
        model_spec.load_checkpoint(fresh, path)
    else:
        pk.sparse.load(fresh, path)
    if fmt != "auto":  # auto picks per layer by timing; the others convert every layer
        assert f"{'dense' if fmt == 'safetensors' else fmt}: 0, 2" in printed
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), model(X), rtol=1e-5, atol=1e-5)


def test_export_onnx_round_trip(spec: str, tmp_path: Path) -> None:
    import onnxruntime

    model, checkpoint = _checkpoint(spec, tmp_path, "element")
    assert _export(spec, checkpoint, "onnx", tmp_path / "out") == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "mlp.onnx"))
    (got,) = session.run(None, {session.get_inputs()[0].name: X.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(X), rtol=1e-5, atol=1e-5)


def test_export_onnx_without_the_extra(
    spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "onnx" else real(n, *a)
    )
    assert main(["export", "--model", spec, "--format", "onnx", "--out", str(tmp_path / "o")]) == 2
    assert "pip install prunekit[onnx]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_export_of_a_too_dense_model_writes_nothing(
    spec: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    assert main(["export", "--model", spec, "--format", "csr", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "as csr it would take" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_export_from_a_save_shrunk_directory(tmp_path: Path) -> None:
    import onnxruntime

    from prunekit import zoo

    model = zoo.build_model("vgg").eval()
    x = zoo.example_input("vgg")
    pk.shrink(model, x, 0.5)
    pk.save_shrunk(model, tmp_path / "shrunk")
    argv = ["export", "--model", "vgg", "--checkpoint", str(tmp_path / "shrunk"), "--format",
            "onnx", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "vgg.onnx"))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-5)


def _read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every temporary file prunekit.fsio creates fails as on a read-only file system."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(fsio.tempfile, "mkstemp", refuse)


@pytest.mark.parametrize("fmt", ["safetensors", "csr"])
@pytest.mark.parametrize("target", ["out is a file", "file is a folder", "read-only"])
def test_export_to_a_target_it_cannot_write_is_one_line_and_writes_nothing(
    spec: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, fmt: str, target: str,
) -> None:  # fmt: skip
    _, checkpoint = _checkpoint(spec, tmp_path, "element")
    out = tmp_path / "out"
    out.mkdir()
    if target == "out is a file":
        out = tmp_path / "file"
        out.write_text("mine")
    elif target == "file is a folder":
        (out / ("mlp.safetensors" if fmt == "safetensors" else f"mlp.{fmt}.safetensors")).mkdir()
    else:
        _read_only(monkeypatch)
    before = sorted(tmp_path.rglob("*"))
    assert _export(spec, checkpoint, fmt, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and str(out) in err
    assert "Fix:" in err and "Traceback" not in err
    assert sorted(tmp_path.rglob("*")) == before
    assert target != "out is a file" or out.read_text() == "mine"


def test_prune_save_to_a_target_it_cannot_write_is_one_line_and_keeps_the_old_file(
    spec: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    argv = ["prune", "--model", spec, "--input-shape", "4,32", "--sparsity", "0.5", "--out"]
    (tmp_path / "file").write_text("mine")
    assert main([*argv, str(tmp_path / "file")]) == 2
    assert (tmp_path / "file").read_text() == "mine"
    assert main([*argv, str(tmp_path / "out")]) == 0
    saved = (tmp_path / "out" / "model.safetensors").read_bytes()
    _read_only(monkeypatch)
    capsys.readouterr()
    assert main([*argv[:-2], "0.8", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Read-only file system" in err and "Fix:" in err
    assert os.listdir(tmp_path / "out") == ["model.safetensors"]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == saved


def test_prune_transformers_save_swaps_the_folder_whole_and_keeps_its_other_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from prunekit.zoo.hf import tiny_transformer

    tiny_transformer("bert")[0].save_pretrained(tmp_path / "bert")
    argv = ["prune", "--model", str(tmp_path / "bert"), "--sparsity", "0.5", "--out"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert main([*argv, str(tmp_path / "notes")]) == 2
    assert "holds files but no config.json" in capsys.readouterr().err
    assert os.listdir(tmp_path / "notes") == ["todo.txt"]
    out = tmp_path / "pruned"
    assert main([*argv, str(out)]) == 0
    (out / "onnx").mkdir()
    assert main([*argv, str(out)]) == 2
    assert "holds folders ['onnx']" in capsys.readouterr().err
    (out / "onnx").rmdir()
    (out / "tokenizer.json").write_text("{}")  # saved again: this stays, a stale shard goes
    (out / "model-00002-of-00002.safetensors").write_bytes(b"stale")
    assert main([*argv, str(out)]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    pruned = model_spec.load_model(str(out)).model
    layer = pruned.encoder.layer[0].attention.self.query.weight
    assert (layer == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
