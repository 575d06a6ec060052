"""Atomic, resumable checkpoints for iterative pipelines: safetensors + JSON, never pickle.

A checkpoint directory holds::

    state.json               the commit point: round, identity, history, RNG states, the
                             name and SHA-256 of the tensor file, and ``digest``
    round-0003.safetensors   the tensors of that round (a masked state dict keeps its
                             masks as packed uint8 buffers), plus torch's RNG state

**Integrity.** ``digest`` is the SHA-256 of the canonical JSON (sorted keys, no spaces) of
everything else in ``state.json``, which includes the tensor file's SHA-256: one hash
chain covers the JSON state and the tensors, and the commit stays one atomic rename (a
separate commit record would need a second one, and a window where the two disagree). An
edited ``round``, history, rewind point or RNG state no longer matches its digest.

**Validation.** Beyond the hashes, :func:`load` range-checks every field (a state sealed
by hand, or by a buggy writer, is refused too): ``round`` within the run's rounds, one
history entry per completed round with each field's type and range, the rewind point of
the run, the RNG states (each restored into a throwaway generator first), the tensor file
name, and for :func:`resume` the model tensors' keys, shapes and dtypes. Anything else is
a :class:`~prunekit.errors.CheckpointError` naming the field and the fix, raised before
anything (the model, the global RNGs, the files) is touched: resuming is all or nothing.

**Atomicity.** Every file goes through :func:`prunekit.fsio.atomic_write`: the tensors
first, under a new name, then ``state.json``, which names them. A process killed at any
moment leaves the previous checkpoint or the new one, never a mix. Tensor files of other
rounds and temporary files of interrupted saves are removed by the next successful save
or resume.

Under ``torch.distributed`` (``sync=True``) rank 0 alone writes, and rank 0 alone reads,
broadcasting the bytes, so every rank resumes from the same checkpoint and raises the same
error. :func:`save_round` / :func:`resume` are what the pipelines call: a model's masked
state dict plus extra tensors, and the model and RNG states put back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
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
from prunekit.fsio import atomic_write
from prunekit.masks import load_state_dict as load_masked
from prunekit.masks import state_mismatch
from prunekit.training import checkpoint_fields as fields
from prunekit.training import distributed
from prunekit.training.data import TrainData, describe

STATE = "state.json"
FORMAT = 3  # 2: save_round keys "model." and "extra."; 3: sealed by "digest"
_MODEL = "model."
_TENSORS = re.compile(r"round-\d{4,}\.safetensors")
logger = logging.getLogger(__name__)


def _rng_json() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next],
    }


def _digest(doc: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``doc`` (what ``state.json`` is sealed with)."""
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint: the last completed ``round``, its tensors and JSON state."""

    round: int
    tensors: dict[str, Tensor]
    state: dict[str, Any]

    def restore_rng(self) -> None:
        """Put torch's (CPU), numpy's and Python's global RNGs back to their saved states
        (validated by :func:`load`, so this cannot fail half-way)."""
        torch.set_rng_state(self.tensors[fields.RNG_KEY])
        np.random.set_state(fields.numpy_state(self.state["rng"]["numpy"]))
        random.setstate(fields.python_state(self.state["rng"]["python"]))


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
        except (OSError, CheckpointError) as err:
            error = (
                f"could not write the round-{round} checkpoint in {directory}: {err} (Fix: free "
                "disk space or pass a writable checkpoint_dir, then run the same command "
                "again); the previous checkpoint is kept."
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
    """The files of :func:`save`: the tensors, then the sealed JSON state (the commit point),
    then the clean-up of what older or interrupted saves left."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"round-{round:04d}.safetensors"
    blob = save_tensors(
        {
            **{k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
            fields.RNG_KEY: torch.get_rng_state(),
        }
    )
    atomic_write(directory / name, blob)
    doc = {
        "format": FORMAT,
        "round": round,
        "tensors": name,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "identity": identity,
        "rng": _rng_json(),
        "state": state,
    }
    doc = json.loads(json.dumps(doc))  # as it reads back (tuples as lists), then sealed
    atomic_write(directory / STATE, json.dumps({**doc, "digest": _digest(doc)}).encode())
    _clean(directory, name)


def _clean(directory: Path, keep: str) -> None:
    """Remove the tensor files of other rounds and the temporary files (hidden siblings of
    ``state.json`` and the tensor files) that interrupted saves left in ``directory``."""
    for path in directory.iterdir():
        ours = _TENSORS.fullmatch(path.name) or path.name.startswith((f".{STATE}", ".round-"))
        if ours and path.name != keep and path.is_file():
            path.unlink(missing_ok=True)


def _corrupted(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is corrupted ({what}); nothing was changed. {fields.FIX}"
    )


def _check_dir(directory: Path) -> None:
    """Refuse a ``checkpoint_dir`` no checkpoint can be written in (a file, a device, a
    read-only folder) before the first round runs; nothing is created."""
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    problem = "not a folder" if not existing.is_dir() else "not writable"
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(
            f"checkpoint_dir {str(directory)!r} cannot hold checkpoints: {str(existing)!r} is "
            f"{problem}; Fix: pass a writable folder (created if missing)."
        )


def _read(path: Path) -> tuple[bytes, bytes] | None:
    """The bytes of ``state.json`` at ``path`` and of the tensor file it names, or None."""
    _check_dir(path.parent)
    if not path.exists():
        return None
    try:
        doc = path.read_bytes()
        name = json.loads(doc)["tensors"]
        if not isinstance(name, str) or not _TENSORS.fullmatch(name):
            raise ValueError(f"tensors {name!r} is not a round-NNNN.safetensors file name")
        return doc, (path.parent / name).read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _corrupted(path, f"{type(err).__name__}: {err}") from err


def _unseal(path: Path, doc_bytes: bytes, blob: bytes) -> dict[str, Any]:
    """``state.json``'s document once its format, digest and tensor hash check out."""
    try:
        doc = json.loads(doc_bytes)
    except ValueError as err:
        raise _corrupted(path, f"{type(err).__name__}: {err}") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise _corrupted(path, f"format {found!r}, expected {FORMAT}: written by another "
                               "prunekit version, or not a prunekit checkpoint")  # fmt: skip
    digest = doc.pop("digest", None)
    if digest != _digest(doc):
        raise _corrupted(path, f"{STATE} does not match its digest: edited or damaged after "
                               "it was written")  # fmt: skip
    if hashlib.sha256(blob).hexdigest() != doc.get("sha256"):
        raise _corrupted(path, f"{doc.get('tensors')} does not match its SHA-256")
    return doc


def _parse(path: Path, doc_bytes: bytes, blob: bytes, identity: dict[str, Any]) -> Checkpoint:
    doc = _unseal(path, doc_bytes, blob)
    saved = doc.get("identity")
    if not isinstance(saved, dict) or saved != identity:
        saved = saved if isinstance(saved, dict) else {}
        differ = sorted(k for k in {*identity, *saved} if identity.get(k) != saved.get(k))
        raise CheckpointError(
            f"checkpoint {path} was written by another model or run (differs in: "
            f"{', '.join(differ)}); nothing was changed. Fix: resume with the same model and "
            "arguments, or use another checkpoint_dir."
        )
    try:
        tensors = load_tensors(blob)
    except SafetensorError as err:
        raise _corrupted(path, f"{type(err).__name__}: {err}") from err
    fields.check(path, doc, tensors, identity)
    return Checkpoint(doc["round"], tensors, {**doc["state"], "rng": doc["rng"]})


def load(
    directory: str | Path, identity: dict[str, Any], *, sync: bool = False
) -> Checkpoint | None:
    """The checkpoint in ``directory``, or None when there is none yet.

    With ``sync`` (under ``torch.distributed``) rank 0 reads the files and broadcasts their
    bytes, so every rank resumes from rank 0's checkpoint (``directory`` need not be on a
    shared file system) and every rank raises the same error.

    Raises:
        CheckpointError: corrupted, edited or out-of-range files, or an ``identity`` other
            than the caller's (a checkpoint of another model or run); nothing is modified.
    """
    if not isinstance(directory, str | os.PathLike):
        raise CheckpointError(
            f"checkpoint_dir={directory!r} ({type(directory).__name__}) is not a path; Fix: "
            "pass a folder path (a str or a pathlib.Path)."
        )
    path = Path(directory) / STATE
    if not sync:
        files = _read(path)
    else:  # rank 0's outcome travels as (status, a, b): none; error + message; ok + files
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
        files = None if status == b"none" else (a, b)
    if files is None:
        return None
    return _parse(path, *files, identity)


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
    tensors.update({f"{fields.EXTRA}{k}": v for k, v in (extra or {}).items()})
    return save(directory, round, tensors, identity, state, sync=sync)


@dataclass(frozen=True)
class Resumed:
    """A :func:`save_round` checkpoint put back: the last completed ``round``, its JSON
    ``state`` and its ``extra`` tensors."""

    round: int
    state: dict[str, Any]
    extra: dict[str, Tensor]


def _check_model(path: Path, model: nn.Module, state: dict[str, Tensor]) -> None:
    """Refuse model tensors that would not load strictly into ``model`` (keys, shapes,
    dtypes: packed masks are uint8, the rest as the model's tensor of that name)."""
    problems = state_mismatch(model, state)
    current = model.state_dict()
    for key, value in state.items():
        plain = key.replace(".parametrizations.weight.original", ".weight")
        want = torch.uint8 if key.endswith(".packed") else current.get(key, current.get(plain))
        want = want.dtype if isinstance(want, Tensor) else want
        if want is not None and value.dtype != want:
            problems.append(f"{key}: dtype {value.dtype} vs model {want}")
    if problems:
        raise CheckpointError(
            f"checkpoint {path}: the model tensors do not fit {type(model).__name__} "
            f"({'; '.join(problems[:4])}); nothing was changed. {fields.FIX}"
        )


def _log_resume(identity: dict[str, Any], done: int, directory: str | Path) -> None:
    """Say, through :mod:`logging`, which round a resumed run goes on with."""
    rounds = identity.get("config", {}).get("rounds")
    name = identity.get("pipeline", "run")
    if rounds is not None and done >= rounds:
        logger.info("%s: all %d rounds done in checkpoint %s", name, rounds, directory)
    else:
        logger.info("%s: resuming from round %d of %s (checkpoint %s)", name, done + 1,
                    rounds, directory)  # fmt: skip


def resume(
    directory: str | Path | None, identity: dict[str, Any], model: nn.Module, *, sync: bool = False
) -> Resumed | None:
    """Load the :func:`save_round` checkpoint in ``directory`` (None: no checkpointing) into
    ``model`` (masks included) and restore the RNG states; None when there is none yet.

    All or nothing: every check (:func:`load`'s, then the model tensors' keys, shapes and
    dtypes against ``model``) passes before ``model`` or an RNG is touched.

    Raises:
        CheckpointError: as :func:`load`, or model tensors that do not fit ``model``;
            ``model`` is left unchanged.
    """
    saved = None if directory is None else load(directory, identity, sync=sync)
    if saved is None:
        return None
    state = fields.prefixed(saved.tensors, _MODEL)
    _check_model(Path(directory) / STATE, model, state)
    load_masked(model, state)
    saved.restore_rng()
    _log_resume(identity, saved.round, directory)
    if distributed.is_writer(sync):  # resumed: what interrupted saves left can go
        _clean(Path(directory), f"round-{saved.round:04d}.safetensors")
    return Resumed(saved.round, saved.state, fields.prefixed(saved.tensors, fields.EXTRA))
