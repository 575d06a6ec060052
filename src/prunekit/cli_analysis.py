"""``prunekit sensitivity`` and ``prunekit sweep``: train a model, analyse, write a report.

    prunekit sensitivity --model lenet300 --dataset digits [--epochs 3] \\
        [--granularity element] [--criterion magnitude] [--target 0.8 --budget 0.02] [--out runs]
    prunekit sweep --model lenet300 --dataset digits --methods magnitude-global,l2-filter \\
        --sparsities 0.5,0.8,0.9 --seeds 0,1 [--epochs 3] [--exclude fc1] [--include-output] \\
        [--out runs]

``--model`` is any model spec (a zoo name, ``package.module:factory`` with
``--model-kwargs`` / ``--checkpoint``, or a transformers directory; see
:mod:`prunekit.model_spec`), trained on ``--dataset`` on ``--device``: a zoo dataset, or
``package.module:function`` returning the user's loaders
(:class:`prunekit.cli_model.Loaders`).
A method is ``<criterion>[-<granularity>][-global|-local]``: ``magnitude-global`` ranks
every layer together by magnitude, ``l2-filter`` removes output rows / filters by L2 norm.
Both commands write ``<out>/<command>-<model>-<dataset>/`` (see
:func:`prunekit.analysis.report.write_report`). Bad input raises :class:`PruningError`
before any training.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from prunekit import cli_model, model_spec, zoo
from prunekit.analysis import plots
from prunekit.analysis.report import Section, write_report
from prunekit.analysis.sensitivity import sensitivity
from prunekit.analysis.sweep import MATERIALIZE, SweepReport, sweep
from prunekit.cli_model import Data, evaluator, train_data
from prunekit.errors import PruningError, SweepError
from prunekit.inputs import Inputs
from prunekit.model_spec import LoadedSpec

SCOPES = ("global", "local")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Add the ``sensitivity`` and ``sweep`` subcommands to ``commands``."""
    sens = commands.add_parser("sensitivity", help="prune each layer alone; report and plot")
    _common(sens)
    cli_model.add_spec_arguments(sens, scope=False)
    cli_model.add_coverage_arguments(sens)
    sens.add_argument(
        "--sparsities",
        default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
        help="comma-separated grid each layer is pruned to",
    )
    sens.add_argument("--target", type=float, default=0.8, help="overall sparsity to allocate")
    sens.add_argument("--budget", type=float, default=0.02, help="accuracy drop allowed per layer")
    sens.add_argument("--seed", type=int, default=0, help="seeds the training")

    sw = commands.add_parser("sweep", help="accuracy, MACs and latency vs sparsity over seeds")
    _common(sw)
    sw.add_argument(
        "--methods",
        default="magnitude-global",
        help="comma-separated <criterion>[-<granularity>][-global|-local], e.g. l2-filter",
    )
    sw.add_argument("--sparsities", default="0.5,0.8,0.9", help="comma-separated sparsities")
    sw.add_argument("--seeds", default="0,1,2", help="comma-separated seeds: one model each")
    sw.add_argument("--exclude", nargs="+", help="layer names or globs to keep dense (fc1)")
    cli_model.add_coverage_arguments(sw)
    sw.add_argument(
        "--materialize",
        choices=MATERIALIZE,
        default="masks",
        help="what is timed: the masked dense model, the physically shrunk one (filter / "
        "channel / row methods) or sparse kernels (pk.sparse.convert auto)",
    )


def _common(parser: argparse.ArgumentParser) -> None:
    cli_model.add_model_arguments(parser)
    parser.add_argument("--dataset", required=True, help=cli_model.DATA_HELP)
    parser.add_argument("--epochs", type=int, default=3, help="dense training epochs")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="reports go here")


