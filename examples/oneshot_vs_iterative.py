"""One-shot vs iterative magnitude pruning (chapter 3.5) at 80 / 90 / 95 / 98% sparsity on
LeNet-300-100 and LeNet-5 (mnist5k), with the same total fine-tuning budget.

    PYTHONPATH=src .venv/bin/python examples/oneshot_vs_iterative.py [--seeds 0,1,2] [--write]

Protocol: per seed one dense model (Adam lr 1e-3, ``--epochs``). From a copy of it,
``one-shot`` prunes to the sparsity ``s`` at once and retrains ``--budget`` epochs;
``iterative`` prunes on the geometric schedule ``s_k = 1 - (1 - s)^(k / R)`` over
``R = --rounds`` rounds, retraining ``--budget / R`` epochs after each (Han et al. 2015).
Both are :func:`prunekit.training.iterative_pruning` (one-shot is ``rounds=1``): global
magnitude, retraining at ``--lr``, pruned weights never return. Mean +- std over seeds;
figures ``docs/<section>_<model>.png``.
"""

from __future__ import annotations

import copy

import torch
from _results import DOCS, markdown, mean_std, parser, progress, protocol_line, setup, show, write

from prunekit.analysis.plots import plot_accuracy_vs_sparsity
from prunekit.training import iterative_pruning
from prunekit.zoo import build_model, evaluate, load_dataset, train

MODELS = ("lenet300", "lenet5")
SPARSITIES = (0.8, 0.9, 0.95, 0.98)
FIGURE = "{}_{}.png"  # section, model


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--epochs", type=int, default=10, help="dense training epochs")
    p.add_argument("--budget", type=int, default=5, help="fine-tuning epochs per method")
    p.add_argument("--rounds", type=int, default=5, help="iterative rounds (divides --budget)")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (Adam)")
    p.add_argument("--models", type=lambda v: v.split(","), default=list(MODELS))
    p.add_argument("--sparsities", type=lambda v: [float(x) for x in v.split(",")],
                   default=list(SPARSITIES))  # fmt: skip
    p.add_argument("--section", default="oneshot_vs_iterative", help="results section name")
    args = p.parse_args()
    if args.budget % args.rounds:
        p.error(f"--budget {args.budget} is not a multiple of --rounds {args.rounds}")
    setup(args)
    sparsities = args.sparsities[-1:] if args.quick else args.sparsities
    if args.quick:
        args.epochs, args.budget, args.rounds = 1, 2, 2
    models = args.models
    methods = {"one-shot": 1, "iterative": args.rounds}  # rounds; epochs per round below
    acc: dict[str, dict[str, dict[float, list[float]]]] = {
        m: {name: {s: [] for s in sparsities} for name in methods} for m in models
    }
    dense: dict[str, list[float]] = {m: [] for m in models}
    with progress() as bar:
        runs = len(models) * len(args.seeds) * (1 + len(methods) * len(sparsities))
        task = bar.add_task("one-shot vs iterative", total=runs)
        for model_name in models:
            data = load_dataset("mnist5k", flat=model_name == "lenet300")
            for seed in args.seeds:
                bar.update(task, description=f"{model_name} seed {seed}: dense")
                torch.manual_seed(seed)
                trained = build_model(model_name)
                train(trained, data, epochs=args.epochs, seed=seed, progress=False)
                dense[model_name].append(evaluate(trained, data.x_test, data.y_test))
                bar.advance(task)
                for (method, rounds), s in ((m, s) for m in methods.items() for s in sparsities):
                    bar.update(task, description=f"{model_name} seed {seed}: {method} {s:.0%}")
                    report = iterative_pruning(
                        copy.deepcopy(trained), data, target=s, rounds=rounds,
                        epochs=args.budget // rounds, finetune_lr=args.lr, seed=seed,
                        scope="global", progress=False,
                    )  # fmt: skip
                    acc[model_name][method][s].append(report.rounds[-1].retrained_accuracy)
                    bar.advance(task)

    header = ["model", "sparsity", "dense %", "one-shot %", "iterative %", "iterative - one-shot"]
    rows = []
    for model_name in models:
        for s in sparsities:
            one, it = acc[model_name]["one-shot"][s], acc[model_name]["iterative"][s]
            diff = [b - a for a, b in zip(one, it, strict=True)]
            rows.append([model_name, f"{s:.0%}", mean_std(dense[model_name]), mean_std(one),
                         mean_std(it), f"{mean_std(diff)} points"])  # fmt: skip
    show("one-shot vs iterative (accuracy %, mean +- std over seeds)", header, rows)
    if args.write and not args.quick:
        for m in models:
            figure = DOCS / FIGURE.format(args.section, m)
            plot_accuracy_vs_sparsity(acc[m], figure, f"{m} test accuracy")
    lines = [
        f"## One-shot vs iterative pruning, {args.budget} fine-tuning epochs "
        "(`examples/oneshot_vs_iterative.py`)",
        "",
        protocol_line(
            "oneshot_vs_iterative.py",
            f"seeds {args.seeds}, mnist5k 4,000/1,000, {args.epochs} dense epochs; global "
            f"magnitude; one-shot: prune then {args.budget} epochs; iterative: {args.rounds} "
            f"geometric rounds of {args.budget // args.rounds} epochs; retraining Adam lr "
            f"{args.lr:g}",
        ),
        "",
        *markdown(header, rows),
        "",
        *(f"![{m}: one-shot vs iterative]({FIGURE.format(args.section, m)})" for m in models),
    ]
    write(args.section, lines, args)


if __name__ == "__main__":
    main()
