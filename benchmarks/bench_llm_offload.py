"""One-shot LLM pruning at the memory floor, prunekit and llmcompressor side by side.

A random Llama (hidden 512, 6 blocks, MLP 1408, 8/4 heads, vocab 8000: 26M parameters,
104 MB fp32, saved in 20 MB shards) is pruned to 50% by Wanda and SparseGPT, in memory and
out of core, by prunekit and, when ``--llmc-python`` names a venv with llmcompressor, by
llmcompressor (never a prunekit dependency), on the same calibration ids (random tokens,
seed 0), each run in a fresh process, the tools interleaved, repeated.

Peak = VmHWM beyond the RSS at the start of the measured region (reset through
``/proc/self/clear_refs``): in memory, after the model is loaded (the region is the prune);
out of core, after the imports (the region is the whole run: reading, pruning, writing;
llmcompressor: ``from_pretrained(device_map="auto_offload")`` with a CPU budget of one
block and ``oneshot``). The floor (issue 15):

    floor = B + S + 2 A
    B = bytes of one block's parameters
    S = the method's per-layer statistics of one block, fp32: Wanda sum_l 4 in_l (the
        column norms), SparseGPT sum_l 4 in_l^2 (the Hessians)
    A = samples x seq_len x hidden x 4 (the calibration hidden states in, and out)

Both run with glibc's allocator set by :data:`ALLOCATOR`. prunekit runs with
``measure_error=False`` (no dense weights kept for the error) and
``batch_size=1`` (llmcompressor's calibration batch). Mask agreement: share of the block
weights whose pruned / kept decision is the same in the two tools' checkpoints.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_llm.py --memory \
        --llmc-python /tmp/llmc-venv/bin/python [--repeats 3] [--write]
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

SAMPLES, SEQ_LEN, VOCAB = 16, 256, 8000
METHODS = ("wanda", "sparsegpt")
MODES = ("in memory", "out of core")
CONFIG = {
    "hidden_size": 512, "intermediate_size": 1408, "num_attention_heads": 8,
    "num_key_value_heads": 4, "num_hidden_layers": 6, "vocab_size": VOCAB,
}  # fmt: skip
STATUS = Path("/proc/self/status")
PROTOCOL = (
    "Random Llama (hidden 512, 6 blocks, MLP 1408, 8/4 heads, vocab 8000: 104 MB fp32, 20 MB "
    f"shards), 50%, {SAMPLES} x {SEQ_LEN} random calibration tokens (seed 0), batch 1, fresh "
    "process per run, glibc MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=131072 and "
    "MKL_DISABLE_FAST_MM=1 (allocator caches off) for both tools. "
    "Peak = VmHWM beyond the RSS at the start of the measured region: in memory the prune "
    "of the loaded model; out of core the whole run after the imports (prunekit "
    "`prune_checkpoint`; llmcompressor `from_pretrained(device_map='auto_offload', "
    "max_memory={'cpu': one block})` + `oneshot`, its save not counted). prunekit with "
    "`measure_error=False`. Floor = B + S + 2A: B one block's parameters, S the method's "
    "statistics of one block in fp32 (Wanda 4 sum in_l, SparseGPT 4 sum in_l^2), A = "
    "samples x seq_len x hidden x 4 (hidden states in, and out). Masks agree: share of "
    "block weights with the same pruned/kept decision in the two tools' checkpoints."
)
ALLOCATOR = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072",
             "MKL_DISABLE_FAST_MM": "1"}  # fmt: skip
"""Both tools' processes: one glibc arena, tensors of 128 KiB and more in their own
mappings returned on free (glibc's default raises that threshold to the largest block
freed so far, and the heap then keeps freed tensors resident), and MKL's own buffer cache
off (it keeps the BLAS/LAPACK work buffers of the largest matrices seen, 6-8 MiB here).
The peak then measures what the method holds, not what the allocators keep."""


def _kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)[1]) * 1024


def resident(model) -> None:
    """Every tensor of a loaded ``model`` copied into process memory: ``from_pretrained``
    may leave them views of the memory-mapped files, paged in (and counted) only when
    first used, inside the measured region. Same for both tools."""
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = tensor.data.clone()


class Peak:
    """VmHWM beyond the RSS at entry (the kernel's high-water mark, reset at entry)."""

    def __enter__(self) -> Peak:
        self.base, self.start = _kib("VmRSS"), time.perf_counter()
        Path("/proc/self/clear_refs").write_text("5")
        return self

    def __exit__(self, *exc: object) -> None:
        self.bytes, self.seconds = _kib("VmHWM") - self.base, time.perf_counter() - self.start


def calibration():
    import torch

    return torch.randint(0, VOCAB, (SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(0))


def save_model(folder: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**CONFIG))
    model.save_pretrained(folder, max_shard_size="20MB")


def floor(method: str) -> dict[str, int]:
    """The floor's terms for ``method`` (module docstring), from the config."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**CONFIG))
    block = model.model.layers[0]
    linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
    stats = sum(4 * (m.in_features**2 if method == "sparsegpt" else m.in_features) for m in linears)
    weights = sum(p.numel() * p.element_size() for p in block.parameters())
    act = SAMPLES * SEQ_LEN * CONFIG["hidden_size"] * 4
    return {"block": weights, "stats": stats, "activations": 2 * act}


def prunekit_child(src: str, out: str, mode: str, method: str) -> dict[str, float]:
    import transformers

    from prunekit import llm

    ids = calibration()
    options = {"method": method, "sparsity": 0.5, "batch_size": 1, "progress": False}
    options["measure_error"] = False
    if mode == "in memory":
        model = transformers.AutoModelForCausalLM.from_pretrained(src)
        resident(model)
        with Peak() as peak:
            llm.prune(model, ids, **options)
        model.save_pretrained(out)
    else:
        llm.prune_checkpoint(f"{src}-tiny", f"{out}-tiny", ids % 64, progress=False)  # imports
        with Peak() as peak:
            llm.prune_checkpoint(src, out, ids, **options)
    return {"peak": peak.bytes, "seconds": peak.seconds}


def llmc_child(src: str, out: str, mode: str, method: str) -> dict[str, float]:
    """llmcompressor's ``oneshot`` on the same model and ids (run by its own venv)."""
    import tempfile

    from compressed_tensors.offload import load_offloaded_model
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    ids = calibration()
    data = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * SEQ_LEN] * SAMPLES}
    )
    vocab = {str(i): i for i in range(VOCAB)}  # never used: the ids come tokenized
    processor = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="0")))
    common = {"sparsity": 0.5, "mask_structure": "0:0", "targets": ["Linear"],
              "ignore": ["re:.*lm_head"]}  # fmt: skip
    if method == "sparsegpt":
        recipe = SparseGPTModifier(**common, block_size=128, dampening_frac=0.01)
    else:
        recipe = WandaPruningModifier(**common)
    run = {"dataset": data, "recipe": recipe, "num_calibration_samples": SAMPLES,
           "processor": processor, "max_seq_length": SEQ_LEN,
           "shuffle_calibration_samples": False}  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:  # the offload folder, out of core
        if mode == "in memory":
            model = AutoModelForCausalLM.from_pretrained(src)
            resident(model)
            with Peak() as peak:
                oneshot(model=model, **run)
        else:
            with Peak() as peak:
                with load_offloaded_model():
                    model = AutoModelForCausalLM.from_pretrained(
                        src, device_map="auto_offload", offload_folder=folder,
                        max_memory={"cpu": floor(method)["block"]},
                    )  # fmt: skip
                oneshot(model=model, **run)
        model.save_pretrained(out)
    return {"peak": peak.bytes, "seconds": peak.seconds}


