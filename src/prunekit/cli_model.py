"""The command line's model options, shared by ``prune``, ``profile``, ``shrink`` and
``export``: ``--model`` (a spec, see :mod:`prunekit.model_spec`), ``--model-kwargs``,
``--checkpoint`` and ``--input-shape``."""

from __future__ import annotations

import argparse

from prunekit import model_spec, zoo
from prunekit.inputs import Inputs
from prunekit.model_spec import LoadedSpec


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


def load(args: argparse.Namespace) -> LoadedSpec:
    """The model named by the parsed model options."""
    kwargs = model_spec.parse_kwargs(args.model_kwargs)
    return model_spec.load_model(args.model, kwargs=kwargs, checkpoint=args.checkpoint)


def example(
    loaded: LoadedSpec, args: argparse.Namespace, data: zoo.Dataset | None = None
) -> Inputs:
    """An example input for ``loaded``: ``--input-shape``, else ``data``, else the default."""
    shape = model_spec.parse_shape(args.input_shape)
    return model_spec.example_inputs(loaded, data=data, input_shape=shape)
