"""The ``prunekit`` command line: ``demo``, ``prune``, ``profile``, ``shrink``, ``--version``.

    prunekit demo [--quick] [--out DIR] [--seed N]
    prunekit prune --model lenet5 --dataset mnist5k --sparsity 0.5 --granularity filter \\
        --criterion taylor --scope local [--exclude fc3] [--epochs N] [--finetune-epochs N] \\
        [--out DIR] [--seed N]
    prunekit profile --model resnet20
    prunekit shrink --model resnet20 --ratio 0.5 [--criterion l2] [--scope local] \
        [--round-to 8] [--out DIR]
    prunekit sensitivity --model lenet300 --dataset digits [--epochs 3] [--target 0.8] [--out DIR]
    prunekit sweep --model lenet300 --dataset digits --methods magnitude-global,l2-filter \
        --sparsities 0.5,0.8,0.9 --seeds 0,1 [--exclude fc3] [--out DIR]
    prunekit llm build-lm | prune | eval ...   (see ``prunekit llm --help``)

A :class:`prunekit.PruningError` (bad sparsity, unknown name, ...) is printed as one red
line and gives exit code 2.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from rich.console import Console
from rich.text import Text
from safetensors.torch import save_file
from torch import nn

import prunekit as pk
from prunekit import cli_analysis, zoo
from prunekit.demo import run_demo, wide_console
from prunekit.errors import PruningError
from prunekit.llm import cli as llm_cli


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"prunekit {pk.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="prune two trained LeNets every applicable way")
    demo.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    demo.add_argument("--out", type=Path, default=Path("runs"), help="demo.md/demo.csv go here")
    demo.add_argument("--seed", type=int, default=0)

    prune = commands.add_parser("prune", help="train a zoo model, prune, fine-tune, save")
    prune.add_argument("--model", required=True, help=f"one of {', '.join(zoo.MODELS)}")
    prune.add_argument("--dataset", required=True, help="digits, mnist5k or mnist1d")
    prune.add_argument("--sparsity", type=float, help="fraction in [0, 1); omit for N:M")
    prune.add_argument("--granularity", default="element")
    prune.add_argument("--criterion", default="magnitude")
    prune.add_argument("--scope", default="local", help="local or global")
    prune.add_argument("--exclude", nargs="+", help="layer names or globs to keep dense (fc3)")
    prune.add_argument("--epochs", type=int, default=3, help="dense training epochs")
    prune.add_argument("--finetune-epochs", type=int, default=1)
    prune.add_argument("--out", type=Path, default=Path("runs"), help="model.safetensors dir")
    prune.add_argument("--seed", type=int, default=0)

    profile = commands.add_parser("profile", help="profile an untrained zoo model")
    profile.add_argument("--model", required=True, help=f"one of {', '.join(zoo.MODELS)}")

    shrink = commands.add_parser("shrink", help="physically remove channels / heads of a zoo model")
    shrink.add_argument("--model", required=True, help=f"one of {', '.join(zoo.MODELS)}")
    shrink.add_argument("--ratio", type=float, default=0.5, help="fraction of groups removed")
    shrink.add_argument("--criterion", default="l2", help=", ".join(pk.structured.CRITERIA))
    shrink.add_argument("--scope", default="local", help="local or global")
    shrink.add_argument("--round-to", type=int, default=1, help="keep multiples of this")
    shrink.add_argument("--out", type=Path, help="save_shrunk directory (safetensors + json)")

    cli_analysis.add_parsers(commands)
    llm_cli.add_parser(commands)
    return parser


def _demo(args: argparse.Namespace, console: Console) -> None:
    run_demo(quick=args.quick, out_dir=args.out, seed=args.seed, console=console)


def _prune_model(model: nn.Module, args: argparse.Namespace, data: zoo.Dataset) -> pk.PruneReport:
    return pk.prune(
        model,
        args.sparsity,
        granularity=args.granularity,
        criterion=args.criterion,
        scope=args.scope,
        exclude=args.exclude,
        data=zoo.calibration_batches(data, seed=args.seed),
        seed=args.seed,
    )


def _accuracy(model: nn.Module, data: zoo.Dataset) -> float:
    return zoo.evaluate(model, data.x_test, data.y_test)


def _prune(args: argparse.Namespace, console: Console) -> None:
    """Train, prune, fine-tune, report and save. Every option is first tried on an untrained
    copy, so a bad one fails before any training."""
    data = zoo.load_dataset(args.dataset)
    model = zoo.build_model(args.model)
    cli_analysis.check_fits(model, args.model, data)
    _prune_model(copy.deepcopy(model), args, data)
    zoo.train(model, data, epochs=args.epochs, seed=args.seed)
    dense = _accuracy(model, data)
    console.print(_prune_model(model, args, data))
    pruned = _accuracy(model, data)
    zoo.train(model, data, epochs=args.finetune_epochs, lr=1e-4, seed=args.seed + 1)
    finetuned = _accuracy(model, data)
    console.print(f"accuracy: dense {dense:.1%}, pruned {pruned:.1%}, fine-tuned {finetuned:.1%}")
    console.print(pk.analysis.profile(pk.bake(model), data.x_test[:1]))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    console.print(f"saved the baked weights to {path}")


def _profile(args: argparse.Namespace, console: Console) -> None:
    model = zoo.build_model(args.model)
    console.print(pk.analysis.profile(model, zoo.example_input(args.model)))


def _shrink(args: argparse.Namespace, console: Console) -> None:
    model = zoo.build_model(args.model).eval()
    x = zoo.example_input(args.model)
    before = pk.analysis.measure_latency(model, x)
    report = pk.shrink(
        model, x, args.ratio, criterion=args.criterion, scope=args.scope, round_to=args.round_to
    )
    console.print(report)
    after = pk.analysis.measure_latency(model, x)
    console.print(
        f"latency (batch 1): {before * 1e3:.3f} -> {after * 1e3:.3f} ms "
        f"({before / after:.2f}x faster; MACs {1 / report.macs_ratio:.2f}x fewer)"
    )
    if args.out:
        pk.save_shrunk(model, args.out)
        console.print(f"saved to {args.out} (load with prunekit.load_shrunk)")


COMMANDS = {
    "demo": _demo,
    "prune": _prune,
    "profile": _profile,
    "shrink": _shrink,
    "llm": llm_cli.run,
    **cli_analysis.HANDLERS,
}


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors
        return int(exit_.code or 0)
    try:
        COMMANDS[args.command](args, wide_console())
    except PruningError as err:
        Console(stderr=True).print(Text(f"error: {err}", style="red"), soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
