"""Benchmark structured pruning: realised speed-up, and prunekit against Torch-Pruning.

1. **Realised speed-up** at ratio 0.5 (local, L2): measured latency speed-up divided by
   the MACs reduction, for a ResNet-style CNN, the MobileNetV2-style net and a
   transformer, batch 1 and 32, on CPU (dense and shrunk interleaved, medians). 1.0 is
   the physical limit; the target is >= 0.85.
2. **Against Torch-Pruning 1.6.1** (only when ``torch_pruning`` imports; it is never a
   prunekit dependency): the same models, ratio and criterion (group L2): remaining
   params and MACs, whether the result runs and computes what the group-masked model
   computes (our equivalence check, 1e-5), and the time to build the graph and prune on
   the models both prune exactly (interleaved and repeated in one process, as 3).
3. **Prune time** on ResNet-50, MobileNetV2 and ViT-S at 224x224 (``--only-time``: its
   own section), ``pk.shrink`` with and without its check against Torch-Pruning.

    python -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0 \\
        torch-pruning==1.6.1 transformers -e .
    .venv-bench/bin/python benchmarks/bench_structured.py --write
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import torch
from rich.console import Console
from torch import nn
from torch.utils import benchmark

import prunekit as pk
from prunekit.analysis.profile import count_macs
from prunekit.inputs import Inputs, call
from prunekit.structured import build, plan, score
from prunekit.structured.graph import DependencyGraph
from prunekit.structured.surgery import group_masked, zero_groups
from prunekit.zoo import MODELS, MobileNetV2Small, ResNet20, TinyGPT, build_model, example_input
from prunekit.zoo.hf import TRANSFORMERS, tiny_transformer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Rows, write_section
from _structured_models import MobileNetV2, ResNet50, ViT

SPEED_MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], torch.Tensor]]] = {
    "ResNet-20 (width 32, 3x64x64)": (
        lambda: ResNet20(in_channels=3, width=32),
        lambda b: torch.randn(b, 3, 64, 64),
    ),
    "MobileNetV2-small (3x64x64)": (
        lambda: MobileNetV2Small(in_channels=3),
        lambda b: torch.randn(b, 3, 64, 64),
    ),
    "TinyGPT (dim 256, 4 blocks, 8 heads, T=128)": (
        lambda: TinyGPT(vocab_size=512, block_size=128, dim=256, depth=4, heads=8),
        lambda b: torch.randint(0, 512, (b, 128)),
    ),
}


def latency(model: nn.Module, inputs: Inputs, min_run_time: float) -> float:
    timer = benchmark.Timer("call(m, x)", globals={"call": call, "m": model, "x": inputs})
    with torch.inference_mode():
        return timer.blocked_autorange(min_run_time=min_run_time).median


def realised_speedup(rows: Rows, repeats: int, min_run_time: float, console: Console) -> None:
    for name, (factory, make_input) in SPEED_MODELS.items():
        torch.manual_seed(0)
        dense = factory().eval()
        small = copy.deepcopy(dense)
        pk.shrink(small, make_input(1), ratio=0.5)
        for batch in (1, 32):
            x = make_input(batch)
            times: dict[str, list[float]] = {"dense": [], "shrunk": []}
            for _ in range(repeats):
                for key, model in (("dense", dense), ("shrunk", small)):
                    times[key].append(latency(model, x, min_run_time))
            t_dense, t_small = median(times["dense"]), median(times["shrunk"])
            macs = count_macs(dense, x) / count_macs(small, x)
            realised = t_dense / t_small / macs
            console.log(f"{name} b={batch}: {t_dense * 1e3:.2f} -> {t_small * 1e3:.2f} ms")
            rows.add(
                f"{name}, batch {batch}: latency {t_dense * 1e3:.2f} -> {t_small * 1e3:.2f} ms, "
                f"MACs / {macs:.2f}",
                f"{t_dense / t_small:.2f}x faster, realised {realised:.2f}",
                ">= 0.85",
                realised >= 0.85,
            )


# -- Torch-Pruning side by side ------------------------------------------------------------
def comparison_models() -> dict[str, Callable[[], tuple[nn.Module, Inputs]]]:
    out: dict[str, Callable[[], tuple[nn.Module, Inputs]]] = {
        f"zoo {n}": (lambda n=n: (build_model(n).eval(), example_input(n, 2))) for n in MODELS
    }
    out.update({f"hf {n}": (lambda n=n: tiny_transformer(n)) for n in TRANSFORMERS})
    return out


def _final_layer(model: nn.Module) -> nn.Module:
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    head = getattr(model, "lm_head", None) or getattr(model, "classifier", None)
    if isinstance(head, nn.Sequential):
        head = head[-1]
    return head if isinstance(head, nn.Module) else layers[-1]


def _attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """Torch-Pruning's ``num_heads``: q/k/v projections -> their number of heads."""
    heads: dict[nn.Module, int] = {}
    for module in model.modules():
        n = next((getattr(module, a) for a in ("num_heads", "num_attention_heads")
                  if isinstance(getattr(module, a, None), int)), None)  # fmt: skip
        kv = getattr(module, "num_key_value_heads", n)
        if n is None and hasattr(module, "head_dim") and hasattr(module, "q_proj"):
            n = kv = module.q_proj.out_features // module.head_dim
        for child_name, child in module.named_children():
            if child_name in ("query", "q_proj", "c_attn", "qkv") and n:
                heads[child] = n
            elif child_name in ("key", "value", "k_proj", "v_proj") and n:
                heads[child] = kv
    return heads