def agreement(a: Path, b: Path) -> float:
    """Share of block weights pruned in both or kept in both checkpoints."""
    import torch
    from safetensors.torch import load_file

    def zeros(folder: Path) -> dict[str, torch.Tensor]:
        out = {}
        for file in sorted(folder.glob("*.safetensors")):
            out |= {
                k: v == 0 for k, v in load_file(file).items() if ".layers." in k and "norm" not in k
            }
        return out

    x, y = zeros(a), zeros(b)
    same = sum(int((x[k] == y[k]).sum()) for k in x)
    return same / sum(v.numel() for v in x.values())


def _child(
    python: str, tool: str, src: Path, out: Path, mode: str, method: str, mkl_cache: bool
) -> dict:
    allocator = {k: v for k, v in ALLOCATOR.items() if k != "MKL_DISABLE_FAST_MM" or not mkl_cache}
    env = {k: v for k, v in os.environ.items() if k != "MKL_DISABLE_FAST_MM" or not mkl_cache}
    env |= {"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), **allocator}
    cmd = [python, str(Path(__file__).resolve()), "--child", tool, str(src), str(out), mode, method]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"{tool} {method} {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def one_round(
    work: Path,
    llmc_python: str | None,
    rows: list[dict],
    save: Callable[[], object],
    methods: tuple[str, ...] = METHODS,
    mkl_cache: bool = False,
) -> list[dict]:
    """Every (method, mode, tool) once, the tools interleaved, appended to ``rows`` as each
    finishes (peak, time, output folder). ``mkl_cache``: MKL's buffer cache left on."""
    src = work / "src"
    if not src.exists():
        save_model(src)
        import transformers

        tiny = transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=1,
            vocab_size=64,
        )
        transformers.AutoModelForCausalLM.from_config(tiny).save_pretrained(f"{src}-tiny")
    tools = [("prunekit", sys.executable)] + (
        [("llmcompressor", llmc_python)] if llmc_python else []
    )
    for method in methods:
        for mode in MODES:
            for tool, python in tools:
                out = work / f"{tool}-{method}-{mode.replace(' ', '-')}"
                result = _child(python, tool, src, out, mode, method, mkl_cache)
                print(
                    f"{tool} {method} {mode}: {result['peak'] / 2**20:.1f} MiB, "
                    f"{result['seconds']:.1f} s"
                )
                rows.append(
                    {"tool": tool, "method": method, "mode": mode, **result, "out": str(out)}
                )
                save()
    return rows


