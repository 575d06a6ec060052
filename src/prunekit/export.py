"""Write a (pruned) model to disk in a deployable format, and say what was written.

=================  ================================================================
``safetensors``    the state dict with masks baked in (tied weights stored once);
                   reload with :func:`prunekit.model_spec.load_checkpoint`
``onnx``           ``torch.onnx.export`` of the baked model on an example input
                   (the ``onnx`` extra: ``pip install prunekit[onnx]``)
``csr`` / ``bsr``  :func:`prunekit.sparse.convert` to that format, then
/ ``nm`` / ``auto``  :func:`prunekit.sparse.save`; reload with :func:`prunekit.sparse.load`
                   into the dense architecture
=================  ================================================================

The model passed in is never modified: each format works on a copy.

Every file reaches its target through :func:`prunekit.fsio.atomic_write` (a sibling
temporary file, fsynced, renamed; the sparse formats by :func:`prunekit.sparse.save`, the
others staged in a temporary folder first by :func:`write_file`), and a transformers
folder through :func:`prunekit.fsio.atomic_directory` (:func:`save_pretrained`): the
target holds its old content or the complete new one, never a partial one. A disk that
is full, a folder that is read-only or a file, a target that is a folder: a
:class:`~prunekit.errors.CheckpointError` naming the path and the fix, and nothing written.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from rich.table import Table
from safetensors import SafetensorError
from safetensors.torch import save_model
from torch import Tensor, nn

from prunekit import sparse
from prunekit.errors import CheckpointError, ExportError, UnknownChoiceError
from prunekit.fsio import atomic_directory, atomic_write
from prunekit.inputs import Inputs
from prunekit.layers import select_layers
from prunekit.masks import bake
from prunekit.tables import TableReport

SPARSE = ("csr", "bsr", "nm", "auto")
FORMATS = ("safetensors", "onnx", *SPARSE)
ONNX_PACKAGES = ("onnx", "onnxscript")
_WEIGHTS = (".safetensors", ".bin", ".index.json", ".pt", ".pth")  # replaced, never carried over


@dataclass(frozen=True)
class ExportReport(TableReport):
    """The file :func:`export` wrote: its path, size, format and the format of each
    prunable layer."""

    path: Path
    bytes: int
    format: str
    layers: dict[str, str]

    def table(self) -> Table:
        table = Table(title="prunekit export")
        for col in ("file", "bytes", "format", "layers"):
            table.add_column(col, justify="right" if col == "bytes" else "left")
        by_format: dict[str, list[str]] = {}
        for name, fmt in self.layers.items():
            by_format.setdefault(fmt, []).append(name)
        layers = "; ".join(f"{fmt}: {', '.join(names)}" for fmt, names in by_format.items())
        table.add_row(str(self.path), f"{self.bytes:,}", self.format, layers)
        return table


def check_format(format: str) -> None:
    """Raise unless ``format`` is one of :data:`FORMATS` and its extra is installed."""
    if format not in FORMATS:
        raise UnknownChoiceError("export format", format, list(FORMATS))
    missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
    if format == "onnx" and missing:
        raise ExportError(
            f"format 'onnx' needs {', '.join(missing)}, which is not installed; "
            "Fix: pip install prunekit[onnx]."
        )


def make_folder(path: Path) -> Path:
    """Create the folder ``path`` (and its parents) unless it exists; ``path``.

    Raises:
        CheckpointError: it cannot be created (a file of that name, read-only, full).
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(
            f"cannot create the folder {str(path)!r}: {err.strerror or err}; Fix: pass a "
            "folder path that is not a file and lies on a writable disk with free space."
        ) from err
    return path


def write_file(path: Path, produce: Callable[[Path], None]) -> Path:
    """Write to ``path`` the file ``produce(staged)`` writes at ``staged``, atomically: it is
    staged in a temporary folder, then moved into place by :func:`~prunekit.fsio.atomic_write`
    (``path``'s folder is created). Returns ``path``.

    Raises:
        CheckpointError: staging or writing failed (disk full, read-only, a folder at
            ``path``); ``path`` is as it was.
    """
    make_folder(path.parent)
    with tempfile.TemporaryDirectory(prefix="prunekit-") as tmp:
        try:
            produce(Path(tmp) / path.name)
            data = (Path(tmp) / path.name).read_bytes()
        except (OSError, SafetensorError) as err:
            raise CheckpointError(
                f"cannot write {str(path)!r}: staging it in the temporary folder {tmp} failed "
                f"({err}); Fix: free disk space there, or set TMPDIR to a folder with room."
            ) from err
    atomic_write(path, data)
    return path


