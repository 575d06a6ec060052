"""Benchmark prunekit's mask computation against torch.nn.utils.prune and the memory bus.

Measures, side by side in one run (methods interleaved, repeated, medians reported):

1. global element-wise magnitude pruning of ``layers`` square Linear layers to
   ``sparsity``: prunekit vs ``torch.nn.utils.prune.global_unstructured`` (wall time and
   peak memory beyond the weights, each method in a fresh subprocess);
2. this machine's copy bandwidth and the time of one pass over the weights, the floor
   any mask computation has to pay;
3. N:M (2:4) mask throughput of ``nm_mask_topn``, ``nm_mask_patterns`` and ``pk.prune``.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_masks.py [--quick] [--write]
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median

import torch
from rich.console import Console
from torch import nn
from torch.nn.utils import prune as torch_prune

import prunekit as pk
from prunekit.granularity import nm_mask_patterns, nm_mask_topn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MD_FILE, Rows, timed, write_section


def status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)[1])  # type: ignore[index]


def make_model(layers: int, size: int) -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(size, size, bias=False) for _ in range(layers)])


def prune_prunekit(model: nn.Module, sparsity: float) -> None:
    pk.prune(model, sparsity, granularity="element", criterion="magnitude", scope="global")


def prune_torch(model: nn.Module, sparsity: float) -> None:
    params = [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]
    torch_prune.global_unstructured(params, torch_prune.L1Unstructured, amount=sparsity)


def achieved(method: str, model: nn.Module) -> float:
    """Sparsity reached: prunekit's own report; for torch, zeros of ``module.weight``."""
    if method == "prunekit":
        return pk.sparsity(model).total
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


Pruner = Callable[[nn.Module, float], None]
METHODS: dict[str, Pruner] = {"prunekit": prune_prunekit, "torch": prune_torch}


def worker(method: str, layers: int, size: int, sparsity: float) -> None:
    """One measurement in this (fresh) process; prints a JSON line for the parent."""
    run = METHODS[method]
    torch.manual_seed(0)
    model = make_model(layers, size)
    run(make_model(2, 64), sparsity)  # warm-up: load libraries, first-call costs
    gc.collect()
    base = status_kb("VmRSS")  # includes the model's weights
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    start = time.perf_counter()
    run(model, sparsity)
    seconds = time.perf_counter() - start
    peak = (status_kb("VmHWM") - base) * 1024
    out = {"seconds": seconds, "peak": peak, "sparsity": achieved(method, model), "reset": reset}
    print(json.dumps(out))


