"""The ``prunekit`` command line: ``demo``, ``run``, ``prune``, ``profile``, ``shrink``,
``export``, ``sensitivity``, ``sweep``, ``llm``, ``--version``; ``--help`` on each.

    prunekit demo [--quick] [--out DIR] [--seed N] [--device cpu|cuda|mps]
    prunekit run recipe.yaml [--out runs] [--quick]       # a YAML recipe -> runs/<name>/
    prunekit prune --model lenet5 --dataset mnist5k --sparsity 0.5 --granularity filter \\
        --criterion taylor --scope local [--exclude conv1] [--include-output] [--epochs N] \\
        [--finetune-epochs N] [--out DIR] [--seed N] [--device cpu|cuda|mps]
    prunekit prune --model mypkg.nets:build --dataset mypkg.data:loaders --sparsity 0.5
    prunekit prune --model mypkg.nets:build --checkpoint w.safetensors --sparsity 0.8
    prunekit prune --model path/to/hf-dir --sparsity 0.5     # lm_head, embeddings kept dense
    prunekit profile --model resnet20
    prunekit shrink --model resnet20 --ratio 0.5 [--criterion l2] [--scope local] \\
        [--round-to 8] [--approximate] [--out DIR]
    prunekit shrink --model lenet5 --checkpoint runs/model.safetensors   # the pruned filters
    prunekit export --model lenet5 --checkpoint runs/model.safetensors --format csr --out out/
    prunekit sensitivity --model lenet300 --dataset digits [--epochs 3] [--target 0.8] [--out DIR]
    prunekit sweep --model lenet300 --dataset digits --methods magnitude-global,l2-filter \\
        --sparsities 0.5,0.8,0.9 --seeds 0,1 [--exclude fc1] [--out DIR]
    prunekit llm build-lm | prune | eval ...   (see ``prunekit llm --help``)

``--model`` (prune, profile, shrink, export) is a model spec (:mod:`prunekit.model_spec`):
a zoo name, ``package.module:factory`` (``--model-kwargs`` JSON, ``--checkpoint``
safetensors / weights-only torch file / save_shrunk directory) or a transformers
directory. ``--dataset`` (prune, export, sensitivity, sweep) is a zoo dataset or
``package.module:function`` returning ``{'train': loader, 'eval': loader[, 'calibration':
batches]}`` (:class:`prunekit.cli_model.Loaders`). ``--device`` (cpu, cuda, mps) is
refused with exit code 2 when this machine lacks it. The model's output layer and
embeddings are kept dense unless ``--include-output`` / ``--include-embeddings``.

A :class:`prunekit.PruningError` (a usage mistake, bad sparsity, unknown name, a model or
checkpoint that does not load, a bad recipe, an exception in the user's own factory or
data function, ...) or an ``OSError`` (a path the file system refuses) is printed as one
red line and gives exit code 2, with nothing written; any other exception is a bug of
prunekit's and keeps its traceback.
"""

from __future__ import annotations

import argparse
import copy
import logging
import re
import warnings
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.text import Text
from safetensors.torch import save_model

import prunekit as pk
from prunekit import (
    cli_analysis,
    cli_export,
    cli_llm,
    cli_model,
    criteria,
    export,
    model_spec,
    pruning,
    recipes,
    zoo,
)
from prunekit.demo import run_demo, wide_console
from prunekit.errors import MissingDataError, PruningError
from prunekit.model_spec import LoadedSpec
from prunekit.spec import SCOPES, PruneSpec
from prunekit.tables import log_to_stderr

PRUNE_HELP = """Prune a model and save it with the masks baked in.

--model is a zoo name, package.module:factory or a transformers directory (see
--model-kwargs, --checkpoint). --dataset is needed only to train (--epochs: default 3 for
an untrained zoo model, else 0; --finetune-epochs: default 1 with a dataset) and for
data-driven criteria (gradient, taylor, wanda, snip, grasp); magnitude, l1, l2 and random
prune without data; a factory model then needs --input-shape (the profile's example
input). Writes <out>/model.safetensors (load it with --checkpoint), or a
save_pretrained directory for a transformers model."""


