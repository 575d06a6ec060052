"""Out-of-core pruning: a safetensors checkpoint pruned one decoder block at a time.

:func:`prune_checkpoint` never holds the model: it builds the skeleton on the meta device
(``AutoModelForCausalLM.from_config`` under ``torch.device("meta")``), loads the tensors
outside the blocks that the calibration needs to reach the first block (the final norm,
position embeddings...; of the input embedding only the rows of the calibration's tokens,
:func:`_embedding_rows`; never the head), then frees them; for each block, in order, it
reads only that block's tensors from
the shards (plain reads; the ``model.safetensors.index.json`` names the shard of each),
runs :func:`prunekit.llm.oneshot.run_prune`'s per-block step on it (statistics, pruning,
masks baked, outputs for the next block -- the very code of :func:`prunekit.llm.prune`),
writes it to its own output shard and puts it back on the meta device. The tensors outside
the blocks are copied from the source shards byte for byte, a chunk at a time
(:mod:`prunekit.llm.tensorfiles`).

Resident at any time: one block's weights, its statistics (each layer's freed once it is
pruned), and the calibration hidden states in and out (``samples x seq_len x hidden``
each), on top of the interpreter and torch; with ``measure_error`` and SparseGPT, also
the dense weights of the block until it is measured. The result equals the in-memory
prune of the loaded model on the same calibration (``tests/test_llm_offload.py``).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from prunekit.errors import (
    IncompatibleLayerError,
    PruningError,
    UnsupportedModelError,
    UsageError,
)
from prunekit.fsio import atomic_directory
from prunekit.granularity import NM
from prunekit.llm.arguments import PruneArguments
from prunekit.llm.blocks import block_layers, find_blocks
from prunekit.llm.calibration import Batch, TokenData, calibration_batches
from prunekit.llm.engine import BlockInputs
from prunekit.llm.methods import Method, Target, parse_method
from prunekit.llm.oneshot import check_target, run_prune
from prunekit.llm.report import LLMPruneReport
from prunekit.llm.tensorfiles import INDEX, Shards

__all__ = ["INDEX", "available_memory", "checkpoint_bytes", "parse_size", "prune_checkpoint"]
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
_CGROUP = Path("/sys/fs/cgroup/memory.max")
_MEMINFO = Path("/proc/meminfo")


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as ``"300MB"``, ``"8GB"``, ``"2GiB"``, ``"1e9"``.

    Raises:
        UsageError: not a positive size.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = (
        re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", value) if isinstance(value, str) else None
    )
    unit = match[2].upper() if match else ""
    try:
        number = float(match[1]) if match and unit in _UNITS else -1.0
    except ValueError:
        number = -1.0
    if not number * _UNITS.get(unit, 1) >= 1:
        raise UsageError(
            f"max_memory={value!r} is not a memory size; Fix: pass bytes (an int > 0) or a "
            "string such as '300MB', '8GB' or '2GiB'."
        )
    return int(number * _UNITS[unit])


def checkpoint_bytes(src: str | Path) -> int:
    """Bytes of the safetensors files of a checkpoint folder."""
    return sum(f.stat().st_size for f in Path(src).glob("*.safetensors"))


def available_memory() -> int | None:
    """Bytes this process may still use: the cgroup limit (``memory.max``, minus
    ``memory.current``) when there is one, else ``MemAvailable``; None when unknown."""
    try:
        limit = _CGROUP.read_text().strip()
        if limit != "max":
            used = _CGROUP.with_name("memory.current").read_text()
            return int(limit) - int(used)
    except (OSError, ValueError):
        pass
    try:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", _MEMINFO.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match[1]) * 1024 if match else None


def _skeleton(src: Path) -> nn.Module:
    """The model of ``src``'s config with every parameter and buffer on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _materialise(model: nn.Module, module: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Load ``tensors`` (names relative to ``module``) into it; buffers missing from the
    checkpoint (rotary frequencies) are recomputed by the model's own initialiser."""
    module.load_state_dict(tensors, strict=False, assign=True)
    for name, sub in module.named_modules():
        meta = [b for b, t in sub.named_buffers(recurse=False) if t.is_meta]
        if meta and "Rotary" not in type(sub).__name__:
            raise UnsupportedModelError(
                f"buffer {name}.{meta[0]} of {type(sub).__name__} is not in the checkpoint and "
                "prunekit cannot rebuild it off the meta device; Fix: prune this model in "
                "memory (pk.llm.prune)."
            )
        if meta:
            sub.to_empty(device="cpu", recurse=False)
            model._init_weights(sub)


