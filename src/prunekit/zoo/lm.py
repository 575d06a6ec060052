"""A small Llama-style character-level language model, trained offline on Python's own docs.

No pretrained causal LM ships in any installable package, so this zoo entry trains one:

- text: every entry of :mod:`pydoc_data.topics` (about 465k characters, part of every
  Python install), joined in sorted-key order;
- split: the first 90% of the characters train, the last 10% are held out (contiguous,
  no shuffling, so the split is the same everywhere);
- tokenizer: one token per distinct character of the whole text (:class:`CharTokenizer`);
- model: ``transformers.LlamaForCausalLM``, 4 blocks, hidden 256, 8 query / 4 key-value
  heads (grouped-query attention), MLP 768, untied head: about 3.3M parameters;
- training: AdamW, cosine schedule, random windows of the training split, seeded.

Built once and cached under ``$XDG_CACHE_HOME/prunekit/char-llama`` (``~/.cache/...``
when unset) as a ``save_pretrained`` directory plus ``char_vocab.json``::

    prunekit llm build-lm
    model, tokenizer = load_lm()     # MissingModelError until it is built
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from prunekit.errors import MissingModelError
from prunekit.spec import checked, integer
from prunekit.tables import progress_bar

LM_NAME = "char-llama"
HELD_OUT_FRACTION = 0.1
VOCAB_FILE = "char_vocab.json"


def corpus() -> str:
    """The whole text: every ``pydoc_data.topics`` entry, in sorted-key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def split_text(text: str | None = None) -> tuple[str, str]:
    """``(train, held_out)``: the first 90% and the last 10% of :func:`corpus`."""
    text = corpus() if text is None else text
    cut = int(len(text) * (1 - HELD_OUT_FRACTION))
    return text[:cut], text[cut:]


@dataclass(frozen=True)
class CharTokenizer:
    """One token id per character of ``chars`` (sorted distinct characters of the corpus)."""

    chars: str

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        """Token ids of ``text`` (int64, 1-D); KeyError on a character outside the vocab."""
        index = {c: i for i, c in enumerate(self.chars)}
        return torch.tensor([index[c] for c in text], dtype=torch.int64)

    def decode(self, ids: Tensor) -> str:
        return "".join(self.chars[i] for i in ids.tolist())

    def save(self, directory: Path) -> None:
        (Path(directory) / VOCAB_FILE).write_text(json.dumps({"chars": self.chars}))

    @classmethod
    def load(cls, directory: Path) -> CharTokenizer:
        return cls(json.loads((Path(directory) / VOCAB_FILE).read_text())["chars"])


def cache_dir() -> Path:
    """Where the trained model lives: ``$XDG_CACHE_HOME/prunekit/char-llama``."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "prunekit" / LM_NAME


def lm_config(vocab_size: int, *, hidden: int = 256, layers: int = 4):
    """The Llama configuration of the zoo LM (GQA: 8 query heads share 4 key-value heads)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def windows(ids: Tensor, count: int, seq_len: int, generator: torch.Generator) -> Tensor:
    """``count`` random windows of ``seq_len`` tokens of the 1-D ``ids``: ``(count, seq_len)``."""
    starts = torch.randint(0, len(ids) - seq_len, (count,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def calibration_ids(
    encode: Callable[[str], Tensor], samples: int = 128, seq_len: int = 256, seed: int = 0
) -> Tensor:
    """``(samples, seq_len)`` random windows (seeded) of the training split, tokenized by
    ``encode(text) -> 1-D ids`` (e.g. ``CharTokenizer.encode``)."""
    gen = torch.Generator().manual_seed(seed)
    return windows(encode(split_text()[0]), samples, seq_len, gen)


def held_out_ids(encode: Callable[[str], Tensor]) -> Tensor:
    """The held-out split as one 1-D id tensor (for perplexity)."""
    return encode(split_text()[1])


def build_lm(
    directory: Path | None = None,
    *,
    steps: int = 600,
    batch_size: int = 16,
    seq_len: int = 256,
    lr: float = 3e-3,
    hidden: int = 256,
    layers: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Train the zoo LM from scratch and save it to ``directory`` (default :func:`cache_dir`).

    Deterministic for a given ``seed`` and thread count. Returns the directory.
    """
    from transformers import LlamaForCausalLM

    # An untrained model saved to the cache would silently spoil every later benchmark.
    checked("build_lm", "steps", steps, integer(1, 10**7))
    directory = Path(directory) if directory is not None else cache_dir()
    train_text, _ = split_text()
    tokenizer = CharTokenizer.from_text(corpus())
    ids = tokenizer.encode(train_text)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(lm_config(tokenizer.vocab_size, hidden=hidden, layers=layers))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task("training char-llama", total=steps)
        for _ in range(steps):
            batch = windows(ids, batch_size, seq_len + 1, gen)
            logits = model(input_ids=batch[:, :-1]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.update(task, advance=1, description=f"training char-llama loss {loss.item():.3f}")
    model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save(directory)
    recipe = {
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lr": lr,
        "seed": seed,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (directory / "recipe.json").write_text(json.dumps(recipe, indent=1))
    return directory


def load_lm(directory: Path | None = None):
    """``(model, tokenizer)`` of the cached zoo LM (eval mode).

    Raises:
        MissingModelError: when it has not been built; the message gives the command.
    """
    directory = Path(directory) if directory is not None else cache_dir()
    if not (directory / VOCAB_FILE).exists():
        raise MissingModelError(
            f"zoo model {LM_NAME!r} is not built at {directory}; Fix: run "
            "`prunekit llm build-lm` once (7 to 16 minutes on 2 cores; cached afterwards)."
        )
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(directory).eval(), CharTokenizer.load(directory)
