"""``prunekit export``: write a model (spec + checkpoint) as safetensors, ONNX or a sparse
format, and print a table of what was written.

    prunekit export --model lenet5 --checkpoint runs/model.safetensors --format csr --out out/
    prunekit export --model mypkg.nets:build --input-shape 1,3,32,32 --format onnx --out out/
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from prunekit import cli_model, export


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand to ``commands``."""
    parser = commands.add_parser(
        "export",
        help="write a model as safetensors, ONNX or a sparse format (csr, bsr, nm, auto)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli_model.add_model_arguments(parser)
    parser.add_argument("--format", default="safetensors", choices=export.FORMATS, help="format")
    parser.add_argument("--out", type=Path, required=True, help="folder the file goes to")
    parser.add_argument(
        "--dataset", help=f"take the onnx example input from this data: {cli_model.DATA_HELP}"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="batch 'auto' times at")


def run(args: argparse.Namespace, console: Console) -> None:
    """Load the model, export it, print the table."""
    export.check_format(args.format)
    loaded = cli_model.load(args)
    data = cli_model.load_data(args.dataset) if args.dataset else None
    inputs = cli_model.example(loaded, args, data) if args.format == "onnx" else None
    report = export.export(
        loaded.model, args.format, args.out, inputs, batch_size=args.batch_size, stem=loaded.name
    )
    console.print(report)
