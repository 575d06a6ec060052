"""Soft filter pruning and network slimming with physical shrinking, on the zoo CNNs:
accuracy against measured MACs and latency, next to the dense model and a one-shot L2
filter prune + fine-tune.

    PYTHONPATH=src .venv/bin/python examples/during_training.py [--seeds 0,1,2] [--write]

Protocol per model (``SETUPS``) and seed, all with Adam lr 1e-3, batch 64, half of the
channels of every prunable family removed (``--ratio``):

- ``dense``: ``E`` epochs from ``torch.manual_seed(seed)``;
- ``soft filter pruning`` (He et al. 2018): ``E`` epochs from the same init, the weakest
  filters (L2) zeroed after every epoch and free to regrow, removed after the last
  (:func:`prunekit.training.soft_filter_pruning`);
- ``network slimming`` (Liu et al. 2017): ``E`` epochs with ``lambda * sum |gamma|``
  (lambda 1e-4), one global ``|gamma|`` ranking, shrink, ``F`` epochs of fine-tuning
  (:func:`prunekit.training.network_slimming`);
- ``one-shot L2 + fine-tune``: the dense model shrunk once by filter L2 norm
  (:func:`prunekit.shrink`, per family) and fine-tuned ``F`` epochs.

MACs of one image (:func:`prunekit.analysis.profile.count_macs`), latency the median of
:func:`prunekit.analysis.measure_latency` (eval mode, 1 thread) at batch 1 and batch 64.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from _results import markdown, mean_std, parser, progress, protocol_line, setup, show, write
from torch import nn

from prunekit.analysis import measure_latency
from prunekit.analysis.profile import count_macs
from prunekit.structured import shrink
from prunekit.training import network_slimming, soft_filter_pruning
from prunekit.zoo import build_model, evaluate, load_dataset, train

METHODS = ("dense", "soft filter pruning", "network slimming", "one-shot L2 + fine-tune")
BATCHES = (1, 64)


@dataclass(frozen=True)
class Setup:
    model: str
    data: str
    epochs: int  # E
    finetune: int  # F


SETUPS = (Setup("vgg", "mnist5k", 5, 2), Setup("resnet20", "digits", 12, 4))


@dataclass(frozen=True)
class Measured:
    accuracy: float
    params: int
    macs: int
    latency_ms: tuple[float, ...]  # one per batch size in BATCHES


def _measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, min_run_time: float) -> Measured:
    params = sum(p.numel() for p in model.parameters())
    latency = tuple(1e3 * measure_latency(model, x[:b], min_run_time) for b in BATCHES)
    return Measured(evaluate(model, x, y), params, count_macs(model, x[:1]), latency)


def run(s: Setup, seed: int, ratio: float, quick: bool) -> dict[str, Measured]:
    """Train the four variants of ``s`` with ``seed``; their measurements by method."""
    data = load_dataset(s.data)
    epochs, finetune = (1, 1) if quick else (s.epochs, s.finetune)
    example = data.x_train[:1]
    torch.manual_seed(seed)
    init = build_model(s.model)
    models = {name: copy.deepcopy(init) for name in METHODS}
    common = {"seed": seed, "progress": False}
    train(models["dense"], data, epochs=epochs, **common)
    soft_filter_pruning(models["soft filter pruning"], data, example, ratio=ratio,
                        epochs=epochs, **common)  # fmt: skip
    network_slimming(models["network slimming"], data, example, ratio=ratio, epochs=epochs,
                     finetune_epochs=finetune, **common)  # fmt: skip
    l2 = models["one-shot L2 + fine-tune"] = copy.deepcopy(models["dense"])
    shrink(l2, example, ratio=ratio, criterion="l2")
    train(l2, data, epochs=finetune, seed=seed + 1, progress=False)
    timing = 0.05 if quick else 0.3
    return {name: _measure(m, data.x_test, data.y_test, timing) for name, m in models.items()}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of channels removed")
    args = p.parse_args()
    setup(args)
    results: dict[str, list[dict[str, Measured]]] = {}
    with progress() as bar:
        task = bar.add_task("during training", total=len(SETUPS) * len(args.seeds))
        for s in SETUPS:
            for seed in args.seeds:
                bar.update(task, description=f"{s.model} on {s.data}, seed {seed}")
                results.setdefault(s.model, []).append(run(s, seed, args.ratio, args.quick))
                bar.advance(task)

    header = ["model", "method", "accuracy %", "params", "MACs / image",
              *(f"latency ms, batch {b}" for b in BATCHES), "speed-up batch 1 / 64"]  # fmt: skip
    rows = []
    for s in SETUPS:
        runs = results[s.model]
        dense_ms = [sum(r["dense"].latency_ms[i] for r in runs) / len(runs) for i in range(2)]
        for method in METHODS:
            m = [r[method] for r in runs]
            latency = [sum(x.latency_ms[i] for x in m) / len(m) for i in range(len(BATCHES))]
            rows.append([
                f"{s.model} ({s.data})", method, mean_std([x.accuracy for x in m]),
                f"{m[0].params:,}", f"{m[0].macs:,}",
                *(mean_std([x.latency_ms[i] for x in m], 1.0, 3) for i in range(len(BATCHES))),
                " / ".join(f"{d / t:.2f}x" for d, t in zip(dense_ms, latency, strict=True)),
            ])  # fmt: skip
    show("during training, physically shrunk", header, rows)
    lines = [
        "## Soft filter pruning and network slimming, physically shrunk "
        "(`examples/during_training.py`)",
        "",
        protocol_line(
            "during_training.py",
            f"seeds {args.seeds}; ratio {args.ratio}; "
            + "; ".join(f"{s.model} on {s.data}: E = {s.epochs}, F = {s.finetune}" for s in SETUPS),
        ),
        "",
        "Papers: SFP on ResNet-110 / CIFAR-10 removes 40% of the FLOPs at +0.18 points "
        "(He et al. 2018); slimming VGGNet on CIFAR-10 removes 51% of the FLOPs with no "
        "loss (Liu et al. 2017). Params and MACs are those of seed "
        f"{args.seeds[0]} (the global slimming threshold can differ between seeds).",
        "",
        *markdown(header, rows, "llrrrrrr"),
    ]
    write("during_training", lines, args)


if __name__ == "__main__":
    main()