def _numbers(text: str, kind: Callable[[str], Any], option: str, example: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except (ValueError, argparse.ArgumentTypeError) as err:
        raise PruningError(f"{option} {text!r}: {err}; Fix: pass e.g. {option} {example}") from err
    if not values:
        raise PruningError(f"{option} is empty; Fix: pass e.g. {option} {example}")
    return values


def parse_method(spec: str) -> dict[str, object]:
    """``<criterion>[-<granularity>][-global|-local]`` as :func:`prunekit.prune` kwargs.

    Raises:
        SweepError: a spec of another shape (two granularities, two scopes, an empty part).
    """
    criterion, *rest = spec.strip().split("-")
    kwargs: dict[str, object] = {"criterion": criterion}
    for token in rest:
        key = "scope" if token in SCOPES else "granularity"
        if key in kwargs or not token:
            raise SweepError(
                f"method {spec!r}: expected <criterion>[-<granularity>][-global|-local]; "
                "Fix: e.g. magnitude-global or l2-filter."
            )
        kwargs[key] = token
    return kwargs


def _data(args: argparse.Namespace) -> Data:
    """``--dataset`` (the zoo's LeNet-300-100 reads a zoo dataset flat)."""
    return cli_model.load_data(args.dataset, flat=args.model == "lenet300")


def _build(args: argparse.Namespace, data: Data) -> LoadedSpec:
    """The model of ``--model`` on ``--device``, checked to take the data's inputs (the
    zoo's LeNet-300-100 is sized for a zoo dataset's flat input size)."""
    zoo_data = isinstance(data, zoo.Dataset)
    extra = (
        {"in_features": math.prod(data.input_shape)}
        if args.model == "lenet300" and zoo_data
        else {}
    )
    loaded = cli_model.load(args, extra)
    if zoo_data:
        model_spec.check_fits(loaded.model, args.model, data)
    else:
        cli_model.check_example(loaded, _example(args, data))
    return loaded


def _example(args: argparse.Namespace, data: Data) -> Inputs:
    """One evaluation input on ``--device``: what the sweep times."""
    return cli_model.to_device(cli_model.first_input(data), model_spec.device(args.device))


def _train(model: nn.Module, data: Data, epochs: int, seed: int) -> None:
    zoo.train(model, train_data(data), epochs=epochs, seed=seed)


def run_sensitivity(args: argparse.Namespace, console: Console) -> None:
    """Train, run :func:`~prunekit.analysis.sensitivity`, derive the allocation, report."""
    grid = _numbers(args.sparsities, float, "--sparsities", "0.5,0.9")
    data = _data(args)
    loaded = _build(args, data)
    model = loaded.model
    options = {"granularity": args.granularity, "criterion": args.criterion,
               **cli_model.coverage(args)}  # fmt: skip
    # Every option is first tried on the untrained model, so bad input fails before training:
    # with no drop anywhere, the allocation fails only on a bad target or budget.
    dry = sensitivity(model, lambda m: 0.0, sparsities=grid, progress=False, **options)
    dry.allocation(args.target, args.budget)
    _train(model, data, args.epochs, args.seed)
    report = sensitivity(model, evaluator(data), sparsities=grid, **options)
    console.print(report)
    try:
        allocation = report.allocation(args.target, args.budget)
        alloc_text = f"Target {args.target:.0%} overall, each layer within {args.budget:g}."
    except PruningError as err:
        allocation, alloc_text = {}, str(err)
    console.print(alloc_text, allocation)
    rows = [{"layer": r.name, "type": r.kind, "weights": r.numel} for r in report.layers]
    for row, layer in zip(rows, report.layers, strict=True):
        row |= {f"{s:g}": m for s, m in zip(report.sparsities, layer.metrics, strict=True)}
    text = f"Dense accuracy {report.dense:.4f}; each layer pruned alone ({report.granularity} / "
    figure = plots.plot_sensitivity(report, budget=args.budget)
    sections = [
        Section("Sensitivity", text + f"{report.criterion}).", rows, {"sensitivity": figure}),
        Section(
            "Allocation",
            alloc_text,
            [{"layer": name, "sparsity": s} for name, s in allocation.items()] or None,
        ),
    ]
    name = f"sensitivity-{loaded.name}-{data.name}"
    title = f"Sensitivity of {loaded.name} on {data.name}"
    folder = write_report(
        name, title=title, sections=sections, out_dir=args.out, seed=args.seed, data=args.dataset
    )
    console.print(f"report: {folder / 'report.html'}")


def _sweep_sections(report: SweepReport, args: argparse.Namespace, seeds: list[int]) -> list:
    """The sweep report's sections: curves and latency figures, then every seed."""
    figures = {
        "accuracy_vs_sparsity": plots.plot_accuracy_vs_sparsity(report.curves()),
        "latency_vs_macs": plots.plot_latency_vs_macs(report.latency_vs_macs()),
    }
    return [
        Section(
            "Accuracy vs sparsity",
            f"Test accuracy, mean +- std over seeds {seeds}; 'random' is the random-pruning "
            "baseline. Latency vs effective MACs, the pruned models timed as "
            f"materialize={args.materialize!r} (masks: zeros still run dense kernels).",
            report.to_rows(),
            figures,
        ),
        Section(
            "Every seed", "One row per method, sparsity and seed.", report.to_rows(per_seed=True)
        ),
    ]


def run_sweep(args: argparse.Namespace, console: Console) -> None:
    """Train one model per seed, sweep every method, report curves, latency and the table."""
    grid = _numbers(args.sparsities, float, "--sparsities", "0.5,0.9")
    seeds = _numbers(args.seeds, cli_model.count, "--seeds", "0,1,2")
    data = _data(args)
    calibration = cli_model.calibration(data, model_spec.device(args.device))
    methods = {
        spec: parse_method(spec)
        | {"exclude": args.exclude, "data": calibration, **cli_model.coverage(args)}
        for spec in args.methods.split(",")
    }

    def build_and_train(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        trained = _build(args, data).model
        _train(trained, data, args.epochs, seed)
        return trained

    options = {
        "methods": methods,
        "sparsities": grid,
        "example_inputs": _example(args, data),
        "materialize": args.materialize,
    }
    # Every option is first tried on an untrained model, so bad input fails before training.
    loaded = _build(args, data)
    sweep(
        lambda seed: loaded.model,
        lambda m: 0.0,
        seeds=seeds[:1],
        min_run_time=1e-4,  # the least timing: this run checks the options
        progress=False,
        **options,
    )
    report = sweep(build_and_train, evaluator(data), seeds=seeds, **options)
    console.print(report)
    sections = _sweep_sections(report, args, seeds)
    name = f"sweep-{loaded.name}-{data.name}"
    title = f"Sweep of {loaded.name} on {data.name}"
    folder = write_report(
        name, title=title, sections=sections, out_dir=args.out, seed=seeds, data=args.dataset
    )
    console.print(f"report: {folder / 'report.html'}")


HANDLERS = {"sensitivity": run_sensitivity, "sweep": run_sweep}
