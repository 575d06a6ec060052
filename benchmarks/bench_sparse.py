"""Benchmark sparse execution: dense vs CSR / BSR / N:M vs "auto", bytes, a whole model, and
block vs unstructured pruning (accuracy and speed).

Measures, side by side in one run (all modules of one configuration interleaved, repeated,
medians reported), under ``torch.inference_mode``:

1. Linear layers of shape 4096x4096 and the transformer FFN 768->3072 / 3072->768 at batch
   1 / 8 / 64, pruned 50 / 80 / 90 / 95 / 98% unstructured, 90% in 32x32 blocks and 2:4;
   each converted to every format that fits it and to "auto"; batch-1 figures beside the
   memory-bandwidth floor (stored bytes / read bandwidth);
2. the converted bytes against dense;
3. a 4-block transformer FFN stack pruned 90% (unstructured and 32x32 blocks), end to end;
4. LeNet-300-100 on mnist5k pruned 90% element-wise vs in 4x4 blocks (with a short
   fine-tune): accuracy and batch-1 / batch-64 latency after conversion.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_sparse.py [--quick] [--write]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

import torch
from rich.console import Console
from torch import nn
from torch.utils import benchmark

import prunekit as pk
from prunekit import sparse, zoo
from prunekit.errors import PruningError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MD_FILE, Rows, timed, write_section

INTRO = """
    PYTHONPATH=src .venv/bin/python benchmarks/bench_sparse.py --write   # full, ~5 min quiet
    PYTHONPATH=src .venv/bin/python benchmarks/bench_sparse.py --quick   # smoke run

