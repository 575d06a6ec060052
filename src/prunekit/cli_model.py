"""The command line's shared parts: its parser class (a usage mistake is a
:class:`~prunekit.errors.UsageError`, an int option is a :func:`count`, ``--help`` shows
every default) and the model options of every command that takes ``--model`` (``prune``,
``profile``, ``shrink``, ``export``, ``sensitivity``, ``sweep``): ``--model`` (a spec, see
:mod:`prunekit.model_spec`), ``--model-kwargs``, ``--checkpoint``, ``--input-shape`` and
``--device`` (cpu, cuda or mps; one the machine lacks is refused, exit code 2); and the data
of every command and recipe that trains or scores (:func:`load_data`): a zoo dataset by
name, or ``package.module:function`` returning the user's loaders (:class:`Loaders`)."""

from __future__ import annotations

import argparse
import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from prunekit import criteria, granularity, model_spec, zoo
from prunekit.errors import (
    InvalidInputsError,
    MissingDataError,
    ModelSpecError,
    UsageError,
    first_line,
    guarded,
)
from prunekit.inputs import Inputs, call_eval
from prunekit.model_spec import LoadedSpec
from prunekit.spec import SCOPES
from prunekit.training.data import TrainData, accuracy

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


def add_spec_arguments(parser: argparse.ArgumentParser, scope: bool = True) -> None:
    """Add ``--granularity`` and ``--criterion`` (and ``--scope``), their choices in the
    help (the criterion and granularity names are checked by :class:`~prunekit.PruneSpec`,
    which suggests the closest for a typo)."""
    parser.add_argument(
        "--granularity", default="element", help="one of " + ", ".join(granularity.VALID)
    )
    parser.add_argument(
        "--criterion", default="magnitude", help="one of " + ", ".join(criteria.names("groups"))
    )
    if scope:
        help_ = "local: each layer to the sparsity; global: one ranking"
        parser.add_argument("--scope", default="local", choices=SCOPES, help=help_)


def add_coverage_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--include-output`` and ``--include-embeddings``: the model's output layer
    (classifier, ``lm_head``) and its embeddings are kept dense unless asked
    (:class:`~prunekit.PruneSpec` ``include_output`` / ``include_embeddings``)."""
    parser.add_argument("--include-output", action="store_true",
                        help="also prune the output layer (classifier, lm_head), kept dense "
                        "by default")  # fmt: skip
    parser.add_argument("--include-embeddings", action="store_true",
                        help="also prune the embeddings, kept dense by default")  # fmt: skip


def coverage(args: argparse.Namespace) -> dict[str, bool]:
    """The parsed :func:`add_coverage_arguments` as :class:`~prunekit.PruneSpec` fields."""
    return {"include_output": args.include_output, "include_embeddings": args.include_embeddings}


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--device`` (cpu, cuda, mps; default cpu) to ``parser``."""
    parser.add_argument(
        "--device", choices=model_spec.DEVICES, default="cpu", help="where the model runs"
    )


DATA_HELP = (
    f"{', '.join(zoo.data.DATASETS)}, or package.module:function returning "
    "{'train': loader, 'eval': loader[, 'calibration': batches]}"
)
LOADER_KEYS = ("train", "eval", "calibration")
CONTRACT_FIX = (
    "Fix: return {'train': train_loader, 'eval': eval_loader} (optionally 'calibration': "
    "batches), each a re-iterable of (x, y) batches such as a DataLoader."
)


@dataclass(frozen=True)
class Loaders:
    """The data of a user's ``package.module:function``, called without arguments. The
    contract (one for every command and recipe): it returns a mapping
    ``{"train": ..., "eval": ...[, "calibration": ...]}``, each value a re-iterable of
    ``(x, y)`` batches (a ``torch.utils.data.DataLoader``, a list); ``train`` trains,
    ``eval`` gives the accuracy and the example input (its first ``x``), ``calibration``
    (default: the first ``n_calibration`` training batches) feeds data-driven criteria."""

    name: str
    train: Iterable[Any]
    eval: Iterable[Any]
    calibration: list[Any]


Data = zoo.Dataset | Loaders
"""What a command trains and scores on: a zoo dataset in memory, or the user's loaders."""


