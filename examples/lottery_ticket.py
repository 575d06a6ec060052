"""Lottery tickets (Frankle & Carbin 2019; rewinding, Frankle et al. 2020) at CPU scale:
the IMP curve of LeNet-300-100 on mnist5k and of an MLP on MNIST-1D, rewinding to
``theta_0`` and to ``theta_k``, against the random re-initialisation control.

    PYTHONPATH=src .venv/bin/python examples/lottery_ticket.py [--seeds 0,1,2] [--write]

Protocol (:func:`prunekit.training.lottery`): train the dense network (Adam, 10% of
the training split held out to pick the early-stopping epoch); then ``--rounds`` rounds of
pruning 20% of every layer's remaining weights (output layer 10%) by magnitude, rewinding
the survivors and retraining with the same batch order. The control trains every round's
``theta_0`` masks from freshly drawn weights. Accuracy is the test accuracy at the
early-stopping epoch. Mean +- std over seeds; figure ``docs/lottery_ticket_<model>.png``.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass
from statistics import mean

from _results import DOCS, markdown, mean_std, parser, progress, protocol_line, setup, show, write
from matplotlib.ticker import NullFormatter, PercentFormatter
from rich.progress import Progress, TaskID
from torch import nn

from prunekit.analysis.plots import plot_accuracy_vs_sparsity
from prunekit.training import lottery
from prunekit.zoo import build_model, load_dataset

FIGURE = "lottery_ticket_{}.png"
LOGIT_TICKS = (0.2, 0.5, 0.8, 0.9, 0.95, 0.98)


def mlp_1d() -> nn.Module:
    """Greydanus 2020's MNIST-1D MLP: 40 -> 100 -> 100 -> 10, ReLU."""
    return nn.Sequential(
        nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10)
    )


@dataclass(frozen=True)
class Setup:
    data: str
    flat: bool
    factory: Callable[[], nn.Module]
    epochs: int
    lr: float
    paper: str


SETUPS = {
    "mlp-mnist1d": Setup(
        "mnist1d", True, mlp_1d, 10, 1e-2,
        "MNIST-1D: dense MLP 68%; a 92%-sparse ticket beats it, even with freshly drawn "
        "initial weights (Greydanus 2020).",
    ),
    "lenet300": Setup(
        "mnist5k", True, lambda: build_model("lenet300"), 3, 1e-3,
        "MNIST: tickets at about 21% of the weights beat dense; at 3.6% back to dense "
        "accuracy (Frankle & Carbin 2019).",
    ),
}  # fmt: skip


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=15, help="pruning rounds (0.8^15: ~3.6%% left)")
    p.add_argument("--rewind", type=int, default=25, help="rewind step k (optimizer steps)")
    args = p.parse_args()
    setup(args)
    if args.quick:
        args.rounds = 2
    lines = [
        "## Lottery tickets with rewinding (`examples/lottery_ticket.py`)",
        "",
        protocol_line(
            "lottery_ticket.py",
            f"seeds {args.seeds}; {args.rounds} rounds of 20% per layer (output 10%); rewind "
            f"to theta_0 and theta_{args.rewind} ({args.rewind} steps of batch 64); "
            + "; ".join(
                f"{n}: {s.data}, {s.epochs} epochs per training, Adam lr {s.lr:g}"
                for n, s in SETUPS.items()
            ),
        ),
    ]
    with progress() as bar:
        task = bar.add_task("lottery", total=len(SETUPS) * len(args.seeds) * 2)
        for name, s in SETUPS.items():
            runs, remaining = _curves(name, s, args, bar, task)
            header, rows, verdict = _table(runs, remaining)
            show(f"{name}: accuracy % at early stopping", header, rows)
            lines += [
                "",
                f"**{name}** ({s.data}). Paper: {s.paper} Ours: {verdict}",
                "",
                *markdown(header, rows),
                "",
                f"![{name}: IMP curve]({FIGURE.format(name)})",
            ]
            if args.write and not args.quick:
                _figure(runs, remaining, name)
            write("lottery_ticket", lines, args)  # after each model: a partial run still counts


def _curves(
    name: str, s: Setup, args: Namespace, bar: Progress, task: TaskID
) -> tuple[dict[str, dict[int, list[float]]], dict[int, float]]:
    """IMP with both rewinds and every seed: per run (theta_0, theta_k, random re-init) the
    accuracy per seed by round, and the weights remaining by round."""
    data = load_dataset(s.data, flat=s.flat)
    epochs = 1 if args.quick else s.epochs
    k = f"theta_{args.rewind}"
    runs: dict[str, dict[int, list[float]]] = {"theta_0": {}, k: {}, "random re-init": {}}
    remaining: dict[int, float] = {}
    for seed in args.seeds:
        for rewind, label in (("init", "theta_0"), (args.rewind, k)):
            bar.update(task, description=f"{name} seed {seed}: rewind to {label}")
            report = lottery(
                s.factory, data, rounds=args.rounds, rewind=rewind, epochs=epochs, lr=s.lr,
                control=rewind == "init", seed=seed, include_output=True,
            )  # fmt: skip
            for r in report.rounds:
                runs[label].setdefault(r.round, []).append(r.accuracy)
                if r.control_accuracy is not None:
                    runs["random re-init"].setdefault(r.round, []).append(r.control_accuracy)
            remaining = {r.round: r.remaining for r in report.rounds}
            bar.advance(task)
    return runs, remaining


def _table(
    runs: dict[str, dict[int, list[float]]], remaining: dict[int, float]
) -> tuple[list[str], list[list[str]], str]:
    """Rows per round (accuracy %, mean +- std) and a sentence on where tickets match or
    beat dense (round-0 accuracy of the same seeds)."""
    labels = list(runs)
    dense = runs[labels[0]][0]
    header = ["weights left", *labels, *(f"{lab} >= dense" for lab in labels[:2])]
    rows, beats = [], {lab: [] for lab in labels[:2]}
    for r in sorted(remaining):
        cells = [mean_std(runs[lab][r]) if r in runs[lab] else "-" for lab in labels]
        marks = []
        for lab in labels[:2]:
            ok = r > 0 and mean(runs[lab][r]) >= mean(dense)
            marks.append("yes" if ok else "")
            if ok:
                beats[lab].append(remaining[r])
        rows.append([f"{remaining[r]:.1%}", *cells, *marks])
    verdict = "; ".join(
        f"{lab} tickets match or beat dense ({mean_std(dense)}%) "
        + (f"from {max(v):.1%} down to {min(v):.1%} of the weights" if v else "at no sparsity")
        for lab, v in beats.items()
    )
    return header, rows, verdict + "."


def _figure(
    runs: dict[str, dict[int, list[float]]], remaining: dict[int, float], name: str
) -> None:
    """Accuracy vs sparsity on a logit axis (spreads 80%..98%), dense as a line."""
    results = {
        lab: {1 - remaining[r]: v for r, v in curve.items() if r > 0} for lab, curve in runs.items()
    }
    fig = plot_accuracy_vs_sparsity(results, ylabel=f"{name} test accuracy (early stopping)")
    ax = fig.axes[0]
    ax.set_xscale("logit")
    ax.set_xticks(LOGIT_TICKS)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_title(f"{name}: IMP, early-stopping accuracy vs sparsity (mean +- std over seeds)")
    ax.axhline(mean(runs["theta_0"][0]), color="gray", linestyle="--", label="dense")
    ax.legend()
    fig.savefig(DOCS / FIGURE.format(name))


if __name__ == "__main__":
    main()
