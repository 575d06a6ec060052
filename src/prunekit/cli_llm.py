"""``prunekit llm``: prune, evaluate and build language models from the command line.

App layer: drives the :mod:`prunekit.llm` engine on models loaded by
:mod:`prunekit.llm_models`.

    prunekit llm build-lm [--steps 600] [--out DIR]          # train + cache the zoo LM
    prunekit llm prune --model char-llama --method wanda --sparsity 0.5 --out pruned/
    prunekit llm prune --model minilm --method sparsegpt --sparsity 2:4 --out pruned-minilm/
    prunekit llm eval --model pruned/                        # perplexity / embedding cosine
    prunekit llm distill --student pruned/ --teacher char-llama --steps 300 --out kd/
    prunekit llm shrink --model char-llama --target-params 0.5 --out small/   # dense, smaller

``--model`` is a zoo name (``char-llama``, ``minilm``) or a ``save_pretrained`` directory.
``prune`` writes a ``save_pretrained`` directory (masks baked in, tokenizer alongside) that
``from_pretrained`` loads, plus ``prunekit_llm.json`` with the settings and the report.
``shrink`` (:func:`prunekit.llm.shrink`) writes, atomically, a smaller dense checkpoint
that plain transformers loads without prunekit, plus ``prunekit_shrink.json`` (settings,
what was removed, parameters before/after); its calibration windows come from the zoo
text (``--calibration pydoc``) or a UTF-8 file, in the model's tokenizer.
:func:`add_parser` adds the sub-command to ``prunekit``'s parser; :func:`run` dispatches.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn

import prunekit as pk
from prunekit import cli_distill
from prunekit import llm_models as models
from prunekit.errors import UsageError
from prunekit.fsio import atomic_directory
from prunekit.llm.depth import DEPTH_IMPORTANCE
from prunekit.llm.evaluate import embedding_similarity, perplexity
from prunekit.llm.methods import methods
from prunekit.llm.offload import available_memory, checkpoint_bytes, prune_checkpoint
from prunekit.llm.oneshot import ALLOCATIONS, prune
from prunekit.llm.report import LLMPruneReport
from prunekit.llm.shrink import ShrinkSettings, shrink
from prunekit.llm.shrink import plan as plan_shrink
from prunekit.llm.width import WIDTH_IMPORTANCE
from prunekit.zoo import lm


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``llm`` command (with ``prune``, ``eval``, ``build-lm``) to ``subparsers``."""
    parser = subparsers.add_parser("llm", help="one-shot LLM pruning: Wanda, SparseGPT, OWL")
    commands = parser.add_subparsers(dest="llm_command", required=True)
    zoo_help = f"a save_pretrained directory or a zoo name: {', '.join(models.ZOO)}"

    p = commands.add_parser("prune", help="prune a model on calibration text and save it")
    p.add_argument("--model", required=True, help=zoo_help)
    p.add_argument("--method", default="wanda", choices=methods(), help="pruning method")
    p.add_argument("--sparsity", default="0.5", help="a fraction (0.5) or N:M (2:4, 4:8)")
    p.add_argument("--allocation", default="uniform", choices=ALLOCATIONS, help="per block")
    p.add_argument("--samples", type=int, default=128, help="calibration samples")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sample")
    p.add_argument("--seed", type=int, default=0, help="seeds the calibration windows")
    p.add_argument("--out", type=Path, required=True, help="save_pretrained directory")
    ooc = "prune out of core, one block resident (300MB, 8GB); default: when the model is too big"
    p.add_argument("--max-memory", default=None, help=ooc)

    e = commands.add_parser("eval", help="perplexity (causal LM) or embedding cosine (encoder)")
    e.add_argument("--model", required=True, help=zoo_help)
    e.add_argument("--seq-len", type=int, default=256, help="perplexity window length")
    e.add_argument("--reference", default="minilm", help="encoders: the dense model to compare")

    b = commands.add_parser("build-lm", help="train the char-level zoo Llama and cache it")
    b.add_argument("--steps", type=int, default=600, help="training steps")
    b.add_argument("--out", type=Path, default=None, help=f"default: {lm.cache_dir()}")
    cli_distill.add_parser(commands, zoo_help)
    _add_shrink(commands, zoo_help)
    return parser


