"""Benchmark latency-aware shrinking: realised speed-up / MACs reduction on CPU.

For ResNet-50, MobileNetV2 (benchmarks/_structured_models.py) and a ConvNeXt-nano
(benchmarks/_convnext.py), 3x224x224, random weights, 2 threads, batch 1 and 32:

(a) ``pk.shrink`` at a uniform ratio 0.5 (local, L2);
(b) ``pk.structured.shrink_to_latency`` at the MACs of (a) (``macs_ratio``, ``fold_bn``), planned at
    the batch size it is timed at;
(c) ``shrink_to_latency`` at a speed-up target (``speedup=T``, ``fold_bn``, planned at the
    batch size it is timed at; the plan checks itself on the device): T = ``TARGETS``
    (1.3 for MobileNetV2 and 1.5 for the others at batch 1, 2.0 at batch 32; ``--speedup``
    overrides);
(d) Torch-Pruning's MetaPruner at ratio 0.5, group L2 (``bench_structured.torch_pruning_run``;
    only when ``torch_pruning`` imports: run this script with the peer's interpreter).

Models are initialised as torchvision does (``pk.zoo.torchvision_init``).

Every model, the dense one included, is BatchNorm-folded (``fold_batchnorm``) before
timing. Each speed-up is ``pk.analysis.speedup(dense, shrunk)``: interleaved turns, the
median ratio with its min-max spread and the 1-minute load average. ``realised`` is the
speed-up divided by the MACs reduction (1.0: latency falls as fast as MACs).

One (model, batch) per run keeps each run short; results go to ``--results`` as JSON and
``--write`` turns all of them into the BENCHMARKS.md section and docs/latency_realised.png:

    flock /work/notes/bench.lock /tmp/tp-venv/bin/python benchmarks/bench_latency.py \\
        --model resnet50 --batch 1
    /tmp/tp-venv/bin/python benchmarks/bench_latency.py --write
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import prunekit as pk
from prunekit.cost import count_macs
from prunekit.structured import build, fold_batchnorm, shrink_to_latency

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_section
from _convnext import ConvNeXt
from _structured_models import MobileNetV2, ResNet50

MODELS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "resnet50": ("ResNet-50", ResNet50),
    "mobilenetv2": ("MobileNetV2", MobileNetV2),
    "convnext": ("ConvNeXt-nano", ConvNeXt),
}
RESULTS = Path("/tmp/bench_latency")
TARGETS = {("mobilenetv2", 1): 1.3, ("resnet50", 1): 1.5, ("convnext", 1): 1.5}
"""Speed-up targets of variant (c) at batch 1 (2.0 elsewhere): at batch 1 MobileNetV2's
per-call costs (1x1 convolutions' ~25 us floor, depthwise layers that barely speed up
when narrowed, the rest of the model) leave little latency that follows the MACs."""
PLOT = Path(__file__).resolve().parent.parent / "docs" / "latency_realised.png"


def _peer() -> tuple[Callable[..., Any] | None, str]:
    if importlib.util.find_spec("torch_pruning") is None:
        return None, "not installed"
    import torch_pruning
    from bench_structured import torch_pruning_run

    return torch_pruning_run, torch_pruning.__version__


def _peer_exact(dense: nn.Module, peer: nn.Module, x1: torch.Tensor, pruner: Any) -> str:
    """Whether the peer's model computes its group-masked original (bench_structured's
    check: positions it cut outside every exact group are zeroed alone)."""
    from bench_structured import _check, _group_masked

    masked = _group_masked(dense, build(dense, x1), pruner.pruning_history())
    return _check(peer, masked, x1)


def _target(dense: nn.Module, x1: torch.Tensor, batch: int, speedup: float) -> dict[str, Any]:
    """Variant (c): ``shrink_to_latency(speedup=...)`` on a copy, with what it measured."""
    start = time.perf_counter()
    model = copy.deepcopy(dense)
    plan, _ = shrink_to_latency(
        model, x1, speedup=speedup, batch_size=batch, fold_bn=True, verify=False
    )
    return {"model": model, "seconds": time.perf_counter() - start, "target": speedup,
            "predicted": plan.speedup, "round_to": sorted(set(plan.round_to.values())),
            "notes": plan.notes}  # fmt: skip


def variants(
    dense: nn.Module, x1: torch.Tensor, batch: int, only: set[str], speedup: float
) -> dict[str, dict[str, Any]]:
    """The shrunk models (unfolded) of ``only`` (``uniform``, ``aware``, ``target``,
    ``peer``), with how long each took and what it predicted."""
    out: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    uniform = copy.deepcopy(dense)
    pk.shrink(uniform, x1, ratio=0.5, verify=False)
    out["uniform 0.5"] = {"model": uniform, "seconds": time.perf_counter() - start}
    target = count_macs(uniform, x1) / count_macs(dense, x1)
    if "uniform" not in only:
        del out["uniform 0.5"]
    if "aware" in only:
        start = time.perf_counter()
        aware = copy.deepcopy(dense)
        plan, _ = shrink_to_latency(
            aware, x1, macs_ratio=target, batch_size=batch, fold_bn=True, verify=False
        )
        out["latency-aware, same MACs"] = {
            "model": aware, "seconds": time.perf_counter() - start,
            "predicted": plan.speedup, "round_to": sorted(set(plan.round_to.values())),
        }  # fmt: skip
    if "target" in only:
        out["latency-aware, speed-up target"] = _target(dense, x1, batch, speedup)
    run, version = _peer()
    if run is not None and "peer" in only:
        peer = copy.deepcopy(dense)
        try:
            start = time.perf_counter()
            pruner = run(peer, x1, 0.5)
            out[f"torch-pruning {version} 0.5"] = {
                "model": peer, "seconds": time.perf_counter() - start,
                "exact": _peer_exact(dense, peer, x1, pruner),
            }  # fmt: skip
        except Exception as exc:  # the peer failing on a model is the finding
            out[f"torch-pruning {version} 0.5"] = {"error": f"fails ({type(exc).__name__})"}
    return out


def _time(dense: nn.Module, small: nn.Module, xb: torch.Tensor, args: argparse.Namespace) -> dict:
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        sp = pk.analysis.speedup(dense, small, xb, repeats=args.repeats,
                                 min_run_time=args.min_run_time)  # fmt: skip
    return sp.to_dict()


def run_one(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    label, factory = MODELS[args.model]
    torch.manual_seed(0)
    dense = factory()
    pk.zoo.torchvision_init(dense)
    dense.eval()
    x1, xb = torch.randn(1, 3, 224, 224), torch.randn(args.batch, 3, 224, 224)
    load0 = os.getloadavg()[0]
    speedup = args.speedup or TARGETS.get((args.model, args.batch), 2.0)
    found = variants(dense, x1, args.batch, set(args.only.split(",")), speedup)
    macs0 = count_macs(dense, x1)
    folded = copy.deepcopy(dense)
    fold_batchnorm(folded, x1)
    rows: list[dict] = []
    for name, info in found.items():
        row = {k: v for k, v in info.items() if k != "model"}
        if "model" in info:
            small = info["model"]
            fold_batchnorm(small, x1)
            row["macs_reduction"] = macs0 / count_macs(small, x1)
            row["speedup"] = _time(folded, small, xb, args)
            print(f"{label} b{args.batch} {name}: {row['speedup']['ratio']:.2f}x, "
                  f"MACs / {row['macs_reduction']:.2f}", flush=True)  # fmt: skip
        rows.append({"variant": name, **row})
        _save(args, label, load0, rows)  # after each variant: a run cut short keeps them


def _save(args: argparse.Namespace, label: str, load0: float, rows: list[dict]) -> None:
    """This run's rows into its results file (rows of variants it did not run stay)."""
    result = {"model": label, "batch": args.batch, "threads": args.threads,
              "torch": torch.__version__, "load": [load0, os.getloadavg()[0]],
              "date": datetime.date.today().isoformat(), "rows": rows,
              "command": " ".join(sys.argv)}  # fmt: skip
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{args.model}_b{args.batch}_t{args.threads}.json"
    if path.exists():
        new = {r["variant"] for r in rows}
        kept = [r for r in json.loads(path.read_text())["rows"] if r["variant"] not in new]
        result["rows"] = kept + rows
    path.write_text(json.dumps(result, indent=1))


