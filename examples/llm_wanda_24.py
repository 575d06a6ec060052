"""Wanda 2:4 on a causal language model built from a transformers config.

A small ``LlamaForCausalLM`` (grouped-query attention, SwiGLU MLP, RoPE; random
initialisation: nothing is downloaded) is first trained for a few hundred steps on
Python's own documentation text (``pydoc_data``, bytes as tokens), so that its
activations carry structure, then pruned one-shot to 2:4 with Wanda (Sun et al. 2023,
score ``|W_ij| * ||X_j||_2`` compared within groups of 4 inputs) and, as the baseline,
with magnitude. Held-out perplexity before and after, and a check that every pruned
weight matrix of every block is exactly 2:4 (two zeros in each group of four
consecutive inputs); embeddings and the LM head stay dense.

    python examples/llm_wanda_24.py           # the full run
    python examples/llm_wanda_24.py --quick   # a smoke run: the same path, small (CI runs it)
"""

from __future__ import annotations

import argparse
import copy
from pydoc_data.topics import topics

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import prunekit as pk


def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """Byte ids of pydoc's topics, 90% train / 10% held out (1-D each)."""
    text = "\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    ids = torch.tensor(list(text), dtype=torch.long)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:]


def build(hidden: int, layers: int) -> LlamaForCausalLM:
    """A byte-level Llama: 256-token vocabulary, 4 query heads sharing 2 key/value heads."""
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def windows(ids: torch.Tensor, seq_len: int, count: int, seed: int) -> torch.Tensor:
    """``count`` random windows of ``seq_len`` tokens, ``(count, seq_len)``."""
    starts = torch.randint(0, len(ids) - seq_len, (count,),
                           generator=torch.Generator().manual_seed(seed))
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def train(model: nn.Module, ids: torch.Tensor, steps: int, seq_len: int, seed: int) -> None:
    """``steps`` AdamW steps on batches of 16 random windows (our own training loop)."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for i in range(steps):
        batch = windows(ids, seq_len, 16, seed + i)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def is_two_four(model: nn.Module) -> bool:
    """Every Linear inside the decoder blocks has at least 2 zeros per 4 consecutive inputs."""
    for layer in model.model.layers.modules():
        if isinstance(layer, nn.Linear):
            groups = layer.weight.detach().reshape(layer.out_features, -1, 4)
            if not bool(((groups == 0).sum(-1) >= 2).all()):
                return False
    return True


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train, prune with Wanda and with magnitude at 2:4; returns the perplexities."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny and short")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick, full = (32, 2, 8, 8, 64), (128, 4, 400, 64, 128)
    hidden, layers, steps, samples, seq = quick if args.quick else full
    torch.manual_seed(args.seed)
    train_ids, test_ids = corpus()
    test_ids = test_ids[: 8 * seq] if args.quick else test_ids
    model = build(hidden, layers)
    train(model, train_ids, steps, seq, args.seed)
    calibration = windows(train_ids, seq, samples, args.seed + 10**6)  # (samples, seq)

    result = {"dense": pk.llm.perplexity(model, test_ids, seq_len=seq)}
    for method in ("wanda", "magnitude"):
        pruned = copy.deepcopy(model)
        report = pk.llm.prune(pruned, calibration, method=method, sparsity="2:4",
                              progress=False)
        print(report.summary())
        assert is_two_four(pruned), f"{method}: not 2:4"
        result[method] = pk.llm.perplexity(pruned, test_ids, seq_len=seq)
    print("held-out perplexity: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
