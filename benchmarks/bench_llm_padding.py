"""Padding in LLM calibration: how many Wanda / SparseGPT decisions a padded calibration
changes against the same texts unpadded, with the engine's real-token statistics and
with statistics over every position (the behaviour before issue 15, simulated by making
the engine count padded rows too).

Calibration: 32 random windows of the zoo char-level Llama's training split (prunekit llm
build-lm), of 64 to 256 tokens (seed 0); unpadded = one window per batch; padded =
batches of 8 windows, right- or left-padded with an attention_mask. Sparsity 50%. The
floor of floating-point reordering: 32 windows of 128 tokens (no padding) calibrated in
batches of 1 against batches of 8.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_llm_padding.py [wanda sparsegpt]
"""

from __future__ import annotations

import copy
import sys
from unittest import mock

import torch
from torch import nn

from prunekit import llm
from prunekit.inputs import Calibration
from prunekit.llm.engine import RealTokens
from prunekit.masks import get_mask
from prunekit.zoo import lm


def texts(encode, count: int = 32, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    ids = encode(lm.split_text()[0])
    lengths = torch.randint(64, 257, (count,), generator=gen).tolist()
    starts = torch.randint(0, len(ids) - 257, (count,), generator=gen).tolist()
    return [ids[s : s + n].tolist() for s, n in zip(starts, lengths, strict=True)]


def masks(model: nn.Module, calibration: object, method: str) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model)
    llm.prune(model, calibration, method=method, sparsity=0.5, progress=False, keep_masks=True)
    return {n: get_mask(m).bool() for n, m in model.named_modules() if get_mask(m) is not None}


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    diff = sum(int((a[n] != b[n]).sum()) for n in a)
    return diff / sum(a[n].numel() for n in a)


def every_row(self: RealTokens, x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1])


def main() -> None:
    model, tokenizer = lm.load_lm()
    rows = texts(tokenizer.encode)
    unpadded = [torch.tensor([r]) for r in rows]
    print("| method | padding | decisions changed: real tokens | every position |")
    print("|---|---|---:|---:|")
    for method in sys.argv[1:] or ("wanda", "sparsegpt"):
        reference = masks(model, unpadded, method)
        for side in ("right", "left"):
            padded = Calibration.ragged(rows, batch_size=8, side=side)
            now = changed(reference, masks(model, padded, method))
            with mock.patch.object(RealTokens, "rows", every_row):
                before = changed(reference, masks(model, padded, method))
            print(f"| {method} | {side} | {now:.2%} | {before:.2%} |")
        same = lm.calibration_ids(tokenizer.encode, 32, 128)  # no padding: batching alone
        batching = changed(masks(model, list(same.split(1)), method),
                           masks(model, list(same.split(8)), method))  # fmt: skip
        print(f"| {method} | none (batches of 1 vs 8) | {batching:.2%} | |")


if __name__ == "__main__":
    main()