def _cell(row: dict) -> str:
    if "error" in row:
        return row["error"]
    sp, red = row["speedup"], row["macs_reduction"]
    text = (f"{sp['ratio'] / red:.2f} [{sp['low'] / red:.2f}, {sp['high'] / red:.2f}] "
            f"({sp['ratio']:.2f}x, MACs / {red:.2f})")  # fmt: skip
    if sp.get("load_average") is not None:
        text += f", load {sp['load_average']:.1f}"
    if row.get("exact", "exact") != "exact":
        text += f", result {row['exact']}"
    if "target" in row:
        text += f", target {row['target']:.2f}x"
    if "predicted" in row:
        text += f", plan {row['predicted']:.2f}x"
    return f"{text}, not flagged" if sp["reliable"] else text


def _cpu() -> str:
    from prunekit.structured.latency_measure import device_name

    return device_name(torch.device("cpu")).removeprefix("cpu:")


def write(results: Path) -> None:
    found = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    names = list(dict.fromkeys(r["variant"] for f in found for r in f["rows"]))
    loads = [x for f in found for x in f["load"]] or [0.0]
    turns = sorted({r["speedup"]["repeats"] for f in found for r in f["rows"]})
    commands = "; ".join(f"`{c}`" for c in sorted({f.get("command", "") for f in found}))
    lines = [
        "",
        "Realised speed-up / MACs reduction: median [min, max] over interleaved turns "
        f"(`pk.analysis.speedup`, {'/'.join(map(str, turns))} turns), then the speed-up, the "
        "MACs reduction, the speed-up target (variant 'speed-up target': "
        "`shrink_to_latency(speedup=T)`, T = 1.3 for MobileNetV2 and 1.5 for the others at "
        "batch 1, 2.0 at batch 32), the plan's own figure (what its check measured on a shrunk "
        "copy, interleaved with the dense model) and the load average while timing. "
        "Models initialised by `pk.zoo.torchvision_init`. "
        "BatchNorm folded in every model (`fold_batchnorm`); CPU "
        f"({_cpu()}), torch {found[0]['torch'] if found else ''}, random weights, "
        f"3x224x224, measured {found[0]['date'] if found else ''} on a 2-core machine "
        f"shared with other jobs (load {min(loads):.1f}-{max(loads):.1f} during the runs; "
        "`pk.analysis.speedup` flags a figure unreliable when its turns disagree by more "
        "than 25% of the median or the load exceeds its limit: the others say 'not "
        "flagged'). Target >= 0.85. Each (model, batch) is one run under "
        f"`flock /work/notes/bench.lock` with `/tmp/tp-venv/bin/python`: {commands}; "
        "then `--write`. Plot: docs/latency_realised.png.",
        "",
        "| Model, batch, threads | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for f in found:
        cells = {r["variant"]: _cell(r) for r in f["rows"]}
        threads = f"{f['threads']} thread" + "s" * (f["threads"] > 1)
        head = f"{f['model']}, batch {f['batch']}, {threads}"
        lines.append(f"| {head} | " + " | ".join(cells.get(n, "-") for n in names) + " |")
    write_section("bench_latency", lines)
    _plot(found, names)


def _plot(found: list[dict], names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for j, f in enumerate(found):
            row = next((r for r in f["rows"] if r["variant"] == name and "speedup" in r), None)
            if row is not None:
                sp, red = row["speedup"], row["macs_reduction"]
                xs.append(j + i * width)
                ys.append(sp["ratio"] / red)
                lo.append((sp["ratio"] - sp["low"]) / red)
                hi.append((sp["high"] - sp["ratio"]) / red)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=name)
    ax.axhline(0.85, color="k", ls="--", lw=1)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(found))])
    ax.set_xticklabels([f"{f['model']}\nb{f['batch']} t{f['threads']}" for f in found], fontsize=7)
    ax.set_ylabel("speed-up / MACs reduction")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--only", default="uniform,aware,target,peer", help="variants to run")
    parser.add_argument("--speedup", type=float, default=None,
                        help="variant (c)'s target (default: TARGETS)")  # fmt: skip
    parser.add_argument("--write", action="store_true", help="BENCHMARKS.md and the plot")
    args = parser.parse_args()
    if args.model:
        run_one(args)
    if args.write:
        write(args.results)


if __name__ == "__main__":
    main()