def _fix_heads(model: nn.Module, pruner: Any) -> None:
    """Torch-Pruning's documented post-step update of the attention modules' attributes."""
    for module in model.modules():
        for child_name in ("query", "q_proj", "c_attn", "qkv"):
            child = getattr(module, child_name, None)
            if child in pruner.num_heads:
                new = pruner.num_heads[child]
                for attr in ("num_heads", "num_attention_heads"):
                    if hasattr(module, attr):
                        setattr(module, attr, new)
                if hasattr(module, "all_head_size"):
                    module.all_head_size = new * module.attention_head_size
                if hasattr(module, "split_size"):
                    module.split_size = new * module.head_dim


def torch_pruning_run(model: nn.Module, inputs: Inputs, ratio: float) -> Any:
    import torch_pruning as tp

    heads = _attention_heads(model)
    pruner = tp.pruner.MetaPruner(
        model, inputs, tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
        ignored_layers=[_final_layer(model)], num_heads=heads, prune_num_heads=bool(heads),
        prune_head_dims=False, head_pruning_ratio=ratio,
    )  # fmt: skip
    pruner.step()
    _fix_heads(model, pruner)
    return pruner


def _group_masked(original: nn.Module, graph: DependencyGraph, history: list) -> nn.Module:
    """The original with every group Torch-Pruning cut into zeroed (a cut position outside
    every removable group is zeroed alone: the check then shows what that cost)."""
    masked = copy.deepcopy(original)
    where = {(m.name, m.dim, int(i)): g for g in graph.groups() for m in g.members for i in m.index}
    params = dict(masked.named_parameters())
    groups, alone = [], []
    for module_name, is_out, idxs in history:
        if not is_out:
            continue
        module = original.get_submodule(module_name)
        dim = 1 if type(module).__name__ == "Conv1D" else 0
        for i in idxs:
            group = where.get((f"{module_name}.weight", dim, int(i)))
            (groups if group else alone).append(group or (f"{module_name}.weight", dim, int(i)))
    zero_groups(masked, groups)
    with torch.no_grad():
        for name, dim, i in alone:
            params[name].select(dim, i).zero_()
    return masked


def _first(out: Any) -> torch.Tensor:
    return getattr(out, "logits", getattr(out, "last_hidden_state", out))


def _check(model: nn.Module, reference: nn.Module, inputs: Inputs) -> str:
    try:
        with torch.no_grad():
            got, want = _first(call(model, inputs)), _first(call(reference, inputs))
        diff = (got - want).abs().max().item() if got.shape == want.shape else float("inf")
    except Exception as exc:  # a result that does not run is a finding, not a crash
        return f"does not run ({type(exc).__name__})"
    return "exact" if diff <= 1e-5 else f"differs by {diff:.2g}"


