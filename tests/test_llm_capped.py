"""Out-of-core pruning under a memory cap below the model's size (issue 15, "Done when").

A Llama of 98 MB (8 blocks of 6.6 MB, embedding and head of 25 MB) is saved in 8 MB
shards; a fresh process imports torch, transformers and prunekit (by pruning a tiny Llama:
transformers imports lazily, torch starts its threads on first use), then caps its own
address space (``RLIMIT_AS``) at its current size plus 60% of the model's size, proves the
cap holds (a model-sized allocation fails) and prunes the checkpoint with Wanda and
SparseGPT. Each pruned checkpoint must equal, bit for bit, ``pk.llm.prune`` of the loaded
model in this (uncapped) process on the same calibration, both on one thread.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from prunekit import llm

transformers = pytest.importorskip("transformers")
resource = pytest.importorskip("resource")  # POSIX only

METHODS = ("wanda", "sparsegpt")
VOCAB = 16000

CHILD = textwrap.dedent(
    """
    import re, resource, sys
    import torch, transformers
    from prunekit import llm
    src, out, headroom, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    ids = torch.randint(0, {vocab}, (8, 64), generator=torch.Generator().manual_seed(0))
    torch.set_num_threads(1)  # as the reference: the same kernels, so the same bits
    # Every module (transformers imports lazily) and torch's threads, before the cap:
    llm.prune_checkpoint(f"{{src}}-tiny", f"{{out}}-tiny", ids % 64, progress=False)
    status = open("/proc/self/status").read()
    now = int(re.search(r"VmSize:\\s+(\\d+) kB", status)[1]) * 1024
    try:
        resource.setrlimit(resource.RLIMIT_AS, (now + headroom, resource.RLIM_INFINITY))
    except (ValueError, OSError) as err:
        print("NOCAP", err)
        sys.exit(0)
    try:
        torch.empty(size, dtype=torch.uint8).fill_(1)
    except (RuntimeError, MemoryError):
        print("CAPPED")
    for method in {methods}:
        llm.prune_checkpoint(src, f"{{out}}/{{method}}", ids, method=method, sparsity=0.5,
                             batch_size=4, progress=False)
    print("DONE")
    """
).format(vocab=VOCAB, methods=METHODS)


def _model(hidden: int = 384, vocab: int = VOCAB, layers: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_attention_heads=8,
        num_key_value_heads=4, num_hidden_layers=layers, vocab_size=vocab,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.slow  # a fresh process pruning a 98 MB Llama twice (~18 s); make test runs it
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_capped_out_of_core_prune_equals_in_memory(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _model().save_pretrained(src, max_shard_size="8MB")
    _model(32, 64, 1).save_pretrained(tmp_path / "src-tiny")
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    headroom = size * 6 // 10  # the whole model cannot be in memory under the cap
    # One malloc arena, and freed blocks go back to the kernel (a fixed mmap threshold):
    # address space a fragmented heap keeps would count against the cap.
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072",
           "PYTHONPATH": str(Path(llm.__file__).parents[2])}  # fmt: skip
    args = [str(src), str(tmp_path / "out"), str(headroom), str(size)]
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, timeout=300
    )
    if "NOCAP" in done.stdout:
        pytest.skip(f"the kernel refused an address-space limit: {done.stdout.strip()}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CAPPED" in done.stdout and "DONE" in done.stdout, done.stdout
    ids = torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    for method in METHODS:
        model = transformers.AutoModelForCausalLM.from_pretrained(src)
        torch.set_num_threads(1)
        try:
            llm.prune(model, ids, method=method, sparsity=0.5, batch_size=4, progress=False)
        finally:
            torch.set_num_threads(threads)
        pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / method)
        want, got = model.state_dict(), pruned.state_dict()
        assert want.keys() == got.keys()
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor), (method, name)