def _carried(out: Path) -> list[Path]:
    """The files of the folder ``out`` that a new save there keeps (all but the weights).

    Raises:
        CheckpointError: ``out`` holds files but no ``config.json`` (not a model folder),
            or folders (a folder save carries files only): the swap would remove them.
    """
    old = list(out.iterdir()) if out.is_dir() else []
    folders = [p.name for p in old if p.is_dir()]
    if (old and not (out / "config.json").is_file()) or folders:
        what = f"folders {folders[:4]}" if folders else "files but no config.json"
        raise CheckpointError(
            f"{str(out)!r} holds {what}, which saving a transformers model there would "
            "remove; Fix: pass a new or empty folder, or the folder of a transformers model "
            "(files only) to overwrite."
        )
    return [p for p in old if not p.name.endswith(_WEIGHTS)]


def save_pretrained(model: nn.Module, out: Path) -> Path:
    """``model.save_pretrained(out)`` (a transformers model) as one atomic folder swap
    (:func:`prunekit.fsio.atomic_directory`): written into a temporary sibling, joined by
    the files of the folder it replaces that are not weights (tokenizer, README, ...), then
    swapped with ``out``. Returns ``out``.

    Raises:
        CheckpointError: ``out`` is not a folder this save may replace (:func:`_carried`),
            or it cannot be written; ``out`` is as it was.
    """
    carried = _carried(out)
    with atomic_directory(out) as tmp:
        try:
            model.save_pretrained(tmp)
        except SafetensorError as err:  # its I/O errors (disk full) come as this type
            raise CheckpointError(
                f"cannot write {str(out)!r}: {err}; Fix: free disk space."
            ) from err
        for old in carried:
            if not (tmp / old.name).exists():
                shutil.copy2(old, tmp / old.name)
    return out


def _onnx(model: nn.Module, example_inputs: Inputs) -> Callable[[Path], None]:
    """Trace ``model`` (the exporter's errors: :class:`ExportError`); what saves the graph."""
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    else:
        args = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
        kwargs = None
    try:
        program = torch.onnx.export(model.eval(), args, None, kwargs=kwargs, dynamo=True,
                                    verbose=False)  # fmt: skip
    except Exception as err:  # the exporter raises many types; all mean "cannot trace"
        raise ExportError(
            f"torch.onnx.export failed on {type(model).__name__}: {str(err).splitlines()[0]}; "
            "Fix: export safetensors or a sparse format instead."
        ) from err
    return lambda path: program.save(path, external_data=False)


def export(
    model: nn.Module,
    format: str,
    out_dir: str | Path,
    example_inputs: Inputs | None = None,
    *,
    batch_size: int = 1,
    stem: str = "model",
) -> ExportReport:
    """Write a copy of ``model`` to ``<out_dir>/<stem>.<ext>`` in ``format`` (module table).

    ``example_inputs`` traces the ONNX graph (needed for ``onnx`` only); ``batch_size`` is
    the batch the ``auto`` sparse format times its candidates at. The file is written
    atomically (:func:`write_file`), so a failure (a weight that does not fit the format, a
    model the exporter cannot trace, a full disk) leaves ``out_dir`` as it was.

    Raises:
        UnknownChoiceError: an unknown format.
        ExportError: ``onnx`` without the onnx extra or example inputs, or a model the
            exporter cannot trace.
        CheckpointError: the file cannot be written (disk full, read-only, a folder there).
        NotSparseEnoughError, NotNMError, IncompatibleLayerError: from
            :func:`prunekit.sparse.convert` for a layer the sparse format cannot hold.
    """
    check_format(format)
    if format == "onnx" and example_inputs is None:
        raise ExportError("format 'onnx' traces the model; Fix: pass example_inputs.")
    # Export converts / bakes the model it writes; the caller's model stays as it was.
    work = copy.deepcopy(model)
    if format in SPARSE:
        report = sparse.convert(work, format, batch_size=batch_size)
        layers = {c.name: c.format for c in report.layers}
        name = f"{stem}.{format}.safetensors"
        save = partial(sparse.save, work)  # atomic itself (prunekit.fsio)
    else:
        bake(work)
        layers = {layer.name: "dense" for layer in select_layers(work)}
        name = f"{stem}.{format}"
        produce = _onnx(work, example_inputs) if format == "onnx" else partial(save_model, work)
        save = partial(write_file, produce=produce)
    path = make_folder(Path(out_dir)) / name
    save(path)
    return ExportReport(path, path.stat().st_size, format, layers)