def tp_worker(name: str, ratio: float) -> None:
    """Run Torch-Pruning on one model (in a subprocess: it can hang) and print JSON."""
    model, inputs = comparison_models()[name]()
    params0, macs0 = sum(p.numel() for p in model.parameters()), count_macs(model, inputs)
    theirs = copy.deepcopy(model)
    try:
        pruner = torch_pruning_run(theirs, inputs, ratio)
        masked = _group_masked(model, build(model, inputs), pruner.pruning_history())
        result = _check(theirs, masked, inputs)
        if sum(p.numel() for p in theirs.parameters()) == params0:
            result = "pruned nothing"
    except Exception as exc:  # Torch-Pruning failing on a model is the finding
        result = f"fails ({type(exc).__name__})"
    print(json.dumps({"result": result, "left": _left(theirs, inputs, params0, macs0)}))


def run_tp(name: str, ratio: float, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--tp-worker", name, "--ratio", str(ratio)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return {"result": f"hangs (> {timeout:.0f} s)", "left": "-"}
    except (json.JSONDecodeError, IndexError):
        return {"result": "crashes", "left": "-"}


def versus_torch_pruning(
    rows: Rows, ratio: float, timeout: float, repeats: int, console: Console
) -> None:
    exact = {"prunekit": 0, "torch-pruning": 0}
    both: dict[str, tuple[nn.Module, Inputs]] = {}  # the models both prune exactly
    for name, make in comparison_models().items():
        model, inputs = make()
        params0, macs0 = sum(p.numel() for p in model.parameters()), count_macs(model, inputs)
        ours = copy.deepcopy(model)
        pk.shrink(ours, inputs, ratio=ratio, verify=False)  # timed in both_handle
        ok_ours = _check(ours, _masked_like_ours(model, build(model, inputs), ratio), inputs)
        tp = run_tp(name, ratio, timeout)
        console.log(f"{name}: prunekit {ok_ours}, torch-pruning {tp['result']}")
        exact["prunekit"] += ok_ours == "exact"
        exact["torch-pruning"] += tp["result"] == "exact"
        if tp["result"] == "exact" and ok_ours == "exact":  # timed below, interleaved
            both[name] = (model, inputs)
        left = _left(ours, inputs, params0, macs0)
        rows.add(f"{name}: params/MACs left, prunekit", f"{left} (torch-pruning {tp['left']})")
        rows.add(f"{name}: equivalence prunekit | torch-pruning", f"{ok_ours} | {tp['result']}")
    n_ours, n_tp = exact["prunekit"], exact["torch-pruning"]
    rows.add("models handled exactly (prunekit vs torch-pruning)", f"{n_ours} vs {n_tp}",
             ">= torch-pruning", n_ours >= n_tp)  # fmt: skip
    both_handle(rows, both, ratio, repeats, console)


def both_handle(
    rows: Rows, both: dict[str, tuple[nn.Module, Inputs]], ratio: float, repeats: int,
    console: Console,
) -> None:  # fmt: skip
    """Prune time on the models both tools prune exactly, interleaved and repeated in this
    process (each finished in the peer's worker, so none hangs here): the median of the
    per-model median ratios, and its range."""
    ratios = []
    for name, (model, inputs) in both.items():
        times = interleaved({
            "prunekit": lambda m, x=inputs: pk.shrink(m, x, ratio=ratio, verify=False),
            "torch-pruning": lambda m, x=inputs: torch_pruning_run(m, x, ratio),
        }, model, repeats)  # fmt: skip
        ratios.append(median(times["prunekit"]) / median(times["torch-pruning"]))
        spent = ", ".join(f"{k} {median(v) * 1e3:.1f} ms" for k, v in times.items())
        console.log(f"{name}: {spent}")
    if ratios:
        rows.add(
            f"prune time on the {len(ratios)} models both handle, prunekit verify=False / "
            "torch-pruning (median of per-model medians [min, max])",
            f"{median(ratios):.2f}x [{min(ratios):.2f}, {max(ratios):.2f}]",
            "<= 1.0x",
            median(ratios) <= 1.0,
        )


# -- prune time against Torch-Pruning, interleaved ------------------------------------------
TIME_MODELS: dict[str, Callable[[], nn.Module]] = {
    "ResNet-50 (3x224x224)": ResNet50,
    "MobileNetV2 (3x224x224)": MobileNetV2,
    "ViT-S/16 (3x224x224)": ViT,
}


def _spread(values: list[float]) -> str:
    return f"{median(values):.3f} s [{min(values):.3f}, {max(values):.3f}]"


def interleaved(
    runs: dict[str, Callable[[nn.Module], object]], model: nn.Module, repeats: int
) -> dict[str, list[float]]:
    """Seconds of each run on fresh copies of ``model``, interleaved run by run after one
    warm-up round, the garbage collector run before each (a cycle left by one tool is
    not collected in the other's time)."""
    times: dict[str, list[float]] = {key: [] for key in runs}
    for repeat in range(repeats + 1):  # the first round warms up
        for key, run in runs.items():
            fresh = copy.deepcopy(model)
            gc.collect()  # each run starts with no garbage of the last one (as timeit)
            start = time.perf_counter()
            run(fresh)
            if repeat:
                times[key].append(time.perf_counter() - start)
    return times


def prune_time(rows: Rows, ratio: float, repeats: int, console: Console) -> None:
    """``pk.shrink`` (with and without its check) and Torch-Pruning's MetaPruner + step on
    fresh copies of the same model, :func:`interleaved`."""
    x = torch.randn(1, 3, 224, 224)
    runs: dict[str, Callable[[nn.Module], object]] = {
        "prunekit": lambda m: pk.shrink(m, x, ratio=ratio),
        "prunekit verify=False": lambda m: pk.shrink(m, x, ratio=ratio, verify=False),
        "torch-pruning": lambda m: torch_pruning_run(m, x, ratio),
    }
    for name, factory in TIME_MODELS.items():
        torch.manual_seed(0)
        times = interleaved(runs, factory().eval(), repeats)
        peer = times["torch-pruning"]
        for key in ("prunekit", "prunekit verify=False"):
            ratios = [t / p for t, p in zip(times[key], peer, strict=True)]
            rows.add(
                f"{name}: {key} vs torch-pruning, prune time (median [min, max])",
                f"{_spread(times[key])} vs {_spread(peer)}: {median(ratios):.2f}x "
                f"[{min(ratios):.2f}, {max(ratios):.2f}]",
                "<= 1.0x",
                median(ratios) <= 1.0,
            )
        console.log(f"{name}: " + ", ".join(f"{k} {median(v):.3f} s" for k, v in times.items()))


def _masked_like_ours(model: nn.Module, graph: DependencyGraph, ratio: float) -> nn.Module:
    decisions = plan(graph, score(model, graph, "l2"), ratio)
    return group_masked(model, graph, {d.name: d.removed for d in decisions})


def _left(model: nn.Module, inputs: Inputs, params0: int, macs0: int) -> str:
    try:
        params = sum(p.numel() for p in model.parameters()) / params0
        return f"{params:.2f}, {count_macs(model, inputs) / macs0:.2f}"
    except Exception:
        return "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.3)
    parser.add_argument("--quick", action="store_true", help="1 repeat, short timings")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--timeout", type=float, default=120, help="per Torch-Pruning run")
    parser.add_argument("--tp-worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--only-time",
        action="store_true",
        help="only prune time against Torch-Pruning (its own section)",
    )
    args = parser.parse_args()
    if args.tp_worker:
        return tp_worker(args.tp_worker, args.ratio)
    if args.quick:
        args.repeats, args.min_run_time = 1, 0.05
    console = Console()
    have_peer = importlib.util.find_spec("torch_pruning") is not None
    if not have_peer:
        console.print("[yellow]torch_pruning not installed: comparison skipped (see docstring)")
    if not args.only_time:
        rows = Rows()
        realised_speedup(rows, args.repeats, args.min_run_time, console)
        if have_peer:
            versus_torch_pruning(rows, args.ratio, args.timeout, args.repeats, console)
        _report("bench_structured", rows, args, console)
    if have_peer:  # its own section: the figure --only-time re-measures alone
        rows = Rows()
        prune_time(rows, args.ratio, args.repeats, console)
        _report("bench_structured_time", rows, args, console)


def _report(section: str, rows: Rows, args: argparse.Namespace, console: Console) -> None:
    rows.show(section, console)
    if args.write:
        protocol = rows.protocol("bench_structured.py", f"medians of {args.repeats} repeats")
        protocol = protocol.replace(".venv/bin/python", sys.executable)  # the peer's venv
        write_section(section, ["", protocol, "", *rows.markdown()])


if __name__ == "__main__":
    main()