def _prune_parser(commands: argparse._SubParsersAction) -> None:
    prune = commands.add_parser(
        "prune",
        help="prune a model (zoo, factory or transformers dir), fine-tune, save",
        description=PRUNE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli_model.add_model_arguments(prune)
    prune.add_argument("--dataset", help=cli_model.DATA_HELP)
    prune.add_argument("--sparsity", type=float, help="fraction in [0, 1); omit for N:M")
    cli_model.add_spec_arguments(prune)
    cli_model.add_coverage_arguments(prune)
    prune.add_argument("--exclude", nargs="+", help="layer names or globs to keep dense (conv1)")
    prune.add_argument(
        "--epochs", type=int, help="dense training epochs (default 3 for an untrained zoo model)"
    )
    prune.add_argument("--finetune-epochs", type=int, help="default 1 with --dataset")
    prune.add_argument("--out", type=Path, default=Path("runs"), help="the pruned model goes here")
    prune.add_argument("--seed", type=int, default=0, help="seeds training and calibration")


def _shrink_parser(commands: argparse._SubParsersAction) -> None:
    shrink = commands.add_parser("shrink", help="physically remove channels / heads of a model")
    cli_model.add_model_arguments(shrink)
    shrink.add_argument(
        "--ratio",
        type=float,
        help="fraction of groups removed, ranked by --criterion; default: exactly the groups "
        "whose weights are all zero (e.g. filters pruned by prunekit prune --granularity "
        "filter), refused when there are none",
    )
    shrink.add_argument("--criterion", default="l2", help=", ".join(criteria.names("channels")))
    shrink.add_argument("--scope", default="local", choices=SCOPES, help="local or global")
    shrink.add_argument("--round-to", type=int, default=1, help="keep multiples of this")
    shrink.add_argument(
        "--approximate",
        action="store_true",
        help="INEXACT: also remove a transformer's hidden size through LayerNorm / RMSNorm; "
        "the outputs then differ from the masked model's, by the deviation printed",
    )
    shrink.add_argument("--out", type=Path, help="save_shrunk directory (safetensors + json)")


def _parser() -> argparse.ArgumentParser:
    parser = cli_model.Parser(prog="prunekit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"prunekit {pk.__version__}")
    talk = parser.add_mutually_exclusive_group()
    talk.add_argument("-v", "--verbose", dest="log_level", action="store_const",
                      const=logging.DEBUG, default=logging.INFO,
                      help="log debug lines too (progress also beside a bar)")  # fmt: skip
    talk.add_argument("-q", "--quiet", dest="log_level", action="store_const",
                      const=logging.WARNING, help="log warnings only")  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="the chapter's whole practice on two trained LeNets, as one HTML report"
    )
    demo.add_argument("--quick", action="store_true", help="the same path in about 30 s")
    demo.add_argument("--out", type=Path, default=Path("runs"), help="the report goes to OUT/demo/")
    demo.add_argument("--seed", type=int, default=0, help="seeds every training and prune")
    cli_model.add_device_argument(demo)

    _prune_parser(commands)
    profile = commands.add_parser("profile", help="params, bytes, MACs and latency of a model")
    cli_model.add_model_arguments(profile)

    _shrink_parser(commands)
    cli_export.add_parser(commands)
    run = commands.add_parser(
        "run",
        help="run a YAML recipe and write runs/<name>/report.html",
        description=recipes.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("recipe", type=Path, help="the recipe YAML file")
    run.add_argument("--out", type=Path, default=Path("runs"), help="reports go here")
    run.add_argument("--quick", action="store_true", help="few epochs, little data (CI)")
    cli_analysis.add_parsers(commands)
    cli_llm.add_parser(commands)
    return parser


def _demo(args: argparse.Namespace, console: Console) -> None:
    device = model_spec.device(args.device)  # an unavailable one is refused before any work
    run_demo(quick=args.quick, out_dir=args.out, seed=args.seed, console=console, device=device)


def _spec(args: argparse.Namespace) -> PruneSpec:
    return PruneSpec(
        granularity=args.granularity,
        criterion=args.criterion,
        scope=args.scope,
        exclude=args.exclude,
        seed=args.seed,
        **cli_model.coverage(args),
    )


def _epochs(
    args: argparse.Namespace, loaded: LoadedSpec, data: cli_model.Data | None
) -> tuple[int, int]:
    """(dense, fine-tune) epochs: 3 and 1 for an untrained zoo model, else 0 and 1; both
    need ``--dataset``."""
    untrained = loaded.kind == "zoo" and loaded.checkpoint is None
    dense = args.epochs if args.epochs is not None else (3 if untrained and data else 0)
    finetune = args.finetune_epochs if args.finetune_epochs is not None else int(data is not None)
    if data is None and (dense or finetune):
        raise MissingDataError(
            f"--epochs {dense} / --finetune-epochs {finetune} train the model, which needs data; "
            "Fix: pass --dataset, or drop the epochs."
        )
    if data is None and criteria.get(args.criterion).requires_data:
        raise MissingDataError(
            f"criterion {args.criterion!r} scores weights on data; Fix: pass --dataset, or use "
            "a data-free criterion (magnitude, l1, l2, random)."
        )
    return dense, finetune


def _prune(args: argparse.Namespace, console: Console) -> None:
    """Train, prune, fine-tune, report and save. The prune is planned first (validated
    without touching the model), so a bad option fails before any training and nothing
    is written."""
    data = cli_model.load_data(args.dataset) if args.dataset else None
    loaded = cli_model.load(args)
    model = loaded.model
    dense_epochs, finetune_epochs = _epochs(args, loaded, data)
    device = model_spec.device(args.device)
    calibration = cli_model.calibration(data, device, seed=args.seed) if data else None
    if isinstance(data, zoo.Dataset):
        model_spec.check_fits(model, args.model, data)
    spec = _spec(args)
    pruning.plan(model, args.sparsity, spec).check_data(calibration)
    example = cli_model.example(loaded, args, data)
    accuracy: dict[str, float] = {}

    def measure(stage: str) -> None:
        if data is not None:
            accuracy[stage] = cli_model.evaluator(data)(model)

    if dense_epochs:
        zoo.train(model, cli_model.train_data(data), epochs=dense_epochs, seed=args.seed)
    measure("dense")
    console.print(pruning.apply(pruning.plan(model, args.sparsity, spec), calibration))
    measure("pruned")
    if finetune_epochs:
        train = cli_model.train_data(data)
        zoo.train(model, train, epochs=finetune_epochs, lr=1e-4, seed=args.seed + 1)
    measure("fine-tuned")
    if accuracy:
        console.print("accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items()))
    console.print(pk.analysis.profile(pk.bake(model), example))
    if loaded.kind == "transformers":  # atomic: the old folder or the new one, whole
        export.save_pretrained(model, args.out)
        console.print(f"saved the baked model to {args.out} (a transformers directory)")
        return
    path = export.write_file(args.out / "model.safetensors", partial(save_model, model))
    console.print(f"saved the baked weights to {path} (prunekit export --checkpoint {path})")


def _profile(args: argparse.Namespace, console: Console) -> None:
    loaded = cli_model.load(args)
    console.print(pk.analysis.profile(loaded.model, cli_model.example(loaded, args)))


def _shrink(args: argparse.Namespace, console: Console) -> None:
    loaded = cli_model.load(args)
    model = loaded.model.eval()
    x = cli_model.example(loaded, args)
    dense = copy.deepcopy(model)
    report = pk.shrink(model, x, args.ratio, criterion=args.criterion, scope=args.scope,
                       round_to=args.round_to, approximate=args.approximate)  # fmt: skip
    console.print(report)  # an approximate shrink's note says how far the outputs moved
    with warnings.catch_warnings():  # the line below says UNRELIABLE and why, once
        warnings.simplefilter("ignore", UserWarning)
        timed = pk.analysis.speedup(dense, model, x)
    console.print(f"speed-up (batch 1): {timed}; MACs {1 / report.macs_ratio:.2f}x fewer")
    if args.out:
        pk.save_shrunk(model, args.out)
        console.print(f"saved to {args.out} (load with prunekit.load_shrunk)")


def _run(args: argparse.Namespace, console: Console) -> None:
    folder = recipes.run_file(args.recipe, out_dir=args.out, quick=args.quick, console=console)
    console.print(f"report: {folder / 'report.html'}")


COMMANDS = {
    "demo": _demo,
    "prune": _prune,
    "profile": _profile,
    "shrink": _shrink,
    "export": cli_export.run,
    "run": _run,
    "llm": cli_llm.run,
    **cli_analysis.HANDLERS,
}


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser, args = _parser(), None
    try:
        args = parser.parse_args(argv)
        log_to_stderr(args.log_level)
        COMMANDS[args.command](args, wide_console())
    except SystemExit as exit_:  # --help and --version
        return int(exit_.code or 0)
    except (PruningError, OSError) as err:  # a user's mistake, or the file system's refusal
        _error(err, _options(parser, args))
        return 2
    return 0


def _options(parser: argparse.ArgumentParser, args: argparse.Namespace | None) -> dict:
    """``{dest: action}`` of the options of the command ``args`` ran (none before it parsed)."""
    if args is None:
        return {}
    for action in parser._actions:  # the subcommand's parser, down to the leaf (llm prune)
        if isinstance(action, argparse._SubParsersAction):
            sub = action.choices.get(getattr(args, action.dest, None))
            return _options(sub, args) if sub is not None else {}
    return {a.dest: a for a in parser._actions if a.option_strings}


# name=value in a library error's Fix; not inside a call (pk.prune(..., scope='local'))
_KEYWORD = re.compile(r"(?<![\w.])([a-z_]\w*)=('[^']*'|\"[^\"]*\"|[\w.:+-]+)(?![\w(\[{])")


def _as_flags(text: str, options: dict) -> str:
    """``text`` with each ``name=value`` of its Fix that names an option of the command
    spelled as that option (``include_output=True`` -> ``--include-output``, ``ratio=0.5``
    -> ``--ratio 0.5``): the library's errors speak Python, the command line's flags."""
    head, fix_, fix = text.rpartition("Fix:")

    def flag(m: re.Match[str]) -> str:
        action = options.get(m[1])
        depth = fix.count("(", 0, m.start()) - fix.count(")", 0, m.start())
        if action is None or depth > 0:
            return m[0]
        option, value = max(action.option_strings, key=len), m[2].strip("'\"")
        if action.nargs == 0:  # a switch: only its True is a flag to pass
            return option if value == "True" else m[0]
        return f"{option} {value}"

    return head + fix_ + _KEYWORD.sub(flag, fix) if fix_ else text


def _error(err: Exception, options: dict) -> None:
    """``err`` as one red line on stderr (an OSError names its path and errno), its Fix in
    the command's flags (:func:`_as_flags`)."""
    text = _as_flags(" ".join(str(err).split()), options)
    Console(stderr=True).print(Text(f"error: {text}", style="red"), soft_wrap=True)


if __name__ == "__main__":
    raise SystemExit(main())