def _spill(inputs: BlockInputs, index: int, folder: Path, budget: int) -> None:
    """Over ``budget`` bytes, the hidden states go to files in ``folder`` and come back
    memory-mapped (pages the kernel can drop and re-read); the previous block's go."""
    if sum(h.numel() * h.element_size() for h in inputs.hidden) <= budget:
        return
    for i, hidden in enumerate(inputs.hidden):
        path = folder / f"{index}-{i}.pt"
        torch.save(hidden.detach().cpu(), path)
        inputs.hidden[i] = torch.load(path, mmap=True).to(hidden.device)
        (folder / f"{index - 1}-{i}.pt").unlink(missing_ok=True)


def _free(module: nn.Module) -> None:
    """Every tensor of ``module`` back on the meta device (its memory released)."""
    module.to(device="meta")


class _Writer:
    """The :class:`~prunekit.llm.engine.BlockStream` of :func:`prune_checkpoint`."""

    def __init__(
        self, model: nn.Module, shards: Shards, out: Path, prefix: str, count: int
    ) -> None:
        self.model, self.shards, self.out, self.prefix = model, shards, out, prefix
        self.files = count + 1
        self.spill: tuple[Path, int] | None = None
        """(folder, bytes): hidden states above that many bytes go to files there."""
        self.weight_map: dict[str, str] = {}
        self.bytes = 0

    def file(self, index: int) -> str:
        return f"model-{index + 1:05d}-of-{self.files:05d}.safetensors"

    def names(self, index: int) -> list[str]:
        head = f"{self.prefix}.{index}."
        return [n for n in self.shards.map if n.startswith(head)]

    def load(self, index: int, block: nn.Module) -> None:
        if index == 0:
            _free(self.model)  # the embeddings and head were needed for the capture only
        head = f"{self.prefix}.{index}."
        tensors = self.shards.read(self.names(index))
        _materialise(self.model, block, {k[len(head) :]: v for k, v in tensors.items()})
        missing = [n for n, p in block.named_parameters() if p.is_meta]
        if missing:
            raise UnsupportedModelError(
                f"block {head[:-1]!r}: parameter {missing[0]!r} is not in the checkpoint under "
                f"{head}{missing[0]}; Fix: prune this model in memory (pk.llm.prune)."
            )

    def done(
        self, index: int, block: nn.Module, errors: dict[str, float], inputs: BlockInputs
    ) -> None:
        head = f"{self.prefix}.{index}."
        keep = set(self.names(index))
        state = {head + k: v.detach().contiguous() for k, v in block.state_dict().items()}
        self.write(index, {k: v for k, v in state.items() if k in keep})
        _free(block)
        if self.spill is not None:
            _spill(inputs, index, *self.spill)

    def write(self, index: int, tensors: dict[str, Tensor]) -> None:
        save_file(tensors, self.out / self.file(index), metadata={"format": "pt"})
        self.weight_map |= dict.fromkeys(tensors, self.file(index))
        self.bytes += sum(t.numel() * t.element_size() for t in tensors.values())

    def finish(self) -> None:
        """The tensors outside the blocks, copied byte for byte a chunk at a time; the index."""
        head = f"{self.prefix}."
        rest = [n for n in self.shards.map if not n.startswith(head)]
        self.bytes += self.shards.copy(rest, self.out / self.file(self.files - 1))
        self.weight_map |= dict.fromkeys(rest, self.file(self.files - 1))
        index = {
            "metadata": {"total_size": self.bytes},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def prune_checkpoint(
    src_dir: str | Path,
    out_dir: str | Path,
    calibration: TokenData,
    *,
    method: Method = "wanda",
    sparsity: float | str = 0.5,
    max_memory: int | str | None = None,
    blocks: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
    measure_error: bool = True,
) -> LLMPruneReport:
    """Prune the causal LM saved in ``src_dir`` into ``out_dir`` without loading it whole.

    Same method, sparsity and result as :func:`prunekit.llm.prune` on the loaded model (the
    module docstring says how); ``out_dir`` gets a sharded safetensors checkpoint (one shard
    per block, one for the rest), its index, the config and the tokenizer files of
    ``src_dir``, written atomically, that ``from_pretrained`` loads.

    Args:
        src_dir: a ``save_pretrained`` folder (safetensors, sharded or not).
        calibration: as for :func:`prunekit.llm.prune`.
        max_memory: bytes, or a size such as ``"300MB"`` / ``"8GB"``: refused up front when
            the largest block alone does not fit in it; the calibration hidden states
            spill to memory-mapped files (a temporary folder beside ``out_dir``) when
            they exceed it minus 3 times the largest block (its weights, its statistics
            and, with ``measure_error`` and SparseGPT / ALPS or fused experts, the dense
            weights kept until its error is measured).
        blocks, batch_size, progress, measure_error: as for :func:`prunekit.llm.prune`.

    Raises:
        UsageError: a bad ``max_memory`` or argument, ``out_dir`` = ``src_dir``.
        CheckpointError: no safetensors in ``src_dir``.
        PruningError: the largest block exceeds ``max_memory``; the method, sparsity or
            calibration errors of :func:`prunekit.llm.prune`.
    """
    args = PruneArguments(blocks=blocks, batch_size=batch_size, progress=progress)
    budget = None if max_memory is None else parse_size(max_memory)
    method = parse_method(method)
    target = check_target(sparsity, "uniform")
    src = Path(src_dir)
    if src.resolve() == Path(out_dir).resolve():
        raise UsageError(
            f"out_dir {str(out_dir)!r} is src_dir, whose shards are read while the pruned "
            "ones are written; Fix: pass another folder."
        )
    shards = Shards(src)
    model = _skeleton(src)
    prefix, block_list = find_blocks(model, args.blocks)
    _check_fit(model, shards, target, budget, args.blocks)
    embedding, skip = _embedding_names(model)
    outside = [n for n in shards.map if not n.startswith(f"{prefix}.") and n not in skip]
    _materialise(model, model, shards.read(outside))
    batches = _embedding_rows(model, shards, embedding, calibration, args.batch_size)
    with atomic_directory(out_dir) as out, tempfile.TemporaryDirectory(dir=out.parent) as spill:
        writer = _Writer(model, shards, out, prefix, len(block_list))
        if budget is not None:
            writer.spill = (Path(spill), max(budget - 3 * _largest(block_list), 0))
        report = run_prune(
            model, batches, method, target, "uniform", args, stream=writer, measure=measure_error
        )
        writer.finish()
        for file in src.iterdir():  # config, tokenizer files...
            if file.is_file() and file.suffix != ".safetensors" and file.name != INDEX:
                shutil.copy2(file, out / file.name)
    return report


def _embedding_names(model: nn.Module) -> tuple[str, set[str]]:
    """The input embedding's weight name, and the names of it and of the head's tensors
    (the capture needs only some embedding rows, pruning never needs the head)."""
    names = {id(m): n for n, m in model.named_modules()}
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    weight = f"{names[id(embedding)]}.weight".lstrip(".")
    heads = [] if head is None else [f"{names[id(head)]}.{n}" for n, _ in head.named_parameters()]
    return weight, {weight, *heads}


def _embedding_rows(
    model: nn.Module, shards: Shards, name: str, calibration: TokenData, batch_size: int
) -> list[Batch]:
    """The calibration batches, with the input embedding holding only the rows of the
    tokens they use (read from the shards) and ``input_ids`` renumbered into those rows:
    the same hidden states for the capture without the whole vocabulary in memory."""
    embedding = model.get_input_embeddings()
    width = embedding.weight.shape[1]
    embedding.weight = nn.Parameter(torch.empty(0, width), requires_grad=False)  # the device
    batches = calibration_batches(calibration, model, batch_size)
    used = torch.unique(torch.cat([b["input_ids"].reshape(-1) for b in batches]))
    embedding.weight = nn.Parameter(shards.rows(name, used), requires_grad=False)
    if getattr(embedding, "padding_idx", None) is not None:
        embedding.padding_idx = None  # a training-time notion; its row may not be among these
    return [{**b, "input_ids": torch.searchsorted(used, b["input_ids"])} for b in batches]


def _largest(block_list: nn.ModuleList) -> int:
    """Bytes of the largest block's parameters."""
    return max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in block_list)


def _check_fit(
    model: nn.Module, shards: Shards, target: Target, budget: int | None, blocks: str | None
) -> None:
    """Before anything is written: the checkpoint holds every block tensor under the
    model's own names, N:M divides every layer, one block fits in ``budget``."""
    prefix, block_list = find_blocks(model, blocks)
    absent = [n for n in model.state_dict() if n.startswith(f"{prefix}.") and n not in shards.map]
    if absent:
        raise UnsupportedModelError(
            f"the checkpoint has no tensor {absent[0]!r} (stored under another layout, e.g. "
            "per-expert MoE weights); Fix: prune this model in memory (pk.llm.prune)."
        )
    for index, block in enumerate(block_list):
        for layer in block_layers(block, f"{prefix}.{index}"):
            if isinstance(target, NM) and (reason := target.incompatibility(layer)):
                raise IncompatibleLayerError(f"layer {layer.name!r}: {reason}")
    if budget is None:
        return
    largest = _largest(block_list)
    if largest > budget:
        raise PruningError(
            f"max_memory={budget:,} bytes is below one block of {prefix} ({largest:,} bytes); "
            "Fix: raise max_memory above one block plus its statistics and activations."
        )
