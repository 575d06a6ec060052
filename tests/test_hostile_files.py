"""Hostile files through the sparse loaders (``pk.sparse.load``, ``NMTensor.load``).

Edited index tensors (past the end, negative, a huge row pointer, unsorted), flipped and
cut bytes, wrong dtypes and shapes, foreign files and malformed specs: each is a
CheckpointError and leaves the model exactly as it was, without a copy of it; saves are
atomic. Shrunk layouts, pickles and killed saves: ``test_hostile_shrunk.py``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import assert_unchanged, snapshot
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import prunekit as pk
from prunekit import sparse
from prunekit.errors import CheckpointError, ShrunkLayoutError
from prunekit.sparse.base import tensors_digest
from prunekit.structured.surgery import size_attributes

REFUSED = (CheckpointError, ShrunkLayoutError)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean((2, 3))
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


def converted(seed: int = 0) -> Net:
    """conv and fc1 as N:M, fc2 as BSR (4x4 blocks), fc3 as CSR."""
    torch.manual_seed(seed)
    model = Net()
    pk.prune(model, granularity="2:4", layers=["conv", "fc1"])
    pk.prune(model, 0.75, granularity="block:4x4", layers=["fc2"])
    pk.prune(model, 0.75, layers=["fc3"], include_output=True)
    sparse.convert(model, "nm", layers=["conv", "fc1"])
    sparse.convert(model, "bsr", layers=["fc2"], blocksize=4)
    sparse.convert(model, "csr", layers=["fc3"])
    return model


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    sparse.save(converted(), tmp_path / "m.safetensors")
    return tmp_path / "m.safetensors"


def refuse(load: Callable[[nn.Module], object], model: nn.Module, match: str | None = None) -> None:
    """``load(model)`` raises a CheckpointError (or ShrunkLayoutError) matching ``match``
    and leaves ``model`` as it was, size attributes included."""
    before = snapshot(model), {n: size_attributes(m) for n, m in model.named_modules()}
    with pytest.raises(REFUSED, match=match):
        load(model)
    assert_unchanged(model, before[0])
    assert {n: size_attributes(m) for n, m in model.named_modules()} == before[1]


def edited(
    path: Path, tensors: Callable | None = None, specs: Callable | None = None, digest: bool = True
) -> Path:
    """``path`` edited as an attacker would: tensors or specs changed, then the digest
    recomputed (or left out), so that only the format's own checks can refuse it."""
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()["prunekit.sparse"]
    state = load_file(str(path))
    if tensors:
        tensors(state)
    text = header if specs is None else specs(json.loads(header))
    text = text if isinstance(text, str) else json.dumps(text)
    out = path.with_name("edited.safetensors")
    metadata = {"prunekit.sparse": text, "prunekit.sha256": tensors_digest(state)}
    save_file(state, str(out), metadata=metadata if digest else {"prunekit.sparse": text})
    return out


def _set(key: str, index: int, value: int) -> Callable:
    return lambda s: s[key].__setitem__(index, value)


def _unsorted(s: dict) -> None:
    crow, col = s["fc3.crow_indices"], s["fc3.col_indices"]
    row = next(r for r in range(len(crow) - 1) if crow[r + 1] - crow[r] >= 2)
    start = int(crow[row])
    col[start], col[start + 1] = col[start + 1].clone(), col[start].clone()


def _put(key: str, make: Callable) -> Callable:
    return lambda s: s.__setitem__(key, make(s[key]))


