"""ALPS against SparseGPT and Wanda: perplexity gap to dense on the zoo LM, MiniLM cosine.

1. The cached zoo char-level Llama (``prunekit llm build-lm``): held-out perplexity after
   Wanda, SparseGPT and ALPS at 70% unstructured and 2:4, for each calibration seed (every
   method on the same windows per seed); the gap to dense (pruned minus dense) averaged
   over the seeds, and how much of SparseGPT's gap ALPS removes (target: >= 20%).
2. The pretrained all-MiniLM-L6-v2: mean cosine of mean-pooled sentence embeddings to the
   dense model (higher is better), same methods, settings and seeds.
3. Beside each: wall time and peak memory of ``pk.llm.prune`` (its report's figures).

``--write`` rewrites the ``bench_llm_alps`` section of BENCHMARKS.md with the zoo LM part
and ``bench_llm_alps_minilm`` with the MiniLM part (only the parts that ran).
``--save FILE`` writes every finished prune to a JSON file as it goes.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_llm_alps.py [--quick] [--write]
"""

from __future__ import annotations

import argparse
import copy
import json
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
NAMES = {"wanda": "Wanda", "sparsegpt": "SparseGPT", "alps": "ALPS"}
Run = tuple[float, float, int]  # (value, seconds, peak bytes)
Runs = dict[tuple[str, str], list[Run]]  # (method, setting) -> one run per seed


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
                if args.save:
                    saved = {f"{m} {s}": r for (m, s), r in runs.items()}
                    Path(args.save).write_text(json.dumps(saved, indent=1))
    return runs


def cell(runs: list[Run], digits: int) -> str:
    """``mean (seed 0, seed 1, ...)`` of the values."""
    each = ", ".join(f"{r[0]:.{digits}f}" for r in runs)
    return f"{mean(r[0] for r in runs):.{digits}f} ({each})"


def quality_table(runs: Runs, args: argparse.Namespace, digits: int, unit: str) -> list[str]:
    """One row per setting: every method's ``unit``, mean (per seed)."""
    methods = [m for m in NAMES if (m, label(args.settings[0], "uniform")) in runs]
    lines = [
        f"| setting | {' | '.join(f'{NAMES[m]} {unit} (per seed)' for m in methods)} |",
        "|---|" + "---:|" * len(methods),
    ]
    for sparsity in args.settings:
        setting = label(sparsity, "uniform")
        cells = [cell(runs[m, setting], digits) for m in methods]
        lines.append(f"| {setting} | {' | '.join(cells)} |")
    return lines


def cost_table(runs: Runs, args: argparse.Namespace) -> list[str]:
    """One row per setting and method: mean (per seed) seconds, largest peak."""
    lines = ["| setting | method | seconds, mean (per seed) | peak beyond the model |"]
    lines.append("|---|---|---:|---:|")
    for sparsity in args.settings:
        setting = label(sparsity, "uniform")
        for method in [m for m in NAMES if (m, setting) in runs]:
            r = runs[method, setting]
            each = ", ".join(f"{x[1]:.1f}" for x in r)
            peak = max(x[2] for x in r) / 2**20
            lines.append(
                f"| {setting} | {NAMES[method]} | {mean(x[1] for x in r):.1f} ({each}) "
                f"| {peak:.0f} MiB |"
            )
    return lines


def removed(gap_sparsegpt: float, gap_alps: float) -> float:
    """Share of SparseGPT's gap to dense that ALPS removes (NaN when there is no gap)."""
    return 1 - gap_alps / gap_sparsegpt if gap_sparsegpt > 0 else math.nan


def gap_table(runs: Runs, dense: float, args: argparse.Namespace) -> tuple[list[str], Rows]:
    """Gaps to dense per seed and of the means, and the share ALPS removes; the verdicts."""
    rows = Rows()
    lines = [
        "| setting | gap SparseGPT (mean; per seed) | gap ALPS (mean; per seed) "
        "| gap removed by ALPS (of the means; per seed) |",
        "|---|---:|---:|---:|",
    ]
    for sparsity in args.settings:
        setting = label(sparsity, "uniform")
        s, a = ([r[0] - dense for r in runs[m, setting]] for m in ("sparsegpt", "alps"))
        total = removed(mean(s), mean(a))
        each = [", ".join(f"{g:.4f}" for g in x) for x in (s, a)]
        seeds = ", ".join(f"{removed(x, y):.0%}" for x, y in zip(s, a, strict=True))
        lines.append(
            f"| {setting} | {mean(s):.4f} ({each[0]}) | {mean(a):.4f} ({each[1]}) "
            f"| **{total:.0%}** ({seeds}) |"
        )
        rows.add(
            f"zoo LM {setting}: SparseGPT's gap to dense removed by ALPS",
            f"{total:.1%}",
            f">= {TARGET:.0%}",
            total >= TARGET,
        )
    return lines, rows


