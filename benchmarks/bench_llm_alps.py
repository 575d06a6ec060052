"""ALPS against SparseGPT: perplexity gap to dense on the zoo LM, MiniLM embedding cosine.

1. The cached zoo char-level Llama (``prunekit llm build-lm``): held-out perplexity after
   SparseGPT and after ALPS at 70% unstructured and 2:4, for each calibration seed (both
   methods on the same windows per seed); the gap to dense (pruned minus dense) averaged
   over the seeds, and how much of SparseGPT's gap ALPS removes (target: >= 20%).
2. The pretrained all-MiniLM-L6-v2: mean cosine of mean-pooled sentence embeddings to the
   dense model (higher is better), same settings and seeds.
3. Beside each: wall time and peak memory of ``pk.llm.prune`` (its report's figures).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_llm_alps.py [--quick] [--write]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from statistics import mean

from rich.console import Console
from torch import nn

from prunekit import llm
from prunekit import llm_models as models
from prunekit.llm.alps import ALPS
from prunekit.zoo import lm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MD_FILE, Rows, write_section
from bench_llm import label

TARGET = 0.20  # share of SparseGPT's perplexity gap to dense that ALPS must remove
Runs = dict[tuple[str, str], list[tuple[float, float, int]]]  # -> [(value, seconds, peak)]


def measure(
    dense: nn.Module,
    calibration_for: Callable[[int], object],
    score: Callable[[nn.Module], float],
    methods: dict[str, object],
    args: argparse.Namespace,
    console: Console,
) -> Runs:
    """Prune a copy of ``dense`` with every method, setting and seed; ``score`` each."""
    runs: Runs = {}
    for seed in args.seeds:
        calibration = calibration_for(seed)
        for sparsity in args.settings:
            for name, method in methods.items():
                model = copy.deepcopy(dense)
                report = llm.prune(
                    model, calibration, method=method, sparsity=sparsity, progress=False
                )
                value = score(model)
                key = (name, label(sparsity, "uniform"))
                runs.setdefault(key, []).append((value, report.seconds, report.peak_bytes or 0))
                console.log(
                    f"seed {seed} {key[1]} {name}: {value:.4f}, {report.seconds:.1f} s, peak "
                    f"{(report.peak_bytes or 0) / 2**20:.0f} MiB, load {os.getloadavg()[0]:.1f}"
                )
    return runs


def pair(runs: Runs, sparsity: float | str) -> tuple[list, list]:
    """SparseGPT's and ALPS's runs at ``sparsity``."""
    return runs["sparsegpt", label(sparsity, "uniform")], runs["alps", label(sparsity, "uniform")]


def cost(runs: list[tuple[float, float, int]]) -> str:
    return f"{mean(r[1] for r in runs):.1f} s, {max(r[2] for r in runs) / 2**20:.0f} MiB"


def ppl_section(args: argparse.Namespace, methods: dict[str, object], console: Console):
    """The zoo LM table (markdown lines) and the gap-reduction rows."""
    loaded = models.load("char-llama")
    held_out = lm.held_out_ids(loaded.encode)
    if args.quick:
        held_out = held_out[: 20 * args.seq_len]

    def ppl(model: nn.Module) -> float:
        return llm.perplexity(model, held_out, seq_len=args.seq_len)

    dense = ppl(loaded.model)
    runs = measure(
        loaded.model,
        lambda seed: lm.calibration_ids(loaded.encode, args.samples, args.seq_len, seed),
        ppl,
        methods,
        args,
        console,
    )
    rows, lines = (
        Rows(),
        [
            "| setting | SparseGPT ppl (per seed) | ALPS ppl (per seed) | gap SparseGPT / ALPS "
            "| gap removed | time, peak SparseGPT | time, peak ALPS |",
            "|---|---|---|---:|---:|---:|---:|",
        ],
    )
    for sparsity in args.settings:
        s, a = pair(runs, sparsity)
        gap_s, gap_a = mean(r[0] for r in s) - dense, mean(r[0] for r in a) - dense
        removed = 1 - gap_a / gap_s if gap_s > 0 else math.nan  # no gap: nothing to remove
        each = [", ".join(f"{r[0]:.3f}" for r in x) for x in (s, a)]
        lines.append(
            f"| {label(sparsity, 'uniform')} | {mean(r[0] for r in s):.3f} ({each[0]}) | "
            f"{mean(r[0] for r in a):.3f} ({each[1]}) | {gap_s:.4f} / {gap_a:.4f} | "
            f"{removed:.0%} | {cost(s)} | {cost(a)} |"
        )
        rows.add(
            f"zoo LM {label(sparsity, 'uniform')}: SparseGPT's gap to dense removed by ALPS",
            f"{removed:.1%}",
            f">= {TARGET:.0%}",
            removed >= TARGET,
        )
    protocol = (
        f"Zoo LM ({lm.LM_NAME}), dense perplexity {dense:.3f} on the "
        f"{models.ppl_protocol(loaded.encode, args.seq_len)}"
        + (f" (first {len(held_out):,} tokens only: --quick)" if args.quick else "")
        + f"; {models.calibration_protocol(args.samples, args.seq_len, args.seeds[0])}"
        + f" (seeds {', '.join(map(str, args.seeds))}: mean). Gap = pruned minus dense."
    )
    return [protocol, "", *lines], rows


def minilm_section(args: argparse.Namespace, methods: dict[str, object], console: Console):
    """The MiniLM table (markdown lines) and the ALPS > SparseGPT rows."""
    dense = models.load("minilm")
    batch = models.sentence_batch(dense.tokenizer, models.eval_sentences(64))

    def cosine(model: nn.Module) -> float:
        return float(llm.embedding_similarity(model, dense.model, batch).mean())

    runs = measure(
        dense.model,
        lambda seed: lm.calibration_ids(dense.encode, args.samples, 128, seed),
        cosine,
        methods,
        args,
        console,
    )
    rows, lines = (
        Rows(),
        [
            "| setting | SparseGPT cosine (per seed) | ALPS cosine (per seed) | time, peak "
            "SparseGPT | time, peak ALPS |",
            "|---|---|---|---:|---:|",
        ],
    )
    for sparsity in args.settings:
        s, a = pair(runs, sparsity)
        ms, ma = mean(r[0] for r in s), mean(r[0] for r in a)
        each = [", ".join(f"{r[0]:.4f}" for r in x) for x in (s, a)]
        lines.append(
            f"| {label(sparsity, 'uniform')} | {ms:.4f} ({each[0]}) | {ma:.4f} ({each[1]}) | "
            f"{cost(s)} | {cost(a)} |"
        )
        rows.add(
            f"MiniLM {label(sparsity, 'uniform')}: cosine ALPS / SparseGPT",
            f"{ma:.4f} / {ms:.4f}",
            "ALPS higher",
            ma > ms,
        )
    protocol = (
        "all-MiniLM-L6-v2 (pretrained): mean cosine of mean-pooled sentence embeddings to the "
        "dense model on 64 held-out pydoc_data sentences; "
        f"{models.calibration_protocol(args.samples, 128, args.seeds[0])} (seeds "
        f"{', '.join(map(str, args.seeds))}: mean). Higher is better."
    )
    return [protocol, "", *lines], rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=["0.7", "2:4"])
    parser.add_argument("--quick", action="store_true", help="1 seed, 16 samples, 20 windows")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-lm", action="store_true")
    parser.add_argument("--write", action="store_true", help=f"update {MD_FILE.name}")
    for name, default in vars(ALPS()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args()
    args.settings = [s if ":" in s else float(s) for s in args.settings]
    if args.quick:
        args.seeds, args.samples = args.seeds[:1], 16
    return args


def main() -> None:
    args = parse_args()
    settings = ALPS(**{k: getattr(args, k) for k in vars(ALPS())})
    methods = {"sparsegpt": "sparsegpt", "alps": settings}
    console = Console(width=130)
    start, load = time.perf_counter(), Rows()
    ppl_lines, ppl_rows = ([], Rows()) if args.skip_lm else ppl_section(args, methods, console)
    cos_lines, cos_rows = (
        ([], Rows()) if args.skip_minilm else minilm_section(args, methods, console)
    )
    rows = Rows()
    rows.load_start = load.load_start
    rows.rows = [*ppl_rows.rows, *cos_rows.rows]
    rows.show(f"bench_llm_alps ({settings!r})", console)
    for line in [*ppl_lines, "", *cos_lines]:
        console.print(line)
    if args.write:
        extra = f"ALPS settings `{settings!r}`; whole run {time.perf_counter() - start:.0f} s"
        write_section(
            "bench_llm_alps",
            [
                "",
                "## bench_llm_alps: ALPS against SparseGPT",
                "",
                rows.protocol("bench_llm_alps.py", extra),
                "",
                *rows.markdown(),
                "",
                *ppl_lines,
                "",
                *cos_lines,
            ],
        )
        console.print(f"wrote {MD_FILE}")


if __name__ == "__main__":
    main()
