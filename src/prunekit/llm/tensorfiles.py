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
        try:
            return dict(json.loads((src / INDEX).read_text())["weight_map"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{str(src / INDEX)!r} is not a safetensors index ({type(exc).__name__}: "
                f"{exc}); Fix: save the model again with save_pretrained."
            ) from None
    if (src / SINGLE).is_file():
        return dict.fromkeys([k for k in _header(src / SINGLE)[0] if k != "__metadata__"], SINGLE)
    raise CheckpointError(
        f"{str(src)!r} holds neither {INDEX} nor {SINGLE}; Fix: pass a folder written by "
        "save_pretrained (safetensors)."
    )


def _header(path: Path) -> tuple[dict[str, dict], int]:
    """The JSON header of a safetensors file and the offset of its data, every tensor's
    byte span checked to lie in the file and (for a known dtype) to hold its shape."""
    try:
        total = path.stat().st_size
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if 8 + size > total:
                raise ValueError(f"a {size}-byte header in a {total}-byte file")
            header = json.loads(f.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                _check_span(name, entry, total - 8 - size)
    except (OSError, struct.error, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{str(path)!r} is not a whole safetensors file ({type(exc).__name__}: {exc}); "
            "nothing was read from it. Fix: copy or save the checkpoint again."
        ) from None
    return header, 8 + size


def _check_span(name: str, entry: dict, data: int) -> None:
    """``entry``'s ``data_offsets`` lie in the ``data`` bytes after the header and, for a
    dtype prunekit reads, span ``numel * itemsize`` bytes; else ValueError."""
    begin, end = (int(v) for v in entry["data_offsets"])
    dtype = _DTYPES.get(entry["dtype"])
    need = None if dtype is None else dtype.itemsize * torch.Size(entry["shape"]).numel()
    if not 0 <= begin <= end <= data or (need is not None and end - begin != need):
        raise ValueError(
            f"tensor {name!r} spans bytes [{begin}, {end}) of {data} "
            f"({entry['dtype']} {entry['shape']} needs {need})"
        )


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
        """Reads every shard's header first (all-or-nothing: a missing, short or
        inconsistent shard is a CheckpointError before anything is pruned or written)."""
        self.src, self.map = src, weight_map(src)
        self._headers = {file: _header(src / file) for file in sorted(set(self.map.values()))}
        missing = [n for n, file in self.map.items() if n not in self._headers[file][0]]
        if missing:
            raise CheckpointError(
                f"the index of {str(src)!r} lists {len(missing)} tensor(s) their shards do not "
                f"hold ({missing[:3]}); Fix: save the checkpoint again with save_pretrained."
            )

    def _entry(self, name: str) -> tuple[Path, dict, int]:
        """The shard holding ``name``, its header entry, and the file offset of its data."""
        file = self.map[name]
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
            got = f.readinto(memoryview(data.numpy()))
        if got != data.numel():  # the file shrank since its header was read
            raise CheckpointError(
                f"{str(path)!r} ended {data.numel() - got} bytes into tensor {name!r}; Fix: "
                "copy or save the checkpoint again (and do not change it while pruning)."
            )
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
                        chunk = g.read(min(CHUNK, size))
                        if not chunk:  # the file shrank since its header was read
                            raise CheckpointError(
                                f"{str(path)!r} ended {size} bytes early; Fix: copy or save "
                                "the checkpoint again (and do not change it while pruning)."
                            )
                        size -= f.write(chunk)
        return offset
