"""The command line's shared parts: its parser class (a usage mistake is a
:class:`~prunekit.errors.UsageError`, an int option is a :func:`count`, ``--help`` shows
every default) and the model options of every command that takes ``--model`` (``prune``,
``profile``, ``shrink``, ``export``, ``sensitivity``, ``sweep``): ``--model`` (a spec, see
:mod:`prunekit.model_spec`), ``--model-kwargs``, ``--checkpoint``, ``--input-shape`` and
``--device`` (cpu, cuda or mps; one the machine lacks is refused, exit code 2)."""

from __future__ import annotations

import argparse
import json
import math
import warnings
from collections.abc import Mapping
from typing import Any, NoReturn

import torch
from torch import Tensor

from prunekit import model_spec, zoo
from prunekit.errors import InvalidInputsError, ModelSpecError, UsageError, first_line
from prunekit.inputs import Inputs, call_eval
from prunekit.model_spec import LoadedSpec

INT_MAX = 2**63 - 1  # torch's seeds and sizes are 64-bit
MAX_INPUT_ELEMENTS = 1 << 28  # an example input of 1 GiB in float32


def count(text: str) -> int:
    """An int option's value: every int option of prunekit is a count, a size or a seed,
    so an int in ``0..2**63-1``."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= INT_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int in 0..2**63-1")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help with every option's default, descriptions printed as written."""


class Parser(argparse.ArgumentParser):
    """The command line's parser (and its subcommands'): a usage mistake raises a
    :class:`UsageError` (one line, exit code 2) instead of printing the usage, an ``int``
    option is read by :func:`count`, and help shows defaults (:class:`HelpFormatter`, also
    for a subcommand asking for ``RawDescriptionHelpFormatter``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        asked = kwargs.get("formatter_class", argparse.HelpFormatter)
        if asked in (argparse.HelpFormatter, argparse.RawDescriptionHelpFormatter):
            kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        if kwargs.get("type") is int:
            kwargs["type"] = count
        return super().add_argument(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}; Fix: see {self.prog} --help.")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the model options to ``parser``."""
    parser.add_argument("--model", required=True, help=model_spec.describe())
    parser.add_argument(
        "--model-kwargs", help="constructor / factory keywords as JSON: '{\"in_features\": 64}'"
    )
    parser.add_argument(
        "--checkpoint",
        help="weights to load: .safetensors, a torch file (weights_only) or a save_shrunk dir",
    )
    parser.add_argument(
        "--input-shape", help="example input shape for a factory model, e.g. 1,1,28,28"
    )
    add_device_argument(parser)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--device`` (cpu, cuda, mps; default cpu) to ``parser``."""
    parser.add_argument(
        "--device", choices=model_spec.DEVICES, default="cpu", help="where the model runs"
    )


def load(args: argparse.Namespace, defaults: Mapping[str, Any] | None = None) -> LoadedSpec:
    """The model named by the parsed model options (``defaults``: factory keywords that
    ``--model-kwargs`` may override), on ``--device``; an unavailable device is refused
    before the model is built."""
    device = model_spec.device(args.device)
    kwargs = {**(defaults or {}), **parse_kwargs(args.model_kwargs)}
    with warnings.catch_warnings():  # a refused pickle is one error line, not torch's warning
        warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
        loaded = model_spec.load_model(args.model, kwargs=kwargs, checkpoint=args.checkpoint)
    loaded.model.to(device)
    return loaded


def to_device(inputs: Inputs, device: torch.device) -> Inputs:
    """``inputs`` (a tensor, a tuple of them or a dict of them) on ``device``."""
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(to_device(v, device) for v in inputs)
    return inputs


def example(
    loaded: LoadedSpec, args: argparse.Namespace, data: zoo.Dataset | None = None
) -> Inputs:
    """An example input for ``loaded``: ``--input-shape``, else ``data``, else the default;
    checked to run through the model."""
    shape = parse_shape(args.input_shape)
    example_ = model_spec.example_inputs(loaded, data=data, input_shape=shape)
    return check_example(loaded, to_device(example_, model_spec.device(args.device)))


def parse_kwargs(text: str | None) -> dict[str, Any]:
    """``--model-kwargs`` as a dict: a JSON object such as ``'{"in_features": 64}'``."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ModelSpecError(
            f"--model-kwargs {text!r} is not JSON ({err}); Fix: e.g. "
            "--model-kwargs '{\"in_features\": 64}'."
        ) from err
    if not isinstance(value, dict):
        raise ModelSpecError(
            f"--model-kwargs {text!r} is not a JSON object; Fix: e.g. "
            "--model-kwargs '{\"in_features\": 64}'."
        )
    return value


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``--input-shape 1,1,28,28`` as a tuple of positive ints holding at most
    :data:`MAX_INPUT_ELEMENTS` elements (it sizes the example input allocated)."""
    if not text:
        return None
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) <= 0:
        raise ModelSpecError(
            f"--input-shape {text!r} is not a list of positive ints; Fix: e.g. 1,1,28,28."
        )
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise ModelSpecError(
            f"--input-shape {text!r} holds {math.prod(shape):,} elements, more than the "
            f"{MAX_INPUT_ELEMENTS:,} an example input may take; Fix: one small batch, e.g. "
            "1,1,28,28."
        )
    return shape


def check_example(loaded: LoadedSpec, example: Inputs) -> Inputs:
    """``example`` once it has run through the model (eval mode, no gradients: the model
    is left as it was).

    Raises:
        InvalidInputsError: the model does not run on it.
    """
    try:
        call_eval(loaded.model, example)
    except Exception as err:  # the model's own forward on the user's input
        raise InvalidInputsError(
            f"model {loaded.spec!r} does not run on the example input of shape "
            f"{_shapes(example)} ({type(err).__name__}: {first_line(err)}); Fix: pass the "
            "--input-shape (or --dataset) the model takes."
        ) from err
    return example


def _shapes(inputs: Inputs) -> str:
    if isinstance(inputs, Tensor):
        return str(tuple(inputs.shape))
    items = inputs.items() if isinstance(inputs, Mapping) else enumerate(inputs)
    return ", ".join(
        f"{k}: {tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}" for k, v in items
    )
