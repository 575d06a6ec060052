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
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table
from safetensors.torch import save_model
from torch import Tensor, nn

from prunekit import sparse
from prunekit.errors import ExportError, UnknownChoiceError
from prunekit.inputs import Inputs
from prunekit.layers import select_layers
from prunekit.masks import bake
from prunekit.tables import TableReport

SPARSE = ("csr", "bsr", "nm", "auto")
FORMATS = ("safetensors", "onnx", *SPARSE)
ONNX_PACKAGES = ("onnx", "onnxscript")


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


def _onnx(model: nn.Module, example_inputs: Inputs, path: Path) -> None:
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    else:
        args = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
        kwargs = None
    try:
        torch.onnx.export(model.eval(), args, str(path), kwargs=kwargs, dynamo=True,
                          external_data=False, verbose=False)  # fmt: skip
    except Exception as err:  # the exporter raises many types; all mean "cannot trace"
        raise ExportError(
            f"torch.onnx.export failed on {type(model).__name__}: {str(err).splitlines()[0]}; "
            "Fix: export safetensors or a sparse format instead."
        ) from err


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
    the batch the ``auto`` sparse format times its candidates at. Everything is written to
    a temporary folder first, so a failure (a weight that does not fit the format, a model
    the exporter cannot trace) leaves no file in ``out_dir``.

    Raises:
        UnknownChoiceError: an unknown format.
        ExportError: ``onnx`` without the onnx extra or example inputs, or a model the
            exporter cannot trace.
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
    else:
        bake(work)
        layers = {layer.name: "dense" for layer in select_layers(work)}
        name = f"{stem}.{format}"
    with tempfile.TemporaryDirectory() as tmp:  # nothing lands in out_dir unless it all works
        staged = Path(tmp) / name
        if format in SPARSE:
            sparse.save(work, staged)
        elif format == "onnx":
            _onnx(work, example_inputs, staged)
        else:
            save_model(work, str(staged))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        path = Path(shutil.move(staged, Path(out_dir) / name))
    return ExportReport(path, path.stat().st_size, format, layers)
