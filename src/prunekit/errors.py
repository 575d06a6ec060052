"""The exceptions prunekit raises.

Every error names the layer (where there is one), the offending value and the fix, and
is raised before the model is touched, so a failed call leaves the model as it was.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class PruningError(ValueError):
    """Base class of every error prunekit raises on bad input."""


class InvalidSparsityError(PruningError):
    """A sparsity outside [0, 1), or one that contradicts the granularity (N:M fixes it)."""


class UnknownChoiceError(PruningError):
    """An unknown granularity, criterion, scope or allocation name."""

    def __init__(self, kind: str, value: object, valid: list[str]) -> None:
        super().__init__(f"unknown {kind} {value!r}; valid {kind} values are: {', '.join(valid)}")


class IncompatibleLayerError(PruningError):
    """A granularity that cannot split a layer (N:M where M does not divide, kernel on Linear)."""


class NoLayersError(PruningError):
    """The layer selection matched nothing prunable."""


class MissingDataError(PruningError):
    """A data-driven criterion (gradient, Taylor, ...) was given no batches."""


class InvalidWeightError(PruningError):
    """A weight that holds NaN or inf, or is not a floating-point tensor."""


class CalibrationError(PruningError):
    """Calibration data that is empty, not token ids, or outside the model's vocabulary."""


class UnsupportedModelError(PruningError):
    """A model whose repeated blocks (decoder / encoder layers) cannot be found."""


class MissingModelError(PruningError):
    """A zoo model that is not built (cached) yet, or a model directory that does not exist."""


class NotSparseEnoughError(PruningError):
    """A weight too dense for the asked sparse format (it would take more bytes than dense)."""


class NotNMError(PruningError):
    """An N:M format asked for a weight that holds more than N nonzeros in some group of M."""


class CudaRequiredError(PruningError):
    """A CUDA-only format (2:4 semi-structured) asked for without a CUDA sm80+ device."""


class PermutationError(PruningError):
    """A channel permutation that cannot apply or would change what the network computes."""


class ScheduleError(PruningError):
    """A pruning schedule that ends before it starts, steps by a non-positive interval, or
    cannot grow to its target (a gradual schedule on N:M, an initial above the final)."""


class PrunerStateError(PruningError):
    """A Pruner state or training-loop step count that does not match the Pruner."""


class CheckpointError(PruningError):
    """A checkpoint that is corrupted, incomplete, or was written by another model or run."""


class ReportError(PruningError):
    """A report name that is not one folder name, no sections, or clashing figure names."""


class SweepError(PruningError):
    """A sweep with no seeds, no sparsities, an unusable method or a bad metric."""


class DistributedError(PruningError):
    """Distributed pruning asked for without an initialised process group, or ranks whose
    models disagree on which layers carry masks."""


class ModelSpecError(PruningError):
    """A model spec (zoo name, ``package.module:factory``, transformers directory) that
    cannot be loaded: a factory that does not import, is not callable or returns no
    ``nn.Module``, or bad factory keyword arguments."""


class RecipeError(PruningError):
    """A YAML recipe that does not parse or validate; the message names ``file:line``, the
    key, the bad value and the fix."""


class ExportError(PruningError):
    """An export that cannot be written: an optional extra (ONNX) not installed, an unknown
    format, or a model the format cannot trace."""


class UnknownLayerError(PruningError):
    """A layer named in ``shrink``'s ``ignore`` (or a ratio dict) that the model does not have."""


class CouplingError(PruningError):
    """A channel rule coupled channel runs of different lengths (the members disagree in size)."""


class UntraceableError(PruningError):
    """The structured trace met an operation on channel-carrying tensors that has no rule."""


class InvalidInputsError(PruningError):
    """The example inputs do not run through the model."""


class ShrinkVerificationError(PruningError):
    """The shrunk model failed to run or to compute what the group-masked model computes."""


class ShrunkLayoutError(CheckpointError):
    """A shrunk checkpoint that does not fit the model it is loaded into."""


class LatencyTargetError(PruningError):
    """A latency or MACs target out of reach of the model's removable channels."""


class LatencyCacheError(CheckpointError):
    """A latency cache file that is unreadable or not a latency measurement."""


class UserCallbackError(PruningError):
    """An exception raised inside a callable of the user's that prunekit calls (a training
    step, ``evaluate``, ``validate``, a criterion function, a model factory); it names the
    callable, and the original exception is its ``__cause__``."""


class UsageError(PruningError):
    """A command line that does not parse: an unknown option, a missing argument, a value
    of the wrong type or out of range."""


def guarded(fn: Callable[P, R], what: str) -> Callable[P, R]:
    """``fn`` (a callable of the user's) wrapped so that an exception it raises becomes a
    :class:`UserCallbackError` naming ``what``, with the original as ``__cause__``.

    A :class:`PruningError` passes through as it is: it already names the value and the fix.
    """

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except PruningError:
            raise
        except Exception as err:
            detail = first_line(err)
            raise UserCallbackError(
                f"{what} raised {type(err).__name__}{': ' + detail if detail else ''}; Fix: "
                "correct it (the original exception and its traceback are this error's "
                "__cause__)."
            ) from err

    return call


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message (a library's error can run to pages), or ``""``."""
    return (str(err).strip().splitlines() or [""])[0]