TENSOR_EDITS = {
    "csr column past the end": (_set("fc3.col_indices", 0, 16), "col_indices < ncols"),
    "csr negative column": (_set("fc3.col_indices", 0, -1), "col_indices < ncols"),
    "csr huge row pointer": (_set("fc3.crow_indices", -1, 2**31 - 1), "crow_indices"),
    "csr decreasing row pointer": (_set("fc3.crow_indices", 1, 10**6), "crow_indices"),
    "csr unsorted columns": (_unsorted, "sorted and distinct"),
    "csr values longer than nnz": (_put("fc3.values", lambda v: torch.cat([v, v[:1]])), "nnz"),
    "csr int64 indices": (_put("fc3.col_indices", lambda v: v.long()), "torch.int64"),
    "csr float row pointers": (_put("fc3.crow_indices", lambda v: v.float()), "torch.float32"),
    "csr float64 values": (_put("fc3.values", lambda v: v.double()), "torch.float64"),
    "bias of another length": (_put("fc3.bias", lambda v: v[:3]), "'bias'"),
    "bsr block past the end": (_set("fc2.col_indices", 0, 4), "col_indices < ncols"),
    "bsr blocks of another shape": (_put("fc2.values", lambda v: v.reshape(-1, 2, 8)), "values"),
    "nm positions repeated": (_put("fc1.metadata", lambda v: v.fill_(255)), "positions"),
    "nm metadata cut": (_put("fc1.metadata", lambda v: v[:-1]), "metadata"),
    "nm values of another shape": (_put("fc1.values", lambda v: v[:, :2].contiguous()), "values"),
    "conv gemm positions": (_put("conv.gemm.metadata", lambda v: v.fill_(255)), "positions"),
    "tensor missing": (lambda s: s.pop("fc3.values"), "missing"),
    "tensor added": (lambda s: s.__setitem__("fc3.extra", torch.zeros(1)), "extra"),
}


@pytest.mark.parametrize("case", TENSOR_EDITS)
def test_edited_sparse_tensors_are_refused(saved: Path, case: str) -> None:
    edit, match = TENSOR_EDITS[case]
    refuse(lambda m: sparse.load(m, edited(saved, tensors=edit)), Net(), match)


def _spec(layer: str, **fields: object) -> Callable:
    return lambda s: {**s, layer: {**s[layer], **fields}}


def _without(layer: str, key: str) -> Callable:
    return lambda s: {**s, layer: {k: v for k, v in s[layer].items() if k != key}}


SPEC_EDITS = {
    "not json": (lambda s: "{", "not JSON"),
    "not an object": (lambda s: "[]", "not a JSON object"),
    "spec not an object": (lambda s: {**s, "fc3": 3}, "no known format"),
    "unknown format": (_spec("fc3", format="coo"), "no known format"),
    "unknown key": (_spec("fc3", evil=1), "unknown"),
    "missing key": (_without("fc3", "dtype"), "missing"),
    "negative size": (_spec("fc3", in_features=-16), "-16"),
    "zero size": (_spec("fc3", out_features=0), "'out_features' = 0"),
    "huge size": (_spec("fc3", in_features=2**40), str(2**40)),
    "bool size": (_spec("fc3", in_features=True), "True"),
    "string size": (_spec("fc3", in_features="16"), "'16'"),
    "unknown dtype": (_spec("fc3", dtype="torch.int64"), "torch.int64"),
    "other size than the model": (_spec("fc3", in_features=32), "in_features"),
    "other dtype than the model": (_spec("fc3", dtype="torch.float64"), "dtype"),
    "bias the model lacks": (_spec("fc3", bias=False), "bias"),
    "layer not in the model": (lambda s: {**s, "nope": s["fc3"]}, "no such layer"),
    "the model itself": (lambda s: {**s, "": s["fc3"]}, "no such layer"),
    "nested layers": (lambda s: {**s, "conv.gemm": s["fc3"]}, "inside other layers"),
    "block not tiling": (_spec("fc2", blocksize=[3, 3]), "blocksize"),
    "unknown kernel": (_spec("fc2", kernel="evil"), "kernel"),
    "n not below m": (_spec("fc1", n=4), "4:4"),
    "m not dividing": (_spec("fc1", m=5), "2:5"),
    "conv gemm of another size": (
        lambda s: {**s, "conv": {**s["conv"], "gemm": {**s["conv"]["gemm"], "in_features": 8}}},
        "gemm",
    ),
    "conv negative padding": (
        lambda s: {**s, "conv": {**s["conv"], "conv": {**s["conv"]["conv"], "padding": [-1, 1]}}},
        "padding",
    ),
}