def _reiterable(value: Any) -> bool:
    return isinstance(value, Iterable) and iter(value) is not value


def user_loaders(spec: str, n_calibration: int = 4) -> Loaders:
    """Call the data function ``spec`` (``package.module:function``) and check what it
    returns against the :class:`Loaders` contract.

    Raises:
        ModelSpecError: the module does not import or has no such callable.
        UserCallbackError: the function raised.
        MissingDataError: it returned anything else than the contract's mapping, or an
            ``eval`` whose first batch is not an ``(x, y)`` pair.
    """
    out = guarded(model_spec.resolve(spec, "data"), f"data function {spec!r}")()
    if not isinstance(out, Mapping) or {"train", "eval"} - set(out) or set(out) - {*LOADER_KEYS}:
        raise MissingDataError(
            f"data {spec!r} returned {type(out).__name__} {out!r:.60}, not a mapping with keys "
            f"train and eval (and optionally calibration); {CONTRACT_FIX}"
        )
    for key, value in out.items():
        if not _reiterable(value):
            raise MissingDataError(
                f"data {spec!r}: {key!r} is a {type(value).__name__}, not a re-iterable of "
                f"batches (a generator runs out after one epoch); {CONTRACT_FIX}"
            )
    first = next(iter(out["eval"]), None)
    if not isinstance(first, tuple | list) or len(first) != 2:
        raise MissingDataError(
            f"data {spec!r}: the first 'eval' batch is {type(first).__name__} {first!r:.60}, "
            f"not an (x, y) pair; {CONTRACT_FIX}"
        )
    calibration = out.get("calibration") or islice(out["train"], n_calibration)
    return Loaders(spec.rsplit(":", 1)[-1], out["train"], out["eval"], list(calibration))


def load_data(spec: str, flat: bool = False, n_calibration: int = 4) -> Data:
    """``--dataset`` / a recipe's ``data``: a zoo dataset by name (``flat``: images as
    vectors), or the :func:`user_loaders` of ``package.module:function``."""
    if ":" in spec:
        return user_loaders(spec, n_calibration)
    return zoo.load_dataset(spec, flat=flat)


def train_data(data: Data | None) -> TrainData | None:
    """What training takes from ``data``: the zoo split in memory, or the train loader."""
    return data.train if isinstance(data, Loaders) else data


def evaluator(data: Data) -> Callable[[nn.Module], float]:
    """``model -> accuracy`` on ``data``'s test split or eval loader."""
    if isinstance(data, zoo.Dataset):
        return lambda model: zoo.evaluate(model, data.x_test, data.y_test)
    return lambda model: accuracy(model, data.eval)


def calibration(
    data: Data, device: torch.device, n_batches: int = 4, batch_size: int = 64, seed: int = 0
) -> list:
    """The batches data-driven criteria score on, on ``device`` (the model's): seeded
    training batches of a zoo dataset, or the loaders' calibration batches."""
    if isinstance(data, zoo.Dataset):
        batches = zoo.calibration_batches(data, n_batches, batch_size, seed)
    else:
        batches = data.calibration
    return [to_device(batch, device) for batch in batches]


def first_input(data: Data) -> Inputs:
    """One example input of ``data``: its first test row / eval batch's first ``x``."""
    x = data.x_test if isinstance(data, zoo.Dataset) else next(iter(data.eval))[0]
    return x[:1] if isinstance(x, Tensor) else x


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


def example_input(
    loaded: LoadedSpec, data: Data | None = None, shape: tuple[int, ...] | None = None
) -> Inputs:
    """An example input for ``loaded``: ``randn(shape)``, else ``data``'s first input, else
    the model's default (:func:`prunekit.model_spec.example_inputs`)."""
    if shape is None and data is not None:
        return first_input(data)
    return model_spec.example_inputs(loaded, input_shape=shape)


def example(loaded: LoadedSpec, args: argparse.Namespace, data: Data | None = None) -> Inputs:
    """An example input for ``loaded``: ``--input-shape``, else ``data``, else the default;
    on ``--device``, checked to run through the model."""
    example_ = example_input(loaded, data, parse_shape(args.input_shape))
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