Dense vs CSR / BSR (MKL and gather kernels) / N:M (CPU, from the compressed form) vs
`convert(format="auto")` on single Linear layers, then bytes, a 4-block FFN stack end to
end, LeNet-300-100 pruned in blocks vs element-wise, and CUDA 2:4 where a GPU exists.
"floor" = stored bytes / read bandwidth: no kernel can be faster at batch 1.
""".strip("\n").split("\n")

# column -> (format, BSR kernel)
FORMATS = {
    "csr": ("csr", "mkl"),
    "bsr": ("bsr", "mkl"),
    "bsr-gather": ("bsr", "gather"),
    "nm": ("nm", "mkl"),
}


@dataclass
class Config:
    """One pruned weight at one batch size and the modules being compared on it."""

    shape: tuple[int, int]  # (out, in)
    kind: str  # "50%", ..., "90% block", "2:4"
    batch: int
    modules: dict[str, nn.Module] = field(default_factory=dict)
    auto_choice: str = ""
    times: dict[str, list[float]] = field(default_factory=dict)

    def ms(self, name: str) -> float:
        return median(self.times[name]) * 1e3


def prune_kind(layer: nn.Sequential, kind: str) -> None:
    if kind == "2:4":
        pk.prune(layer, granularity="2:4")
    elif kind.endswith("block"):
        pk.prune(layer, float(kind.split("%")[0]) / 100, granularity="block:32x32")
    else:
        pk.prune(layer, float(kind.rstrip("%")) / 100)
    pk.bake(layer)


def converted(model: nn.Module, fmt: str, **kwargs: object) -> tuple[nn.Module | None, str]:
    """A converted copy of ``model`` and its first layer's column name (None if it does not
    fit): the format, ``bsr-gather`` for BSR with the gather kernel."""
    model = copy.deepcopy(model)
    try:
        report = sparse.convert(model, fmt, **kwargs)
    except PruningError:
        return None, ""
    gather = getattr(model[0], "kernel", "") == "gather"
    return model, "bsr-gather" if gather else report.layers[0].format


def bandwidth() -> float:
    """Read bandwidth in bytes/s: the faster of summing a 256 MB buffer and a dense mat-vec
    over a 256 MB matrix (medians of 7)."""
    matrix, x = torch.rand(4096, 16384), torch.rand(16384)
    flat = matrix.view(-1)
    seconds = min(median(timed(fn, 7)) for fn in (flat.sum, lambda: matrix @ x))
    return matrix.numel() * 4 / seconds


def module_bytes(module: nn.Module) -> int:
    return sparse.formats.module_bytes(module[0])


def run_grid(args: argparse.Namespace, console: Console) -> list[Config]:
    cost = sparse.MeasuredCost()  # shared: cached per shape / sparsity / batch / format
    configs = []
    for shape in args.shapes:
        for kind in args.kinds:
            torch.manual_seed(0)
            dense = nn.Sequential(nn.Linear(shape[1], shape[0], bias=False))
            prune_kind(dense, kind)
            fixed = {"dense": dense}
            for column, (fmt, kernel) in FORMATS.items():
                blocksize = 32 if "block" in kind else None
                module, _ = converted(dense, fmt, blocksize=blocksize, bsr_kernel=kernel)
                if module is not None:
                    fixed[column] = module
            for batch in args.batches:
                auto, choice = converted(dense, "auto", batch_size=batch, cost=cost)
                config = Config(shape, kind, batch, {**fixed, "auto": auto}, choice)
                x = torch.randn(batch, shape[1])
                with torch.inference_mode():
                    for module in config.modules.values():
                        module(x)  # warm-up
                    for _ in range(args.repeats):  # interleaved
                        for name, module in config.modules.items():
                            config.times.setdefault(name, []).extend(
                                timed(lambda m=module, x=x: m(x), 3)
                            )
                configs.append(config)
                console.log(f"{shape} {kind} b={batch}: dense {config.ms('dense'):.3f} ms")
    return configs


def grid_markdown(configs: list[Config], read_bw: float) -> list[str]:
    lines = [
        "| weight (out x in) | pruned | batch | dense ms | csr ms | bsr (mkl) ms | bsr (gather) "
        "ms | nm ms | auto ms (choice) | best speed-up | batch-1 floor ms: dense / best |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for c in configs:
        dense = c.ms("dense")
        cells = [
            f"{c.ms(f):.3f} ({dense / c.ms(f):.2f}x)" if f in c.times else "-" for f in FORMATS
        ]
        best = min((f for f in FORMATS if f in c.times), key=c.ms, default=None)
        floor = ""
        if c.batch == 1:
            dense_floor = module_bytes(c.modules["dense"]) / read_bw * 1e3
            best_floor = module_bytes(c.modules[best]) / read_bw * 1e3 if best else dense_floor
            floor = f"{dense_floor:.3f} / {best_floor:.3f}"
        lines.append(
            f"| {c.shape[0]}x{c.shape[1]} | {c.kind} | {c.batch} | {dense:.3f} | "
            + " | ".join(cells)
            + f" | {c.ms('auto'):.3f} ({c.auto_choice}) | "
            + (f"{dense / c.ms(best):.2f}x {best}" if best else "-")
            + f" | {floor} |"
        )
    return lines


def grid_rows(rows: Rows, configs: list[Config], read_bw: float) -> None:
    def best_speedup(kind: str, columns: tuple[str, ...]) -> list[tuple[str, str, float]]:
        out = []
        for c in configs:
            present = [f for f in columns if f in c.times]
            if c.kind == kind and c.batch == 1 and present:
                best = min(present, key=c.ms)
                out.append((f"{c.shape[0]}x{c.shape[1]}", best, c.ms("dense") / c.ms(best)))
        return out

    for kind, columns, target in (
        ("90%", ("csr",), 3.0),
        ("90% block", ("bsr", "bsr-gather"), 5.0),
    ):
        for shape, best, speedup in best_speedup(kind, columns):
            rows.add(
                f"{kind}, batch 1, {shape}: {best} speed-up over dense",
                f"{speedup:.2f}x",
                f">= {target:g}x",
                speedup >= target,
            )

    def chosen(c: Config) -> float:  # the grid column of the format auto chose
        return c.ms(c.auto_choice) / c.ms("dense")

    def where(c: Config) -> str:
        return f"{c.shape[0]}x{c.shape[1]} {c.kind} b={c.batch}, chose {c.auto_choice}"

    worst = max(configs, key=chosen)
    rows.add(
        f'"auto": time of the chosen format / dense, worst of {len(configs)} configurations',
        f"{chosen(worst):.3f}x ({where(worst)})",
        "<= 1.05x",
        chosen(worst) <= 1.05,
    )
    noisy = max(configs, key=lambda c: c.ms("auto") / c.ms("dense"))
    rows.add(
        '"auto" module (a separate copy, timed in its own slot) / dense, worst',
        f"{noisy.ms('auto') / noisy.ms('dense'):.3f}x ({where(noisy)}): timing noise included",
    )
    for c in configs:
        if c.batch == 1 and c.kind == "90%" and "csr" in c.modules:
            nbytes = module_bytes(c.modules["csr"])
            eff = nbytes / (c.ms("csr") / 1e3) / read_bw
            rows.add(
                f"csr batch 1 {c.shape[0]}x{c.shape[1]} 90%: bytes moved / time vs read bandwidth",
                f"{eff:.0%} of {read_bw / 1e9:.1f} GB/s",
            )


def bytes_rows(rows: Rows, configs: list[Config]) -> None:
    """Stored bytes / dense: CSR at 90%, BSR at 90% block, N:M-compressed at 2:4."""
    wanted = {"90%": "csr", "90% block": "bsr", "2:4": "nm"}
    for c in configs:
        fmt = wanted.get(c.kind)
        if c.batch != 1 or fmt not in c.modules:
            continue
        dense = module_bytes(c.modules["dense"])
        ratio = module_bytes(c.modules[fmt]) / dense
        shape = f"{c.shape[0]}x{c.shape[1]}"
        if fmt != "nm":
            rows.add(
                f"{c.kind} {fmt} bytes / dense, {shape}", f"{ratio:.4f}x", "<= 0.2x", ratio <= 0.2
            )
            continue
        values = c.modules["nm"][0].values.numel() * 4 / dense
        meta = c.modules["nm"][0].metadata.numel() / dense
        rows.add(
            f"2:4 compressed bytes / dense, {shape}",
            f"{ratio:.4f}x = {values:.4f}x values + {meta:.4f}x metadata",
            "= 0.5x + metadata",
            values == 0.5 and abs(ratio - values - meta) < 1e-12,
        )


def ffn_stack(width: int, blocks: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)]
    return nn.Sequential(*layers)


def whole_model(rows: Rows, args: argparse.Namespace, console: Console) -> None:
    width = 256 if args.quick else 768
    for granularity in ("element", "block:32x32"):
        torch.manual_seed(0)
        model = ffn_stack(width, 4)
        pk.prune(model, 0.9, granularity=granularity)
        pk.bake(model)
        for batch in (1, 64):
            auto = copy.deepcopy(model)
            report = sparse.convert(auto, "auto", batch_size=batch)
            x = torch.randn(batch, width)
            times: dict[str, list[float]] = {"dense": [], "auto": []}
            with torch.inference_mode():
                model(x), auto(x)
                for _ in range(args.repeats):
                    times["dense"] += timed(lambda m=model, x=x: m(x), 3)
                    times["auto"] += timed(lambda m=auto, x=x: m(x), 3)
            dense_ms, auto_ms = median(times["dense"]) * 1e3, median(times["auto"]) * 1e3
            chosen = sorted(set(report.formats.values()))
            rows.add(
                f"FFN stack 4 x ({width}->{4 * width}->{width}), 90% {granularity}, batch {batch}: "
                f"auto ({'/'.join(chosen)}) vs dense",
                f"{auto_ms:.2f} ms vs {dense_ms:.2f} ms ({dense_ms / auto_ms:.2f}x), bytes "
                f"{report.bytes / report.dense_bytes:.3f}x",
            )
            console.log(f"FFN {granularity} b={batch}: {dense_ms:.2f} -> {auto_ms:.2f} ms")


def lenet(rows: Rows, args: argparse.Namespace, console: Console) -> None:
    data = zoo.load_dataset("mnist5k", flat=True)
    torch.manual_seed(0)
    base = zoo.LeNet300100()
    epochs = 1 if args.quick else 5
    zoo.train(base, data, epochs=epochs, progress=False)
    dense_acc = zoo.evaluate(base, data.x_test, data.y_test)
    rows.add(f"LeNet-300-100 mnist5k dense accuracy ({epochs} epochs)", f"{dense_acc:.2%}")
    block_vs_element(rows, args, base, data, epochs, console)
    nm_permutation(rows, base, data)


def nm_permutation(rows: Rows, base: nn.Module, data: zoo.Dataset) -> None:
    """2:4 on the trained LeNet's fc2 and fc3, without and with channel permutations."""
    accuracy = {}
    for permute in (False, True):
        model = copy.deepcopy(base)
        if permute:
            pairs = [("fc1", "fc2"), ("fc2", "fc3")]
            report = sparse.permute_channels(model, "2:4", pairs, example_inputs=data.x_test[:64])
        pk.prune(model, granularity="2:4", layers=["fc2", "fc3"])
        accuracy[permute] = zoo.evaluate(model, data.x_test, data.y_test)
    kept = "; ".join(
        f"{r.pair.consumer} {r.before:.4f} -> {r.after:.4f} ({r.gain:+.2%})" for r in report.results
    )
    rows.add("LeNet-300-100 2:4 retained |W| fraction, channel permutation", kept)
    rows.add(
        "LeNet-300-100 2:4 (fc2, fc3) accuracy, no fine-tune: plain / permuted",
        f"{accuracy[False]:.2%} / {accuracy[True]:.2%} "
        f"(outputs changed by {report.max_abs_diff:.1e} before pruning)",
    )