def table(rounds: list[list[dict]]) -> list[str]:
    """The markdown table: floor, each tool's median peak and time (per-round values)."""
    from statistics import median

    lines = ["| method | mode | floor (MiB) | prunekit peak (MiB) | x floor | "
             "llmcompressor peak (MiB) "
             "| x floor | prunekit time (s) | llmcompressor time (s) | masks agree |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for method in METHODS:
        low = sum(floor(method).values()) / 2**20
        for mode in MODES:
            cells = {}
            for tool in ("prunekit", "llmcompressor"):
                runs = [r for rows in rounds for r in rows
                        if (r["tool"], r["method"], r["mode"]) == (tool, method, mode)]  # fmt: skip
                if not runs:
                    cells[tool] = ("not run", "", "not run")
                    continue
                peak = median(r["peak"] for r in runs) / 2**20
                each = ", ".join(f"{r['seconds']:.1f}" for r in runs)
                cells[tool] = (f"{peak:.1f}", f"{peak / low:.2f}",
                               f"{median(r['seconds'] for r in runs):.1f} ({each})")  # fmt: skip
            outs = {r["tool"]: Path(r["out"]) for rows in rounds for r in rows
                    if (r["method"], r["mode"]) == (method, mode)}  # fmt: skip
            agree = (
                f"{agreement(outs['prunekit'], outs['llmcompressor']):.4%}"
                if len(outs) == 2
                else ""
            )
            p, q = cells["prunekit"], cells["llmcompressor"]
            lines.append(
                f"| {method} | {mode} | {low:.1f} | {p[0]} | {p[1]} | {q[0]} | {q[1]} | {p[2]} "
                f"| {q[2]} | {agree} |"
            )
    return lines


def floor_lines() -> list[str]:
    out = []
    for method in METHODS:
        f = {k: v / 2**20 for k, v in floor(method).items()}
        out.append(
            f"{method}: floor = B {f['block']:.2f} + S {f['stats']:.2f} "
            f"+ 2A {f['activations']:.2f} "
            f"= {sum(f.values()):.2f} MiB"
        )
    return out


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        tool, src, out, mode, method = sys.argv[2:7]
        child = prunekit_child if tool == "prunekit" else llmc_child
        print(json.dumps(child(src, out, mode, method)))
        return
    print("run through benchmarks/bench_llm.py --memory (see the module docstring)")


if __name__ == "__main__":
    main()
