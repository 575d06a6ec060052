"""``prunekit llm``: prune, evaluate and build language models from the command line.

App layer: drives the :mod:`prunekit.llm` engine on models loaded by
:mod:`prunekit.llm_models`.

    prunekit llm build-lm [--steps 600] [--out DIR]          # train + cache the zoo LM
    prunekit llm prune --model char-llama --method wanda --sparsity 0.5 --out pruned/
    prunekit llm prune --model minilm --method sparsegpt --sparsity 2:4 --out pruned-minilm/
    prunekit llm eval --model pruned/                        # perplexity / embedding cosine
    prunekit llm distill --student pruned/ --teacher char-llama --steps 300 --out kd/

``--model`` is a zoo name (``char-llama``, ``minilm``) or a ``save_pretrained`` directory.
``prune`` writes a ``save_pretrained`` directory (masks baked in, tokenizer alongside) that
``from_pretrained`` loads, plus ``prunekit_llm.json`` with the settings and the report.
:func:`add_parser` adds the sub-command to ``prunekit``'s parser; :func:`run` dispatches.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

import prunekit as pk
from prunekit import cli_distill
from prunekit import llm_models as models
from prunekit.llm.evaluate import embedding_similarity, perplexity
from prunekit.llm.methods import methods
from prunekit.llm.oneshot import ALLOCATIONS, prune
from prunekit.zoo import lm


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``llm`` command (with ``prune``, ``eval``, ``build-lm``) to ``subparsers``."""
    parser = subparsers.add_parser("llm", help="one-shot LLM pruning: Wanda, SparseGPT, OWL")
    commands = parser.add_subparsers(dest="llm_command", required=True)
    zoo_help = f"a save_pretrained directory or a zoo name: {', '.join(models.ZOO)}"

    p = commands.add_parser("prune", help="prune a model on calibration text and save it")
    p.add_argument("--model", required=True, help=zoo_help)
    p.add_argument("--method", default="wanda", choices=methods())
    p.add_argument("--sparsity", default="0.5", help="a fraction (0.5) or N:M (2:4, 4:8)")
    p.add_argument("--allocation", default="uniform", choices=ALLOCATIONS)
    p.add_argument("--samples", type=int, default=128, help="calibration samples")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sample")
    p.add_argument("--seed", type=int, default=0, help="seeds the calibration windows")
    p.add_argument("--out", type=Path, required=True, help="save_pretrained directory")

    e = commands.add_parser("eval", help="perplexity (causal LM) or embedding cosine (encoder)")
    e.add_argument("--model", required=True, help=zoo_help)
    e.add_argument("--seq-len", type=int, default=256, help="perplexity window length")
    e.add_argument("--reference", default="minilm", help="encoders: the dense model to compare")

    b = commands.add_parser("build-lm", help="train the char-level zoo Llama and cache it")
    b.add_argument("--steps", type=int, default=600)
    b.add_argument("--out", type=Path, default=None, help=f"default: {lm.cache_dir()}")
    cli_distill.add_parser(commands, zoo_help)
    return parser


def _sparsity(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _prune(args: argparse.Namespace, console: Console) -> None:
    loaded = models.load(args.model)
    seq_len = args.seq_len
    max_positions = getattr(loaded.model.config, "max_position_embeddings", seq_len)
    seq_len = min(seq_len, max_positions)
    calibration = lm.calibration_ids(loaded.encode, args.samples, seq_len, args.seed)
    protocol = models.calibration_protocol(args.samples, seq_len, args.seed)
    report = prune(
        loaded.model,
        calibration,
        method=args.method,
        sparsity=_sparsity(args.sparsity),
        allocation=args.allocation,
    )
    console.print(report)
    console.print(protocol)
    pk.bake(loaded.model)
    args.out.mkdir(parents=True, exist_ok=True)
    loaded.save(args.out)
    record = {
        "model": args.model,
        "method": report.method,
        "sparsity": report.target,
        "allocation": report.allocation,
        "achieved": report.sparsity,
        "seconds": report.seconds,
        "peak_bytes": report.peak_bytes,
        "protocol": protocol,
    }
    (args.out / "prunekit_llm.json").write_text(json.dumps(record, indent=1))
    console.print(f"saved the pruned model (masks baked) to {args.out}")


def _eval(args: argparse.Namespace, console: Console) -> None:
    loaded = models.load(str(args.model))
    if loaded.causal:
        ids = lm.held_out_ids(loaded.encode)
        ppl = perplexity(loaded.model, ids, seq_len=args.seq_len)
        console.print(f"perplexity {ppl:.3f} ({models.ppl_protocol(loaded.encode, args.seq_len)})")
        return
    reference = models.load(args.reference)
    sentences = models.eval_sentences()
    cosine = embedding_similarity(
        loaded.model, reference.model, models.sentence_batch(loaded.tokenizer, sentences)
    )
    console.print(
        f"embedding cosine to {args.reference}: mean {float(cosine.mean()):.4f}, "
        f"min {float(cosine.min()):.4f} ({len(sentences)} held-out pydoc_data sentences, "
        "mean pooling)"
    )


def _build_lm(args: argparse.Namespace, console: Console) -> None:
    path = lm.build_lm(args.out, steps=args.steps)
    console.print(f"trained and saved the zoo LM to {path}")


HANDLERS = {"prune": _prune, "eval": _eval, "build-lm": _build_lm, "distill": cli_distill.run}


def run(args: argparse.Namespace, console: Console) -> None:
    """Run the ``llm`` sub-command parsed by :func:`add_parser`."""
    HANDLERS[args.llm_command](args, console)
