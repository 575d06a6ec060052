"""One-shot LLM pruning: perplexity, embedding retention, time and memory per method.

1. The cached zoo char-level Llama (``prunekit llm build-lm``): held-out perplexity of
   dense / magnitude / Wanda / SparseGPT at 50%, 2:4, 4:8 and 70% (uniform and OWL).
2. The pretrained all-MiniLM-L6-v2: mean cosine of mean-pooled sentence embeddings to the
   dense model at 50% and 2:4 per method.
3. Wall time and peak memory of each method at 50% on the zoo LM, each in a fresh
   subprocess (peak = VmHWM beyond the RSS of the loaded model), repeated, medians.
4. llmcompressor's SparseGPT side by side when ``--llmc-python`` names an interpreter
   with llmcompressor installed (a separate venv; never a prunekit dependency).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_llm.py [--quick] [--write]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from rich.console import Console

from prunekit import llm
from prunekit import llm_models as models
from prunekit.zoo import lm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MD_FILE, Rows, write_section

METHODS = ["magnitude", "wanda", "sparsegpt"]
LLMC_NOTE = (
    "llmcompressor 0.14.0.1 (separate venv: torch 2.13.0 CPU, transformers 5.17) run by "
    "`--llmc-python`: `oneshot` with `SparseGPTModifier` / `WandaPruningModifier` (sparsity "
    "0.5, unstructured, block 128, dampening 0.01, `ignore=['re:.*lm_head']`) on the same "
    "model and the same calibration windows; its time covers `oneshot` only (not loading), "
    "prunekit's is `llm.prune` run just before it in the same bench process."
)
SETTINGS = [
    (0.5, "uniform"),
    ("2:4", "uniform"),
    ("4:8", "uniform"),
    (0.7, "uniform"),
    (0.7, "owl"),
]


def label(sparsity: float | str, allocation: str) -> str:
    text = sparsity if isinstance(sparsity, str) else f"{sparsity:.0%}"
    return text + (" + OWL" if allocation == "owl" else "")


def worker(method: str, samples: int, seq_len: int) -> None:
    """Time and peak memory of one 50% prune of the zoo LM, in this (fresh) process."""
    loaded = models.load("char-llama")
    calibration = lm.calibration_ids(loaded.encode, samples, seq_len)
    report = llm.prune(loaded.model, calibration, method=method, sparsity=0.5, progress=False)
    print(json.dumps({"seconds": report.seconds, "peak": report.peak_bytes}))


def self_command(python: str, args: argparse.Namespace, *flags: str) -> list[str]:
    """This script run by ``python`` with ``flags`` and the calibration size of ``args``."""
    sizes = ["--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    return [python, str(Path(__file__).resolve()), *flags, *sizes]


def spawn(method: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = self_command(sys.executable, args, "--worker", method)
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def char_processor(tokenizer: lm.CharTokenizer):
    """A transformers tokenizer with the char vocabulary: llmcompressor insists on one, and
    the calibration data arrive already tokenized, so it never tokenizes anything."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(tokenizer.chars)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token=" ")))