@pytest.mark.parametrize("case", SPEC_EDITS)
def test_malformed_sparse_specs_are_refused(saved: Path, case: str) -> None:
    edit, match = SPEC_EDITS[case]
    refuse(lambda m: sparse.load(m, edited(saved, specs=edit)), Net(), match)


def test_flipped_and_cut_bytes_are_refused(saved: Path, tmp_path: Path) -> None:
    blob, bad = saved.read_bytes(), tmp_path / "bad.safetensors"
    rng = random.Random(0)
    flips = [[-k] for k in range(1, 33)] + [[-k, -k - 7] for k in range(1, 9)]
    flips += [[rng.randrange(len(blob))] for _ in range(40)]
    for positions in flips:
        data = bytearray(blob)
        for p in positions:
            data[p] ^= 1 << rng.randrange(8)
        bad.write_bytes(bytes(data))
        refuse(lambda m, path=bad: sparse.load(m, path), Net())
    for size in (0, 7, 8, 100, len(blob) // 2, len(blob) - 1):
        bad.write_bytes(blob[:size])
        refuse(lambda m, path=bad: sparse.load(m, path), Net(), "cannot read")


def test_foreign_files_are_refused(saved: Path, tmp_path: Path) -> None:
    sparse.NMTensor.compress(torch.zeros(4, 8)).save(tmp_path / "nm.safetensors")
    refuse(lambda m: sparse.load(m, tmp_path / "nm.safetensors"), Net(), "no 'prunekit.sparse'")
    with pytest.raises(CheckpointError, match=r"no 'prunekit\.nm' header"):
        sparse.NMTensor.load(saved)
    refuse(lambda m: sparse.load(m, tmp_path), Net(), "cannot read")
    refuse(lambda m: sparse.load(m, tmp_path / "missing"), Net(), "cannot read")
    with safe_open(str(saved), framework="pt") as f:
        header = f.metadata()
    header["prunekit.sha257"] = header.pop("prunekit.sha256")  # must not pass as digest-less
    save_file(load_file(str(saved)), str(tmp_path / "renamed.safetensors"), header)
    refuse(lambda m: sparse.load(m, tmp_path / "renamed.safetensors"), Net(), "sha257")


def test_edited_nm_tensor_files_are_refused(tmp_path: Path) -> None:
    packed = sparse.NMTensor.compress(torch.tensor([[1.0, 0, 2, 0, 0, 3, 0, 4]]))
    packed.save(tmp_path / "w.safetensors")
    meta = packed.metadata.clone().fill_(255)
    bad = [({"shape": [1, 8], "n": 2, "m": 4}, packed.values, meta, "positions"),
           ({"shape": [1, 16], "n": 2, "m": 4}, packed.values, packed.metadata, "values"),
           ({"shape": [1, 8], "n": 2}, packed.values, packed.metadata, "missing")]  # fmt: skip
    for header, values, metadata, match in bad:
        tensors = {"values": values, "metadata": metadata}
        save_file(tensors, str(tmp_path / "w.safetensors"), {"prunekit.nm": json.dumps(header)})
        with pytest.raises(CheckpointError, match=match):
            sparse.NMTensor.load(tmp_path / "w.safetensors")


def test_load_does_not_deep_copy_the_model(saved: Path) -> None:
    class NoCopy(Net):
        def __deepcopy__(self, memo: dict) -> None:
            raise AssertionError("the user's model was deep-copied")

    torch.manual_seed(1)
    model, x = sparse.load(NoCopy(), saved), torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(model(x), converted()(x), rtol=0, atol=0)
    no_digest = edited(saved, digest=False)  # a file saved before digests still loads
    torch.testing.assert_close(sparse.load(Net(), no_digest)(x), model(x), rtol=0, atol=0)


def test_sparse_save_is_atomic(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", fail)
        with pytest.raises(CheckpointError, match="No space left"):
            sparse.save(converted(seed=1), saved)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(sparse.load(Net(), saved)(x), converted()(x), rtol=0, atol=0)
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]
    with pytest.raises(CheckpointError, match="cannot write"):
        sparse.save(converted(), saved.parent / "missing" / "m.safetensors")