def spawn(method: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method]
    for flag in ("layers", "size", "sparsity"):
        cmd += [f"--{flag}", str(getattr(args, flag))]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=3, help="rounds (torch: at most 2)")
    parser.add_argument("--skip-torch", action="store_true", help="skip torch's ~30 s prune")
    parser.add_argument("--quick", action="store_true", help="2 layers of 1024: smoke run")
    parser.add_argument("--write", action="store_true", help=f"update {MD_FILE.name}")
    parser.add_argument("--worker", choices=sorted(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.layers, args.size, args.sparsity)
    if args.quick:
        args.layers, args.size = 2, 1024
    console = Console(width=130)
    numel = args.layers * args.size**2
    wbytes = numel * 4
    src, dst = torch.rand(numel), torch.empty(numel)
    one_layer = nn.Linear(args.size, args.size, bias=False)
    scores = one_layer.weight.detach().abs().reshape(-1, 4)
    methods = ["prunekit"] + ([] if args.skip_torch else ["torch"])
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    bus: dict[str, list[float]] = {"copy": [], "sum": []}  # buffers as big as all weights
    nm: dict[str, list[float]] = {"nm_mask_topn": [], "nm_mask_patterns": [], "pk.prune": []}

    def prune_nm() -> None:
        model = nn.Sequential(nn.Linear(args.size, args.size, bias=False))
        model[0].weight.data.copy_(one_layer.weight.data)  # same weight every round
        start = time.perf_counter()
        pk.prune(model, granularity="2:4")
        nm["pk.prune"].append(time.perf_counter() - start)

    rows = Rows()
    dst.copy_(src), nm_mask_topn(scores, 2, 4), nm_mask_patterns(scores, 2, 4)  # warm-up
    for r in range(args.repeats):
        for method in [m for m in methods if m != "torch" or r < 2]:  # torch: ~30 s each
            console.log(f"round {r + 1}/{args.repeats}: {method}")
            runs[method].append(spawn(method, args))
            bus["copy"] += timed(lambda: dst.copy_(src), 3)
            bus["sum"] += timed(src.sum, 3)
        nm["nm_mask_topn"] += timed(lambda: nm_mask_topn(scores, 2, 4), 3)
        nm["nm_mask_patterns"] += timed(lambda: nm_mask_patterns(scores, 2, 4), 3)
        prune_nm()

    add = rows.add

    def med(method: str, key: str) -> float:
        return median(x[key] for x in runs[method])

    def secs(method: str) -> str:
        each = ", ".join(f"{x['seconds']:.2f}" for x in runs[method])
        return f"{med(method, 'seconds'):.2f} s (runs: {each})"

    def mem(ratio: float) -> str:
        return f"{ratio:.3f}x weights ({ratio * wbytes / 1e6:.0f} MB)"

    copy_t, sum_t = median(bus["copy"]), median(bus["sum"])
    bandwidth = 2 * wbytes / copy_t
    pk_t, pk_mem = med("prunekit", "seconds"), med("prunekit", "peak") / wbytes
    size = f"{args.layers} x Linear({args.size}, {args.size}), {numel / 1e6:.0f}M weights"
    add(f"prunekit global magnitude {args.sparsity:.0%}, {size}", secs("prunekit"))
    add("prunekit peak memory beyond weights", mem(pk_mem), "<= 0.25x", pk_mem <= 0.25)
    add("prunekit sparsity reached", f"{med('prunekit', 'sparsity'):.2%}")
    if "torch" in runs:
        th_t, th_mem = med("torch", "seconds"), med("torch", "peak") / wbytes
        add("torch global_unstructured(L1Unstructured)", secs("torch"))
        add("torch peak memory beyond weights", mem(th_mem))
        add("torch sparsity reached (zeros of module.weight)", f"{med('torch', 'sparsity'):.2%}")
        speedup = th_t / pk_t
        add("speed-up (torch time / prunekit time)", f"{speedup:.1f}x", ">= 20x", speedup >= 20)
    add("copy bandwidth dst.copy_(src) (read + write)", f"{bandwidth / 1e9:.2f} GB/s")
    add("one read+write pass over the weights (copy)", f"{copy_t * 1e3:.3g} ms")
    add("one read-only pass over the weights (sum)",
        f"{sum_t * 1e3:.3g} ms ({wbytes / sum_t / 1e9:.2f} GB/s)")
    add("prunekit time / read+write pass", f"{pk_t / copy_t:.1f}x", "<= 10x", pk_t / copy_t <= 10)
    add("prunekit time / read-only pass", f"{pk_t / sum_t:.1f}x")
    for name, ts in nm.items():
        rate = one_layer.weight.numel() * 4 / median(ts)
        add(f"2:4 {name}, one {args.size}x{args.size} fp32 weight",
            f"{rate / 1e9:.3f} GB/s ({rate / bandwidth:.4f}x copy bandwidth)")
    if not all(x["reset"] for xs in runs.values() for x in xs):
        console.print("[yellow]VmHWM could not be reset: peak memory is an upper bound")
    rows.show("bench_masks", console)
    if args.write:
        write_markdown(rows, args)
        console.print(f"wrote {MD_FILE}")


def write_markdown(rows: Rows, args: argparse.Namespace) -> None:
    torch_note = "skipped" if args.skip_torch else f"timed {min(args.repeats, 2)}x"
    extra = f"medians of {args.repeats} round(s); torch's prune {torch_note}"
    write_section("bench_masks", ["", rows.protocol("bench_masks.py", extra), "", *rows.markdown()])


if __name__ == "__main__":
    main()