def ppl_section(args: argparse.Namespace, methods: dict[str, object], console: Console):
    """The zoo LM tables (markdown lines) and the gap-reduction rows."""
    loaded = models.load("char-llama")
    held_out = lm.held_out_ids(loaded.encode)
    if args.quick:
        held_out = held_out[: 20 * args.seq_len]

    def ppl(model: nn.Module) -> float:
        return llm.perplexity(model, held_out, seq_len=args.seq_len)

    dense = ppl(loaded.model)
    console.log(f"dense perplexity {dense:.4f}")
    runs = measure(
        loaded.model,
        lambda seed: lm.calibration_ids(loaded.encode, args.samples, args.seq_len, seed),
        ppl,
        methods,
        args,
        console,
    )
    gaps, rows = gap_table(runs, dense, args)
    protocol = (
        f"Zoo LM ({lm.LM_NAME}), dense perplexity {dense:.4f} on the "
        f"{models.ppl_protocol(loaded.encode, args.seq_len)}"
        + (f" (first {len(held_out):,} tokens only: --quick)" if args.quick else "")
        + f"; {models.calibration_protocol(args.samples, args.seq_len, args.seeds[0])}"
        + f" (seeds {', '.join(map(str, args.seeds))}: mean; every method on the same windows"
        " per seed). Perplexity (lower is better); gap = pruned minus dense."
    )
    tables = [quality_table(runs, args, 4, "ppl"), gaps, cost_table(runs, args)]
    return [protocol, "", *tables[0], "", *tables[1], "", *tables[2]], rows


def minilm_section(args: argparse.Namespace, methods: dict[str, object], console: Console):
    """The MiniLM tables (markdown lines) and the ALPS > SparseGPT rows."""
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
    rows = Rows()
    for sparsity in args.settings:
        setting = label(sparsity, "uniform")
        ma, ms = (mean(r[0] for r in runs[m, setting]) for m in ("alps", "sparsegpt"))
        rows.add(
            f"MiniLM {setting}: cosine ALPS / SparseGPT", f"{ma:.4f} / {ms:.4f}",
            "ALPS higher", ma > ms,
        )  # fmt: skip
    protocol = (
        "all-MiniLM-L6-v2 (pretrained): mean cosine of mean-pooled sentence embeddings to the "
        "dense model on 64 held-out pydoc_data sentences; "
        f"{models.calibration_protocol(args.samples, 128, args.seeds[0])} (seeds "
        f"{', '.join(map(str, args.seeds))}: mean). Higher is better."
    )
    tables = [quality_table(runs, args, 4, "cosine"), cost_table(runs, args)]
    return [protocol, "", *tables[0], "", *tables[1]], rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=["0.7", "2:4"])
    parser.add_argument("--methods", nargs="+", default=list(NAMES), choices=list(NAMES))
    parser.add_argument("--quick", action="store_true", help="1 seed, 16 samples, 20 windows")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-lm", action="store_true")
    parser.add_argument("--save", help="JSON file of the finished runs, written as they end")
    parser.add_argument("--write", action="store_true", help=f"update {MD_FILE.name}")
    for name, default in vars(ALPS()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args()
    args.settings = [s if ":" in s else float(s) for s in args.settings]
    if not {"sparsegpt", "alps"} <= set(args.methods):
        parser.error("--methods must include sparsegpt and alps (the comparison)")
    if args.quick:
        args.seeds, args.samples = args.seeds[:1], 16
    return args


def write(name: str, title: str, rows: Rows, lines: list[str], extra: str) -> None:
    """Rewrite the ``name`` section of BENCHMARKS.md."""
    protocol = rows.protocol("bench_llm_alps.py", extra)
    write_section(name, ["", f"## {title}", "", protocol, "", *rows.markdown(), "", *lines])


def main() -> None:
    args = parse_args()
    settings = ALPS(**{k: getattr(args, k) for k in vars(ALPS())})
    methods = {m: settings if m == "alps" else m for m in args.methods}
    console = Console(width=130)
    parts = [
        ("bench_llm_alps", "bench_llm_alps: ALPS against SparseGPT and Wanda, zoo LM",
         ppl_section, args.skip_lm),
        ("bench_llm_alps_minilm", "bench_llm_alps: ALPS against SparseGPT and Wanda, MiniLM",
         minilm_section, args.skip_minilm),
    ]  # fmt: skip
    for name, title, section, skip in parts:
        if skip:
            continue
        start, load = time.perf_counter(), Rows()
        lines, rows = section(args, methods, console)
        rows.load_start = load.load_start
        rows.show(f"{title} ({settings!r})", console)
        for line in lines:
            console.print(line)
        if args.write:
            extra = f"ALPS settings `{settings!r}`; this part {time.perf_counter() - start:.0f} s"
            write(name, title, rows, lines, extra)
            console.print(f"wrote the {name} section of {MD_FILE}")


if __name__ == "__main__":
    main()
