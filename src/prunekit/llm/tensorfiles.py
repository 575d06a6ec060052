"""Reading and copying safetensors shards a piece at a time (for out-of-core pruning).

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
offsets relative to the end of the header) and the tensors' raw bytes. :class:`Shards`
reads named tensors, or only some rows of one (the calibration tokens' embedding rows),
and :func:`copy_tensors` copies tensors into a new file in fixed-size chunks, so a tensor
never has to be in memory whole (the 100+ MB embedding and head of an LLM).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from torch import Tensor

from prunekit.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CHUNK = 2**21
"""Bytes read or copied at a time."""


def weight_map(src: Path) -> dict[str, str]:
    """Tensor name -> shard file of the checkpoint in ``src``."""
    if (src / INDEX).is_file():
        return dict(json.loads((src / INDEX).read_text())["weight_map"])
    if (src / SINGLE).is_file():
        return dict.fromkeys([k for k in _header(src / SINGLE)[0] if k != "__metadata__"], SINGLE)
    raise CheckpointError(
        f"{str(src)!r} holds neither {INDEX} nor {SINGLE}; Fix: pass a folder written by "
        "save_pretrained (safetensors)."
    )


def _header(path: Path) -> tuple[dict[str, dict], int]:
    """The JSON header of a safetensors file and the offset of its data."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), 8 + size


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


class Shards:
    """Reads named tensors, or some rows of one, from the checkpoint's shards with plain
    file reads: no shard is memory-mapped (a mapping counts whole against an address-space
    limit, whatever its size), only the bytes asked for are read."""

    def __init__(self, src: Path) -> None:
        self.src, self.map = src, weight_map(src)
        self._headers: dict[str, tuple[dict[str, dict], int]] = {}

    def _entry(self, name: str) -> tuple[Path, dict, int]:
        """The shard holding ``name``, its header entry, and the file offset of its data."""
        file = self.map[name]
        if file not in self._headers:
            self._headers[file] = _header(self.src / file)
        header, start = self._headers[file]
        return self.src / file, header[name], start + header[name]["data_offsets"][0]

    def _load(self, name: str, first: int = 0, count: int | None = None) -> Tensor:
        """Tensor ``name`` (``count`` leading rows from row ``first``, or all of it)."""
        path, entry, start = self._entry(name)
        dtype, shape = _DTYPES.get(entry["dtype"]), list(entry["shape"]) or [1]  # 0-d: 1 row
        if dtype is None:
            raise CheckpointError(
                f"tensor {name!r} of {str(path)!r} has dtype {entry['dtype']}, which prunekit "
                "cannot read out of core; Fix: prune this model in memory (pk.llm.prune)."
            )
        row = dtype.itemsize * int(torch.Size(shape[1:]).numel())
        count = shape[0] - first if count is None else min(count, shape[0] - first)
        data = torch.empty(row * count, dtype=torch.uint8)  # torch's allocator: aligned
        with path.open("rb") as f:
            f.seek(start + row * first)
            f.readinto(memoryview(data.numpy()))
        return data.view(dtype).reshape(count, *shape[1:])

    def read(self, names: list[str]) -> dict[str, Tensor]:
        out = {}
        for name in names:
            out[name] = self._load(name).reshape(self._entry(name)[1]["shape"])
        return out

    def rows(self, name: str, index: Tensor) -> Tensor:
        """Rows ``index`` (sorted, unique) of tensor ``name``, read ``CHUNK`` bytes of rows
        at a time."""
        _, entry, _ = self._entry(name)
        rows, width = entry["shape"][0], max(1, int(torch.Size(entry["shape"][1:]).numel()))
        step = max(1, CHUNK // (width * 4))
        out = []
        for first in range(0, rows, step):
            wanted = index[(index >= first) & (index < first + step)]
            if len(wanted):
                out.append(self._load(name, first, step)[wanted - first])
        return torch.cat(out)

    def copy(self, names: list[str], out: Path) -> int:
        """Write tensors ``names`` into a new safetensors file ``out`` byte for byte, a
        chunk at a time; returns the bytes of tensor data written."""
        entries, sources = {}, []
        offset = 0
        for name in names:
            path, entry, begin = self._entry(name)
            size = entry["data_offsets"][1] - entry["data_offsets"][0]
            entries[name] = {**entry, "data_offsets": [offset, offset + size]}
            sources.append((path, begin, size))
            offset += size
        text = json.dumps({"__metadata__": {"format": "pt"}, **entries}).encode()
        text += b" " * (-len(text) % 8)
        with out.open("wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for path, begin, size in sources:
                with path.open("rb") as g:
                    g.seek(begin)
                    while size:
                        size -= f.write(g.read(min(CHUNK, size)))
        return offset