def llmc_worker(directory: str, out: str, method: str, samples: int, seq_len: int) -> None:
    """Run llmcompressor's one-shot pruner (this interpreter must have it) on the zoo LM
    in ``directory`` with prunekit's calibration windows; save the result to ``out``."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = lm.CharTokenizer.load(Path(directory))
    calibration = lm.calibration_ids(tokenizer.encode, samples, seq_len)
    dataset = Dataset.from_dict(
        {"input_ids": calibration.tolist(), "attention_mask": torch.ones_like(calibration).tolist()}
    )
    if method == "sparsegpt":
        recipe = SparseGPTModifier(
            sparsity=0.5,
            mask_structure="0:0",
            targets=["Linear"],
            ignore=["re:.*lm_head"],
            block_size=128,
            dampening_frac=0.01,
        )
    else:
        recipe = WandaPruningModifier(
            sparsity=0.5, mask_structure="0:0", targets=["Linear"], ignore=["re:.*lm_head"]
        )
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=samples,
        processor=char_processor(tokenizer),
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - start
    model.save_pretrained(out)
    tokenizer.save(Path(out))
    print(json.dumps({"seconds": seconds}))


Results = dict[tuple[str, str], float]  # (method, setting) -> perplexity


def perplexity_table(args: argparse.Namespace, console: Console) -> tuple[list[str], Results]:
    loaded = models.load("char-llama")
    calibration = lm.calibration_ids(loaded.encode, args.samples, args.seq_len)
    held_out = lm.held_out_ids(loaded.encode)
    if args.quick:
        held_out = held_out[: 20 * args.seq_len]

    def ppl(model) -> float:
        return llm.perplexity(model, held_out, seq_len=args.seq_len)

    dense = ppl(loaded.model)
    settings = SETTINGS[:2] if args.quick else SETTINGS
    results: Results = {}
    lines = ["| setting | " + " | ".join(METHODS) + " |", "|---|" + "---:|" * len(METHODS)]
    lines.append(f"| dense | {dense:.3f} |" + " |" * (len(METHODS) - 1))
    for sparsity, allocation in settings:
        cells = []
        for method in METHODS:
            model = copy.deepcopy(loaded.model)
            report = llm.prune(
                model,
                calibration,
                method=method,
                sparsity=sparsity,
                allocation=allocation,
                progress=False,
            )
            value = ppl(model)
            results[method, label(sparsity, allocation)] = value
            console.log(
                f"{method} {label(sparsity, allocation)}: ppl {value:.3f}, {report.seconds:.1f} s"
            )
            cells.append(f"{value:.3f}")
        lines.append(f"| {label(sparsity, allocation)} | " + " | ".join(cells) + " |")
    protocol = (
        f"Character-level perplexity of the zoo LM ({lm.LM_NAME}, "
        f"{sum(p.numel() for p in loaded.model.parameters()) / 1e6:.1f}M parameters) on the "
        f"{models.ppl_protocol(loaded.encode, args.seq_len)}"
        + (f" (first {len(held_out):,} tokens only: --quick)" if args.quick else "")
        + f"; {models.calibration_protocol(args.samples, args.seq_len, 0)}. "
        "OWL: M = 5, lambda = 0.08. Lower is better."
    )
    return [protocol, "", *lines], results


def llmc_rows(args: argparse.Namespace, results: Results, console: Console) -> Rows:
    """llmcompressor vs prunekit at 50% on the zoo LM: perplexity and wall time (each
    prunekit run timed right before its llmcompressor run, so both see the same load)."""
    rows = Rows()
    loaded = models.load("char-llama")
    held_out = lm.held_out_ids(loaded.encode)
    if args.quick:
        held_out = held_out[: 20 * args.seq_len]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
    for method in ("wanda", "sparsegpt"):
        with tempfile.TemporaryDirectory() as out:
            cmd = self_command(args.llmc_python, args, "--llmc-worker", method, "--llmc-out", out)
            calibration = lm.calibration_ids(loaded.encode, args.samples, args.seq_len)
            ours_now = llm.prune(
                copy.deepcopy(loaded.model),
                calibration,
                method=method,
                sparsity=0.5,
                progress=False,
            )  # timed next to llmcompressor
            console.log(f"llmcompressor {method} 50% (subprocess)")
            done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
            model = models.load(out).model
            value = llm.perplexity(model, held_out, seq_len=args.seq_len)
        ours, our_seconds = results[method, "50%"], ours_now.seconds
        gap = ours / value - 1
        rows.add(
            f"{method} 50%: perplexity prunekit / llmcompressor",
            f"{ours:.3f} / {value:.3f} ({gap:+.1%})",
            "within 2%",
            abs(gap) <= 0.02,
        )
        rows.add(
            f"{method} 50%: wall time prunekit / llmcompressor",
            f"{our_seconds:.2f} s / {seconds:.2f} s ({seconds / our_seconds:.1f}x)",
        )
    return rows


def minilm_table(args: argparse.Namespace, console: Console) -> list[str]:
    dense = models.load("minilm")
    calibration = lm.calibration_ids(dense.encode, args.samples, 128)
    sentences = models.eval_sentences(64)
    batch = models.sentence_batch(dense.tokenizer, sentences)
    lines = ["| setting | " + " | ".join(METHODS) + " |", "|---|" + "---:|" * len(METHODS)]
    for sparsity in (0.5, "2:4"):
        cells = []
        for method in METHODS:
            model = copy.deepcopy(dense.model)
            llm.prune(model, calibration, method=method, sparsity=sparsity, progress=False)
            cosine = llm.embedding_similarity(model, dense.model, batch)
            console.log(f"MiniLM {method} {sparsity}: cosine {float(cosine.mean()):.4f}")
            cells.append(f"{float(cosine.mean()):.4f} (min {float(cosine.min()):.3f})")
        lines.append(f"| {label(sparsity, 'uniform')} | " + " | ".join(cells) + " |")
    protocol = (
        "all-MiniLM-L6-v2 (pretrained, 22.7M parameters; the 36 Linear layers of its 6 "
        "encoder blocks pruned): mean (and min) cosine similarity of mean-pooled sentence "
        f"embeddings to the dense model on {len(sentences)} held-out pydoc_data sentences; "
        f"{models.calibration_protocol(args.samples, 128, 0)}. Higher is better."
    )
    return [protocol, "", *lines]


def cost_rows(args: argparse.Namespace, console: Console) -> Rows:
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    for r in range(args.repeats):
        for method in METHODS:  # interleaved
            console.log(f"cost round {r + 1}/{args.repeats}: {method}")
            runs[method].append(spawn(method, args))
    rows = Rows()
    secs = {m: median(x["seconds"] for x in runs[m]) for m in METHODS}
    for method in METHODS:
        each = ", ".join(f"{x['seconds']:.2f}" for x in runs[method])
        rows.add(f"{method} 50% on {lm.LM_NAME}: wall time", f"{secs[method]:.2f} s ({each})")
        peak = median(x["peak"] for x in runs[method]) / 2**20
        rows.add(f"{method} 50%: peak memory beyond the loaded model", f"{peak:.1f} MiB")
    ratio = secs["sparsegpt"] / secs["wanda"]
    rows.add("SparseGPT time / Wanda time", f"{ratio:.1f}x", "> 1 (Wanda faster)", ratio > 1)
    return rows


def memory(args: argparse.Namespace) -> None:
    """The memory-floor table, prunekit and llmcompressor (``bench_llm_offload``): runs
    ``--repeats`` rounds (appended to ``--rounds``), prints and with ``--write`` writes the
    table of every round in that file."""
    import bench_llm_offload as floor

    peer = args.llmc_python if args.llmc_python and Path(args.llmc_python).exists() else None
    if peer is None:
        print(f"llmcompressor skipped: no interpreter at --llmc-python {args.llmc_python!r} "
              "(python3 -m venv /tmp/llmc-venv && /tmp/llmc-venv/bin/pip install "
              "torch==2.13.0 llmcompressor==0.14.0)")  # fmt: skip
    store = Path(args.rounds or tempfile.mkstemp(suffix=".json")[1])
    rounds = json.loads(store.read_text()) if store.exists() and store.stat().st_size else []
    work = store.with_suffix(".models")
    for _ in range(args.repeats if args.repeats else 0):
        load = f"{os.getloadavg()[0]:.1f}"
        rounds.append({"load": load, "rows": []})
        floor.one_round(work, peer, rounds[-1]["rows"], save=lambda: store.write_text(
            json.dumps(rounds)), methods=tuple(args.methods.split(",")),
            mkl_cache=args.mkl_cache)  # fmt: skip
        rounds[-1]["load"] = f"{load} -> {os.getloadavg()[0]:.1f}"
        store.write_text(json.dumps(rounds))
    if not rounds:
        return print(f"no round in {store}: pass --repeats 1 or more")
    lines = [*floor.table([r["rows"] for r in rounds]), "", *floor.floor_lines()]
    print("\n".join(lines))
    if args.write:
        loads = "; ".join(r["load"] for r in rounds)
        cmd = "PYTHONPATH=src .venv/bin/python benchmarks/bench_llm.py " + " ".join(sys.argv[1:])
        head = (
            f"Measured {time.strftime('%Y-%m-%d')} with `{cmd}`, rounds run the same way under "
            f"`flock /work/notes/bench.lock` (torch {torch.__version__}, {len(rounds)} "
            f"interleaved round(s), median (each round); load average per round {loads})."
        )
        lines = [head, "", floor.PROTOCOL, "", *lines]
        write_section("bench_llm_memory", ["", *lines])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="cost rounds")
    parser.add_argument("--quick", action="store_true", help="2 settings, 20 windows, 1 round")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--write", action="store_true", help=f"update {MD_FILE.name}")
    parser.add_argument("--llmc-python", help="python of a venv with llmcompressor installed")
    parser.add_argument("--memory", action="store_true", help="only the memory-floor table")
    parser.add_argument("--rounds", help="JSON file: --memory appends its round(s) to it")
    parser.add_argument("--methods", default="wanda,sparsegpt", help="--memory: which methods")
    parser.add_argument("--mkl-cache", action="store_true",
                        help="--memory: leave MKL's buffer cache on (MKL_DISABLE_FAST_MM unset)")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--llmc-worker", choices=METHODS[1:], help=argparse.SUPPRESS)
    parser.add_argument("--llmc-out", help=argparse.SUPPRESS)
    return parser


def dispatch(args: argparse.Namespace) -> None:
    """The subprocess workers, or the memory-floor table alone."""
    if args.worker:
        return worker(args.worker, args.samples, args.seq_len)
    if args.llmc_worker:
        return llmc_worker(
            str(lm.cache_dir()), args.llmc_out, args.llmc_worker, args.samples, args.seq_len
        )
    return memory(args)


def main() -> None:
    args = _parser().parse_args()
    if args.worker or args.llmc_worker or args.memory:
        return dispatch(args)
    if args.quick:
        args.repeats, args.samples = 1, 16
    console = Console(width=130)
    start = time.perf_counter()
    rows = cost_rows(args, console)
    ppl_lines, results = perplexity_table(args, console)
    minilm_lines = [] if args.skip_minilm else minilm_table(args, console)
    llmc = llmc_rows(args, results, console) if args.llmc_python else None
    rows.show("bench_llm: time and memory", console)
    if llmc is not None:
        llmc.show("bench_llm: llmcompressor side by side", console)
    for line in [*ppl_lines, "", *minilm_lines]:
        console.print(line)
    if args.write:
        extra = (
            f"medians of {args.repeats} fresh-process round(s); whole run "
            f"{time.perf_counter() - start:.0f} s"
        )
        write_section(
            "bench_llm",
            [
                "",
                rows.protocol("bench_llm.py", extra),
                "",
                "### Perplexity",
                "",
                *ppl_lines,
                "",
                "### MiniLM embedding retention",
                "",
                *minilm_lines,
                "",
                "### Time and peak memory",
                "",
                *rows.markdown(),
                *(
                    ["", "### llmcompressor side by side", "", LLMC_NOTE, "", *llmc.markdown()]
                    if llmc is not None
                    else []
                ),
            ],
        )
        console.print(f"wrote {MD_FILE}")


if __name__ == "__main__":
    main()