def _add_shrink(commands: argparse._SubParsersAction, zoo_help: str) -> None:
    s = commands.add_parser(
        "shrink", help="width/depth pruning to a smaller dense model plain transformers loads"
    )
    s.add_argument("--model", required=True, help=zoo_help)
    s.add_argument("--out", type=Path, required=True, help="save_pretrained directory")
    s.add_argument("--target-params", type=float, default=None, help="fraction of params kept")
    s.add_argument("--depth-fraction", type=float, default=0.25, help="share removed by depth")
    for name in ("heads", "kv-heads", "intermediate", "hidden"):
        s.add_argument(f"--{name}", type=int, default=None, help=f"{name} every block keeps")
    s.add_argument("--drop-layers", default=None, help="a count (3) or block indices (4,5,6)")
    s.add_argument("--importance", default="activation", choices=WIDTH_IMPORTANCE,
                   help="scores the width units")  # fmt: skip
    s.add_argument("--depth-importance", default="bi", choices=DEPTH_IMPORTANCE,
                   help="scores the blocks")  # fmt: skip
    s.add_argument("--calibration", default="pydoc", help="pydoc (zoo text) or a UTF-8 file")
    s.add_argument("--samples", type=int, default=64, help="calibration windows")
    s.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window")
    s.add_argument("--seed", type=int, default=0, help="seeds the calibration windows")
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1...")


