"""Atomic, resumable checkpoints for iterative pipelines: safetensors + JSON, never pickle.

A checkpoint directory holds::

    state.json               the commit point: round, identity, history, RNG states,
                             the name and SHA-256 of the tensor file
    round-0003.safetensors   the tensors of that round (a masked state dict keeps its
                             masks as packed uint8 buffers), plus torch's RNG state

Every file is written to a temporary file in the same directory, fsync'ed and moved into
place with :func:`os.replace` (atomic). The tensors go first, under a new name; then
``state.json``, which names them. A process killed at any moment therefore leaves either
the previous checkpoint or the new one, never a mix; older tensor files are deleted only
after the new ``state.json`` is in place.

:func:`load` refuses, with a :class:`~prunekit.errors.CheckpointError` and without
touching anything, a checkpoint whose JSON or tensors are corrupted (unparsable, missing
keys, SHA-256 mismatch) or whose ``identity`` (model parameter names and shapes, run
arguments) differs from the caller's.

Under ``torch.distributed`` (``sync=True``) rank 0 alone writes, and rank 0 alone reads,
broadcasting the bytes, so every rank resumes from the same checkpoint and raises the same
error. :func:`save_round` / :func:`resume` are what the pipelines call: a model's masked
state dict plus extra tensors, and the model and RNG states put back.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor, nn

from prunekit.errors import CheckpointError
from prunekit.masks import load_state_dict as load_masked
from prunekit.training import distributed
from prunekit.training.data import TrainData, describe

STATE = "state.json"
FORMAT = 2  # 2: save_round keys "model." and "extra."
_RNG_KEY = "rng.torch"
_MODEL, _EXTRA = "model.", "extra."


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _rng_json() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next],
    }


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint: the last completed ``round``, its tensors and JSON state."""

    round: int
    tensors: dict[str, Tensor]
    state: dict[str, Any]

    def restore_rng(self) -> None:
        """Put torch's (CPU), numpy's and Python's global RNGs back to their saved states."""
        torch.set_rng_state(self.tensors[_RNG_KEY])
        kind, keys, pos, has_gauss, gauss = self.state["rng"]["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = self.state["rng"]["python"]
        random.setstate((version, tuple(internal), gauss_next))


def save(
    directory: str | Path,
    round: int,
    tensors: dict[str, Tensor],
    identity: dict[str, Any],
    state: dict[str, Any],
    *,
    sync: bool = False,
) -> Path:
    """Write round ``round``'s ``tensors`` and JSON-able ``state`` atomically; the state path.

    ``identity`` (model and run arguments) is stored and compared by :func:`load`. The
    RNG states of torch (CPU), numpy and Python are saved alongside. With ``sync`` (under
    ``torch.distributed``) only rank 0 writes, and every rank returns once it has, or
    raises the same error if it could not.

    Raises:
        CheckpointError: the files could not be written (disk full, no permission); the
            previous checkpoint is still the one in ``directory``.
    """
    directory = Path(directory)
    writer = distributed.is_writer(sync)
    error = ""
    if writer:
        try:
            _write(directory, round, tensors, identity, state)
        except OSError as err:
            error = (
                f"could not write the round-{round} checkpoint in {directory}: {err}; Fix: free "
                "disk space or pass a writable checkpoint_dir, then run the same command again."
            )
    if sync:  # rank 0's outcome, so that no rank waits for a checkpoint that never comes
        outcome = [b"error" if error else b"ok", error.encode()] if writer else None
        status, message = distributed.broadcast_bytes(outcome, 2)
        error = message.decode() if status == b"error" else ""
    if error:
        raise CheckpointError(error)
    return directory / STATE


def _write(
    directory: Path,
    round: int,
    tensors: dict[str, Tensor],
    identity: dict[str, Any],
    state: dict[str, Any],
) -> None:
    """The files of :func:`save`: the tensors, then the JSON state (the commit point)."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"round-{round:04d}.safetensors"
    blob = save_tensors(
        {
            **{k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
            _RNG_KEY: torch.get_rng_state(),
        }
    )
    _atomic_write(directory / name, blob)
    doc = {
        "format": FORMAT,
        "round": round,
        "tensors": name,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "identity": identity,
        "rng": _rng_json(),
        "state": state,
    }
    _atomic_write(directory / STATE, json.dumps(doc).encode())
    for old in directory.glob("round-*.safetensors"):
        if old.name != name:
            old.unlink()


def _corrupted(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is corrupted ({type(err).__name__}: {err}); nothing was "
        "changed. Fix: delete the checkpoint directory to start over, or use another "
        "checkpoint_dir."
    )


def _read(path: Path) -> tuple[bytes, bytes] | None:
    """The bytes of ``state.json`` at ``path`` and of the tensor file it names, or None."""
    if not path.exists():
        return None
    try:
        doc = path.read_bytes()
        return doc, (path.parent / json.loads(doc)["tensors"]).read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _corrupted(path, err) from err


def _parse(path: Path, doc_bytes: bytes, blob: bytes, identity: dict[str, Any]) -> Checkpoint:
    try:
        doc = json.loads(doc_bytes)
        if doc["format"] != FORMAT:
            raise ValueError(f"format {doc['format']!r}, expected {FORMAT}")
        if hashlib.sha256(blob).hexdigest() != doc["sha256"]:
            raise ValueError(f"{doc['tensors']} does not match its SHA-256")
        tensors = load_tensors(blob)
        round_, saved, state = int(doc["round"]), doc["identity"], doc["state"]
        if not {"numpy", "python"} <= doc["rng"].keys() or _RNG_KEY not in tensors:
            raise KeyError("RNG states")
    except (ValueError, KeyError, TypeError, SafetensorError) as err:
        raise _corrupted(path, err) from err
    if saved != identity:
        differ = sorted(k for k in {*identity, *saved} if identity.get(k) != saved.get(k))
        raise CheckpointError(
            f"checkpoint {path} was written by another model or run (differs in: "
            f"{', '.join(differ)}); nothing was changed. Fix: resume with the same model and "
            "arguments, or use another checkpoint_dir."
        )
    return Checkpoint(round_, tensors, {**state, "rng": doc["rng"]})


def load(
    directory: str | Path, identity: dict[str, Any], *, sync: bool = False
) -> Checkpoint | None:
    """The checkpoint in ``directory``, or None when there is none yet.

    With ``sync`` (under ``torch.distributed``) rank 0 reads the files and broadcasts their
    bytes, so every rank resumes from rank 0's checkpoint (``directory`` need not be on a
    shared file system) and every rank raises the same error.

    Raises:
        CheckpointError: corrupted files, or an ``identity`` other than the caller's (a
            checkpoint of another model or run); nothing is modified.
    """
    path = Path(directory) / STATE
    if not sync:
        files = _read(path)
        return None if files is None else _parse(path, *files, identity)
    # Rank 0's outcome travels as (status, a, b): none; error + message; ok + both files.
    outcome: list[bytes] | None = None
    if distributed.is_writer(sync):
        try:
            files = _read(path)
            outcome = [b"none", b"", b""] if files is None else [b"ok", *files]
        except CheckpointError as err:
            outcome = [b"error", str(err).encode(), b""]
    status, a, b = distributed.broadcast_bytes(outcome, 3)
    if status == b"error":
        raise CheckpointError(a.decode())
    return None if status == b"none" else _parse(path, a, b, identity)


def identity(
    pipeline: str, model: nn.Module, data: TrainData, config: dict[str, Any]
) -> dict[str, Any]:
    """What a pipeline's checkpoint must match: its name, the model's state-dict shapes, the
    data's name and sizes (:func:`~prunekit.training.data.describe`), and the run arguments
    (callables stand for their names)."""
    doc = {
        "pipeline": pipeline,
        "model": {k: list(v.shape) for k, v in model.state_dict().items()},
        "data": describe(data),
        "config": config,
    }
    # As it reads back from state.json: tuples as lists, a callable (a loss) by its name.
    return json.loads(json.dumps(doc, default=lambda v: getattr(v, "__qualname__", repr(v))))


def save_round(
    directory: str | Path,
    round: int,
    model: nn.Module,
    identity: dict[str, Any],
    state: dict[str, Any],
    extra: dict[str, Tensor] | None = None,
    *,
    sync: bool = False,
) -> Path:
    """:func:`save` of ``model``'s state dict (masks as packed buffers) and ``extra``
    tensors after round ``round``; :func:`resume` puts them back."""
    tensors = {f"{_MODEL}{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"{_EXTRA}{k}": v for k, v in (extra or {}).items()})
    return save(directory, round, tensors, identity, state, sync=sync)


@dataclass(frozen=True)
class Resumed:
    """A :func:`save_round` checkpoint put back: the last completed ``round``, its JSON
    ``state`` and its ``extra`` tensors."""

    round: int
    state: dict[str, Any]
    extra: dict[str, Tensor]


def resume(
    directory: str | Path | None, identity: dict[str, Any], model: nn.Module, *, sync: bool = False
) -> Resumed | None:
    """Load the :func:`save_round` checkpoint in ``directory`` (None: no checkpointing) into
    ``model`` (masks included) and restore the RNG states; None when there is none yet.

    Raises:
        CheckpointError: as :func:`load`, before ``model`` is touched.
    """
    saved = None if directory is None else load(directory, identity, sync=sync)
    if saved is None:
        return None
    n = len(_MODEL)
    load_masked(model, {k[n:]: v for k, v in saved.tensors.items() if k.startswith(_MODEL)})
    saved.restore_rng()
    n = len(_EXTRA)
    extra = {k[n:]: v for k, v in saved.tensors.items() if k.startswith(_EXTRA)}
    return Resumed(saved.round, saved.state, extra)