def block_vs_element(
    rows: Rows,
    args: argparse.Namespace,
    base: nn.Module,
    data: zoo.Dataset,
    epochs: int,
    console: Console,
) -> None:
    """90% element-wise (CSR) vs 4x4 blocks (BSR) on fc1, fc2: accuracy and latency."""
    for granularity, fmt in (("element", "csr"), ("block:4x4", "bsr")):
        model = copy.deepcopy(base)
        pk.prune(model, 0.9, granularity=granularity, layers=["fc1", "fc2"])
        zoo.train(model, data, epochs=max(1, epochs // 2), progress=False)  # masks stay
        acc = zoo.evaluate(model, data.x_test, data.y_test)
        pk.bake(model)
        sparse.convert(model, fmt, layers=["fc1", "fc2"], blocksize=4 if fmt == "bsr" else None)
        dense = copy.deepcopy(base)
        cells = []
        for batch in (1, 64):
            x = data.x_test[:batch]
            times: dict[str, list[float]] = {"dense": [], fmt: []}
            with torch.inference_mode():
                dense(x), model(x)
                for _ in range(args.repeats):
                    times["dense"] += timed(lambda m=dense, x=x: m(x), 5)
                    times[fmt] += timed(lambda m=model, x=x: m(x), 5)
            ratio = median(times["dense"]) / median(times[fmt])
            cells.append(f"b={batch} {median(times[fmt]) * 1e6:.0f} us ({ratio:.2f}x dense)")
        rows.add(
            f"LeNet-300-100 90% {granularity} (fc1, fc2) + fine-tune, as {fmt}",
            f"accuracy {acc:.2%}; " + "; ".join(cells),
        )
        console.log(f"LeNet {granularity}: {acc:.2%}")


def cuda_semi_structured(rows: Rows, args: argparse.Namespace, console: Console) -> None:
    """fp16 dense ``F.linear`` vs :class:`~prunekit.sparse.SemiStructuredLinear` (2:4)."""
    name = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    for (out, inp), batches in args.cuda_configs:
        torch.manual_seed(0)
        layer = nn.Sequential(nn.Linear(inp, out, bias=False)).cuda().half()
        pk.prune(layer, granularity="2:4")
        pk.bake(layer)
        fast = copy.deepcopy(layer)
        sparse.convert(fast, "nm-cuda")
        for batch in batches:
            x = torch.randn(batch, inp, device="cuda", dtype=torch.half)
            err = float((fast(x) - layer(x)).abs().max())
            med = {}
            for key, module in (("dense", layer), ("2:4", fast)):
                timer = benchmark.Timer("m(x)", globals={"m": module, "x": x})
                med[key] = timer.blocked_autorange(min_run_time=0.2).median
            rows.add(
                f"CUDA 2:4 semi-structured fp16 {out}x{inp}, batch {batch} ({name})",
                f"{med['2:4'] * 1e6:.1f} us vs dense {med['dense'] * 1e6:.1f} us "
                f"({med['dense'] / med['2:4']:.2f}x), max |diff| {err:.1e}",
            )
            console.log(f"cuda {out}x{inp} b={batch}: {med['dense'] / med['2:4']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one 1024x1024 shape: smoke run")
    parser.add_argument("--write", action="store_true", help=f"update {MD_FILE.name}")
    parser.add_argument("--cuda-only", action="store_true", help="only the CUDA 2:4 figures")
    parser.add_argument("--cuda-json", type=Path, help="rows of a --cuda-only run: read/write")
    parser.add_argument("--note", default="", help="added to the protocol line (machine...)")
    args = parser.parse_args()
    args.shapes = [(4096, 4096), (3072, 768), (768, 3072)]
    big = [((16384, 16384), [16384])]  # cuSPARSELt pays ~0.5 ms per call: only big GEMMs win
    args.cuda_configs = [(shape, [1, 64, 2048]) for shape in args.shapes] + big
    args.kinds = ["50%", "80%", "90%", "95%", "98%", "90% block", "2:4"]
    args.batches = [1, 8, 64]
    if args.quick:
        args.shapes, args.kinds, args.batches, args.repeats = (
            [(1024, 1024)],
            ["90%", "90% block", "2:4"],
            [1, 8],
            2,
        )
    console = Console(width=150)
    rows = Rows()
    if args.cuda_only:
        cuda_semi_structured(rows, args, console)
        rows.show("bench_sparse --cuda-only", console)
        if args.cuda_json:
            args.cuda_json.write_text(json.dumps(rows.rows))
        return
    read_bw = bandwidth()
    configs = run_grid(args, console)
    grid_rows(rows, configs, read_bw)
    bytes_rows(rows, configs)
    whole_model(rows, args, console)
    lenet(rows, args, console)
    rows.add("read bandwidth (sum or dense mat-vec over 256 MB)", f"{read_bw / 1e9:.1f} GB/s")
    if torch.cuda.is_available():
        cuda_semi_structured(rows, args, console)
    elif args.cuda_json:  # measured elsewhere by --cuda-only; the file says where
        for row in json.loads(args.cuda_json.read_text()):
            rows.add(*row[:2], *(row[2:3] or [""]))
    else:
        rows.add("CUDA 2:4 semi-structured speed-up", "no CUDA GPU here: not measured")
    grid = grid_markdown(configs, read_bw)
    console.print("\n".join(grid))
    rows.show("bench_sparse", console)
    if args.write:
        extra = f"medians of {args.repeats} interleaved rounds x 3 calls{args.note}"
        write_section(
            "bench_sparse",
            [
                "",
                *INTRO,
                "",
                rows.protocol("bench_sparse.py", extra),
                "",
                *grid,
                "",
                *rows.markdown(),
            ],
        )
        console.print(f"wrote {MD_FILE}")


if __name__ == "__main__":
    main()