def _sparsity(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _calibration(encode: Any, config: Any, args: argparse.Namespace) -> tuple[Tensor, str]:
    """The calibration windows of ``prune`` (capped at the model's positions), and their
    protocol line."""
    seq_len = min(args.seq_len, getattr(config, "max_position_embeddings", args.seq_len))
    calibration = lm.calibration_ids(encode, args.samples, seq_len, args.seed)
    return calibration, models.calibration_protocol(args.samples, seq_len, args.seed)


def _checkpoint(spec: str) -> Path | None:
    """The safetensors folder of a causal LM ``--model`` names, or None (MiniLM, no folder)."""
    path = lm.cache_dir() if spec == "char-llama" else Path(spec)
    return path if spec != "minilm" and checkpoint_bytes(path) > 0 else None


def _prune(args: argparse.Namespace, console: Console) -> None:
    source = _checkpoint(args.model)
    available = available_memory()
    too_big = source is not None and available is not None and checkpoint_bytes(source) > available
    if args.max_memory is not None or too_big:
        _prune_out_of_core(args, console, source)
        return
    loaded = models.load(args.model)
    calibration, protocol = _calibration(loaded.encode, loaded.model.config, args)
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
    _write_record(args, report, protocol)
    console.print(f"saved the pruned model (masks baked) to {args.out}")


def _prune_out_of_core(args: argparse.Namespace, console: Console, source: Path | None) -> None:
    """``prune`` one block at a time (:func:`prunekit.llm.prune_checkpoint`)."""
    from transformers import AutoConfig, AutoTokenizer

    if source is None or args.allocation != "uniform":
        raise UsageError(
            f"--max-memory prunes a causal LM's safetensors folder with --allocation uniform; "
            f"{args.model!r} with --allocation {args.allocation} is not one; Fix: pass a "
            "save_pretrained folder of a causal LM, or drop --max-memory."
        )
    vocab = source / lm.VOCAB_FILE
    tokenizer = (
        lm.CharTokenizer.load(source) if vocab.exists() else AutoTokenizer.from_pretrained(source)
    )
    encode = models.LoadedModel(nn.Identity(), True, tokenizer, args.model).encode
    calibration, protocol = _calibration(encode, AutoConfig.from_pretrained(source), args)
    report = prune_checkpoint(
        source, args.out, calibration, method=args.method,
        sparsity=_sparsity(args.sparsity), max_memory=args.max_memory,
    )  # fmt: skip
    console.print(report)
    console.print(protocol)
    _write_record(args, report, protocol)
    console.print(f"saved the pruned model (one block at a time, masks baked) to {args.out}")


def _write_record(args: argparse.Namespace, report: LLMPruneReport, protocol: str) -> None:
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


def _drop_layers(text: str | None) -> int | tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return int(text) if "," not in text else tuple(int(i) for i in text.split(",") if i)
    except ValueError:
        raise UsageError(
            f"--drop-layers {text!r} is neither a count nor block indices; Fix: e.g. "
            "--drop-layers 2 or --drop-layers 4,5."
        ) from None


def _shrink_calibration(args: argparse.Namespace, loaded: models.LoadedModel) -> Tensor:
    limit = getattr(loaded.model.config, "max_position_embeddings", args.seq_len)
    seq_len = min(args.seq_len, limit)
    if args.samples < 1 or seq_len < 2:
        raise UsageError("--samples must be >= 1 and --seq-len >= 2; Fix: e.g. 64 and 128.")
    if args.calibration == "pydoc":
        return lm.calibration_ids(loaded.encode, args.samples, seq_len, args.seed)
    path = Path(args.calibration)
    if not path.is_file():
        raise UsageError(
            f"--calibration {args.calibration!r} is neither 'pydoc' nor a file; Fix: pass a "
            "UTF-8 text file."
        )
    ids = loaded.encode(path.read_text(encoding="utf-8", errors="replace"))
    if len(ids) <= seq_len:
        raise UsageError(
            f"--calibration {path} has {len(ids)} tokens, not more than --seq-len {seq_len}; "
            "Fix: a longer text or a smaller --seq-len."
        )
    return lm.windows(ids, args.samples, seq_len, torch.Generator().manual_seed(args.seed))


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or (device.type == "cuda" and not torch.cuda.is_available()):
        raise UsageError(f"--device {text!r} is not available here; Fix: --device cpu.")
    return device


def _shrink(args: argparse.Namespace, console: Console) -> None:
    settings = ShrinkSettings(
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate,
        hidden=args.hidden,
        drop_layers=_drop_layers(args.drop_layers),
        target_params=args.target_params,
        depth_fraction=args.depth_fraction,
        importance=args.importance,
        depth_importance=args.depth_importance,
    )
    device = _device(args.device)
    loaded = models.load(args.model)
    plan = plan_shrink(loaded.model, settings)
    if plan.after == plan.before and not plan.drop:
        raise UsageError(
            "nothing to remove; Fix: pass --target-params (e.g. 0.5) or --heads, --kv-heads, "
            "--intermediate, --hidden, --drop-layers."
        )
    data = _shrink_calibration(args, loaded) if plan.needs_data else None
    loaded.model.to(device)
    result = shrink(loaded.model, data=data, settings=settings, progress=console.print)
    console.print(str(result))
    record = {"model": args.model, "settings": asdict(settings), "result": asdict(result)}
    with atomic_directory(args.out) as tmp:
        loaded.model.to("cpu")
        loaded.save(tmp)
        (tmp / "prunekit_shrink.json").write_text(json.dumps(record, indent=1, default=str))
    console.print(f"saved the shrunk model to {args.out} (plain from_pretrained loads it)")


HANDLERS = {
    "prune": _prune,
    "eval": _eval,
    "build-lm": _build_lm,
    "distill": cli_distill.run,
    "shrink": _shrink,
}


def run(args: argparse.Namespace, console: Console) -> None:
    """Run the ``llm`` sub-command parsed by :func:`add_parser`."""
    HANDLERS[args.llm_command](args, console)
