"""Which importance criterion ``pk.llm.shrink`` should use: held-out perplexity of the zoo
char-level Llama pruned to about 50% of its parameters, right after pruning (no
distillation: that is ``bench_llm_shrink.py``), per width criterion and per depth
criterion.

- width only (``depth_fraction=0``): hidden size and MLP width scaled together, heads kept;
  ``activation`` (Minitron), ``taylor``, ``magnitude``;
- depth only: two of the four blocks removed, chosen by ``bi`` (ShortGPT), ``angular``
  (Gromov et al.), ``loss`` (loss when dropped), and the last two blocks as a baseline;
- both (``depth_fraction=0.5``), activation + BI.

Calibration: ``--samples`` windows of ``--seq-len`` characters of the training split,
seed 0 (as ``prunekit llm prune``); perplexity: the held-out split, windows of
``--seq-len``. ``--model-dir``: a zoo LM directory (default: the cached one).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_llm_shrink_criteria.py \
        [--model-dir DIR] [--samples 128] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

import prunekit as pk
from prunekit.llm.evaluate import perplexity
from prunekit.zoo import lm

RUNS = {
    "dense": None,
    "width, activation": dict(target_params=0.5, depth_fraction=0.0, importance="activation"),
    "width, taylor": dict(target_params=0.5, depth_fraction=0.0, importance="taylor"),
    "width, magnitude": dict(target_params=0.5, depth_fraction=0.0, importance="magnitude"),
    "depth, bi": dict(drop_layers=2, depth_importance="bi"),
    "depth, angular": dict(drop_layers=2, depth_importance="angular"),
    "depth, loss": dict(drop_layers=2, depth_importance="loss"),
    "depth, last two blocks": dict(drop_layers=(2, 3)),
    "width + depth, activation + bi": dict(target_params=0.5, depth_fraction=0.5),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    teacher, tokenizer = lm.load_lm(args.model_dir)
    calibration = lm.calibration_ids(tokenizer.encode, args.samples, args.seq_len, 0)
    held_out = lm.held_out_ids(tokenizer.encode)
    config = teacher.config
    print("| model | parameters | blocks dropped | hidden / MLP | perplexity | seconds |")
    print("|---|---:|---|---|---:|---:|")
    for name, settings in RUNS.items():
        model = copy.deepcopy(teacher)
        start = time.perf_counter()
        dropped, shape = "-", f"{config.hidden_size} / {config.intermediate_size}"
        if settings is not None:
            result = pk.llm.shrink(model, data=calibration, **settings)
            dropped = ",".join(map(str, result.dropped_layers)) or "-"
            shape = f"{result.after.hidden} / {result.after.intermediate}"
        seconds = time.perf_counter() - start
        params = sum(p.numel() for p in model.parameters())
        ppl = perplexity(model, held_out, seq_len=args.seq_len)
        print(f"| {name} | {params:,} | {dropped} | {shape} | {ppl:.3f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
