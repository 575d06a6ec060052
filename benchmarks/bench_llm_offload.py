"""Out-of-core vs in-memory one-shot pruning: peak memory and time on one checkpoint.

A random Llama (hidden 768, 12 blocks, MLP 2048, vocab 32000: 125M parameters, 476 MiB
fp32) is saved to a temporary folder in 100 MB shards; each mode then runs in a fresh
process:

- in memory: ``from_pretrained`` + ``pk.llm.prune`` + ``save_pretrained``;
- out of core: ``pk.llm.prune_checkpoint`` (one block resident).

Peak = VmHWM beyond the RSS after torch, transformers and the model's code are imported
(:class:`prunekit.llm.memory.PeakMemory`), so it counts the weights each mode holds. Wanda,
50%, 16 random sequences of 128 tokens.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_llm_offload.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import sys, time, torch, transformers
from prunekit import llm
from prunekit.llm.memory import PeakMemory
src, out, mode, method = sys.argv[1:5]
ids = torch.randint(0, 32000, (16, 128), generator=torch.Generator().manual_seed(0))
with torch.device("meta"):
    transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(src))
start = time.perf_counter()
with PeakMemory(torch.device("cpu")) as peak:
    if mode == "in memory":
        model = transformers.AutoModelForCausalLM.from_pretrained(src)
        llm.prune(model, ids, method=method, sparsity=0.5, progress=False)
        model.save_pretrained(out)
    else:
        llm.prune_checkpoint(src, out, ids, method=method, sparsity=0.5, progress=False)
print(peak.bytes, time.perf_counter() - start, peak.source)
"""


def _save(folder: Path) -> int:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4,
        num_hidden_layers=12, vocab_size=32000,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, max_shard_size="100MB")
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        params = _save(src)
        weights = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        print(f"model: {params / 1e6:.0f}M parameters, {weights / 2**20:.0f} MiB on disk")
        print(f"load average: {os.getloadavg()[0]:.1f}")
        print("| method | mode | peak beyond imports (MiB) | time (s) |")
        print("|---|---|---|---|")
        for method in ("wanda", "sparsegpt"):
            for mode in ("in memory", "out of core"):
                out = Path(tmp) / f"{method}-{mode.replace(' ', '-')}"
                done = subprocess.run(
                    [sys.executable, "-c", CHILD, str(src), str(out), mode, method],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                peak, seconds, _ = done.stdout.split(maxsplit=2)
                print(f"| {method} | {mode} | {int(peak) / 2**20:.0f} | {float(seconds):.1f} |")
        print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
