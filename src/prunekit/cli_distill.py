"""``prunekit llm distill``: recover a pruned (or shrunk) causal LM by distilling it from
its teacher with :func:`prunekit.training.distill`, and save it as a plain
``save_pretrained`` directory.

    prunekit llm distill --student small/ --teacher char-llama --steps 300 --out small-kd/
    prunekit llm distill --student small/ --teacher big/ --data mypkg.data:batches --out kd/

``--data pydoc`` (default): ``steps`` batches of ``batch-size`` random windows of
``seq-len`` tokens (seeded) of the training split of :mod:`prunekit.zoo.lm`'s text, in
the student's tokenizer. ``--data module:function``: ``function()`` returns an iterable of
batches (``(B, T)`` id tensors or mappings with ``input_ids``); a one-pass iterator is
read for at most ``steps`` batches. The output directory is written atomically
(:func:`prunekit.fsio.atomic_directory`): the student's weights, config and tokenizer,
and ``prunekit_distill.json`` with the settings, losses and held-out perplexities.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from torch import Tensor

from prunekit import llm_models as models
from prunekit.errors import UsageError, guarded
from prunekit.fsio import atomic_directory
from prunekit.llm.evaluate import perplexity
from prunekit.training.distill import Distillation, distill
from prunekit.zoo import lm

RECORD = "prunekit_distill.json"


def add_parser(commands: argparse._SubParsersAction, zoo_help: str) -> None:
    """Add ``distill`` to the ``prunekit llm`` sub-commands."""
    d = commands.add_parser("distill", help="recover a pruned LM by distilling its teacher")
    d.add_argument("--student", required=True, help=zoo_help)
    d.add_argument("--teacher", required=True, help=zoo_help)
    d.add_argument("--data", default="pydoc", help="pydoc (zoo LM text) or module:function")
    d.add_argument("--steps", type=int, default=100, help="optimizer steps")
    d.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    d.add_argument("--temperature", type=float, default=1.0, help="softens both distributions")
    d.add_argument("--alpha", type=float, default=1.0, help="KL weight; 1-alpha: next-token CE")
    d.add_argument("--batch-size", type=int, default=8, help="--data pydoc: windows per step")
    d.add_argument("--seq-len", type=int, default=256, help="--data pydoc: tokens per window")
    d.add_argument("--seed", type=int, default=0, help="--data pydoc: seeds the windows")
    d.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens (default all)")
    d.add_argument("--checkpoint-dir", type=Path, default=None, help="resumable checkpoints")
    d.add_argument("--out", type=Path, required=True, help="save_pretrained directory")


def text_batches(
    loaded: models.LoadedModel, steps: int, batch_size: int, seq_len: int, seed: int
) -> list[Tensor]:
    """``steps`` batches of ``(batch_size, seq_len)`` seeded windows of the training text."""
    for name, value in (("batch-size", batch_size), ("seq-len", seq_len)):
        if value < 1 + (name == "seq-len"):
            raise UsageError(f"--{name} {value} is too small; Fix: e.g. --{name} 8.")
    ids = lm.calibration_ids(loaded.encode, steps * batch_size, seq_len, seed)
    return list(ids.split(batch_size))


def user_batches(spec: str, steps: int) -> Iterable[Any]:
    """The batches of ``module:function`` (an iterator is read for ``steps`` batches)."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise UsageError(
            f"--data {spec!r} is neither 'pydoc' nor module:function; Fix: e.g. "
            "--data mypkg.data:batches (a function returning an iterable of batches)."
        )
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UsageError(
            f"--data {spec!r}: {type(err).__name__}: {err}; Fix: put the module on "
            "PYTHONPATH and name a function in it."
        ) from err
    data = guarded(function, f"--data {spec}")()
    if isinstance(data, Iterator):
        return list(itertools.islice(data, steps))
    return data


def _held_out(loaded: models.LoadedModel, seq_len: int, tokens: int | None) -> tuple[Tensor, int]:
    if tokens is not None and tokens < 2:
        raise UsageError(f"--eval-tokens {tokens} is too small; Fix: e.g. --eval-tokens 8192.")
    max_len = getattr(loaded.model.config, "max_position_embeddings", seq_len)
    return lm.held_out_ids(loaded.encode)[:tokens], min(seq_len, max_len)


def run(args: argparse.Namespace, console: Console) -> None:
    """Distill ``--student`` from ``--teacher``, report, and save to ``--out``."""
    settings = Distillation(
        steps=args.steps, lr=args.lr, temperature=args.temperature, alpha=args.alpha
    )
    student, teacher = models.load(str(args.student)), models.load(str(args.teacher))
    for name, loaded in (("student", student), ("teacher", teacher)):
        if not loaded.causal:
            raise UsageError(
                f"--{name} {loaded.name!r} is not a causal LM; Fix: a ...ForCausalLM directory."
            )
    if args.data == "pydoc":
        data: Iterable[Any] = text_batches(
            student, args.steps, args.batch_size, args.seq_len, args.seed
        )
    else:
        data = user_batches(args.data, args.steps)
    ids, seq_len = _held_out(student, args.seq_len, args.eval_tokens)
    before = perplexity(student.model, ids, seq_len=seq_len)
    checkpoint = None if args.checkpoint_dir is None else str(args.checkpoint_dir)
    report = distill(
        student.model, teacher.model, data, settings, checkpoint_dir=checkpoint,
        log=console.print,
    )  # fmt: skip
    after = perplexity(student.model, ids, seq_len=seq_len)
    console.print(str(report))
    console.print(
        f"held-out perplexity {before:.3f} -> {after:.3f} (the first {len(ids):,} tokens of the "
        f"pydoc_data held-out split, windows of {seq_len})"
    )
    record = {
        "student": str(args.student),
        "teacher": str(args.teacher),
        "data": args.data,
        "settings": asdict(settings) | {"batch_size": args.batch_size, "seq_len": args.seq_len},
        "losses": report.losses,
        "tokens": report.tokens,
        "seconds": round(report.seconds, 2),
        "perplexity": {"before": before, "after": after, "tokens": len(ids), "seq_len": seq_len},
    }
    with atomic_directory(args.out) as tmp:
        student.save(tmp)
        (tmp / RECORD).write_text(json.dumps(record, indent=1))
    console.print(f"saved the distilled model to {args.out}")
