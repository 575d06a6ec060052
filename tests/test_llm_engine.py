"""The block-by-block engine on tiny Hugging Face configs: architectures, sequential
calibration, save/load round trip, errors (model unchanged), hooks removed."""

from __future__ import annotations

import copy
import importlib
import platform
import subprocess
import sys

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn

import prunekit as pk
from prunekit import llm
from prunekit.criteria.activation import wanda_scores
from prunekit.errors import (
    CalibrationError,
    IncompatibleLayerError,
    InvalidSparsityError,
    PruningError,
    UnknownChoiceError,
    UnsupportedModelError,
)
from prunekit.layers import to_canonical
from prunekit.llm import memory
from prunekit.llm.blocks import block_layers, find_blocks
from prunekit.llm.calibration import calibration_batches
from prunekit.llm.engine import capture_inputs, sequential
from prunekit.masks import get_mask as _get_mask
from prunekit.selection import row_mask as wanda_row_mask


def get_mask(module: nn.Module) -> torch.Tensor:
    """The module's keep-mask as bool (``masks.get_mask`` hands back 0/1 uint8)."""
    return _get_mask(module).bool()


transformers = pytest.importorskip("transformers")

VOCAB = 64


def tiny(arch: str) -> nn.Module:
    """A 2-block model of ``arch`` with random weights, built offline from a config."""
    torch.manual_seed(0)
    common = {"vocab_size": VOCAB, "num_hidden_layers": 2}
    if arch in ("llama", "mistral", "qwen2"):
        config = transformers.AutoConfig.for_model(
            arch,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,  # grouped-query attention
        )
        return transformers.AutoModelForCausalLM.from_config(config)
    if arch == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=VOCAB)
        return transformers.GPT2LMHeadModel(config)
    if arch == "opt":
        config = transformers.OPTConfig(
            hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32, **common
        )
        return transformers.OPTForCausalLM(config)
    config = transformers.BertConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, **common
    )
    return transformers.BertModel(config)


def ids(samples: int = 4, seq_len: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, VOCAB, (samples, seq_len), generator=torch.Generator().manual_seed(seed)
    )


def outside_blocks_unmasked(model: nn.Module, prefix: str) -> bool:
    return all(
        _get_mask(m) is None for name, m in model.named_modules() if not name.startswith(prefix)
    )


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2", "opt", "bert"])
def test_engine_prunes_every_block_layer_and_nothing_else(arch: str) -> None:
    model = tiny(arch)
    report = llm.prune(model, ids(), method="wanda", sparsity=0.5, progress=False)
    prefix, blocks = find_blocks(model)
    expected = [ly.name for i, b in enumerate(blocks) for ly in block_layers(b, f"{prefix}.{i}")]
    assert [r.name for r in report.layers] == expected
    assert all(r.sparsity == 0.5 and r.target == 0.5 for r in report.layers)
    assert all(0 < r.error < 1 for r in report.layers)
    assert outside_blocks_unmasked(model, prefix)  # embeddings and LM head stay dense
    assert report.seconds > 0 and report.tokens == 48 and report.samples == 4
    with torch.no_grad():
        out = model(input_ids=ids(1, 8, seed=1))
    hidden = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert torch.isfinite(hidden).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pruned_causal_lm_still_generates(arch: str) -> None:
    model = tiny(arch)
    llm.prune(model, ids(), method="sparsegpt", sparsity="2:4", progress=False)
    out = model.generate(ids(1, 4), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_gpt2_conv1d_nm_runs_along_the_input_axis(method: str) -> None:
    model = tiny("gpt2")
    llm.prune(model, ids(), method=method, sparsity="4:8", progress=False, keep_masks=True)
    attn = model.transformer.h[0].attn.c_attn  # Conv1D, stored (in, out)
    keep = to_canonical(attn, get_mask(attn))
    assert keep.shape == (96, 32)
    assert (keep.reshape(96, -1, 8).sum(-1) == 4).all()
    assert torch.equal(attn.weight != 0, get_mask(attn)) or method != "sparsegpt"


def test_sequential_engine_equals_stats_from_the_pruned_so_far_model() -> None:
    model = tiny("llama")
    reference = copy.deepcopy(model)
    calib = ids(6, 10)
    llm.prune(
        model, calib, method="wanda", sparsity=0.5, batch_size=3, progress=False, keep_masks=True
    )
    for block in reference.model.layers:  # by hand: full forwards of the reference model
        linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
        sums = {id(m): torch.zeros(m.in_features) for m in linears}

        def accumulate(mod: nn.Module, args: tuple, out: torch.Tensor, sums=sums) -> None:
            sums[id(mod)] += args[0].reshape(-1, args[0].shape[-1]).square().sum(0)

        hooks = [m.register_forward_hook(accumulate) for m in linears]
        with torch.no_grad():
            reference(input_ids=calib)
        for h in hooks:
            h.remove()
        for m in linears:
            pk.masks.apply_mask(m, wanda_row_mask(wanda_scores(m.weight, sums[id(m)].sqrt()), 0.5))
    pruned = dict(model.named_modules())
    for name, m in reference.named_modules():
        if isinstance(m, nn.Linear) and name.startswith("model.layers"):
            assert torch.equal(get_mask(m), get_mask(pruned[name])), name


def test_sequential_leaves_the_captured_inputs_alone_and_measure_false_reports_no_error() -> None:
    model = tiny("llama").eval()
    blocks = model.model.layers
    with torch.no_grad():
        inputs = capture_inputs(model, blocks[0], calibration_batches(ids(4, 8), model, 2))
        hidden = list(inputs.hidden)
        visited: list[int] = []

        def visit(index: int, layers: list, stats: dict) -> bool:
            visited.append(index)
            return False

        errors = sequential(
            blocks,
            "model.layers",
            inputs,
            visit,
            needs=frozenset({"norms"}),
            description="stats",
            progress=False,
            measure=False,
        )
    assert visited == [0, 1]
    assert errors == {}
    assert len(inputs.hidden) == len(hidden)
    assert all(a is b for a, b in zip(inputs.hidden, hidden, strict=True))


def test_sparsegpt_overwrites_kept_weights_and_bakes_consistently() -> None:
    model = tiny("llama")
    dense = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    llm.prune(model, ids(), method="sparsegpt", sparsity=0.5, progress=False, keep_masks=True)
    up = model.model.layers[0].mlp.up_proj
    kept = get_mask(up)
    assert not torch.equal(up.weight[kept], dense[kept])  # compensated
    assert (up.parametrizations.weight.original[~kept] == 0).all()
    baked = up.weight.detach().clone()
    pk.bake(model)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, baked)


def test_owl_engine_mean_sparsity_and_bounds() -> None:
    model = tiny("llama")
    report = llm.prune(
        model, ids(), method="wanda", sparsity=0.6, allocation="owl", owl_lambda=0.1, progress=False
    )
    targets = sorted({r.target for r in report.layers})
    assert len(targets) == 2 and sum(targets) / 2 == pytest.approx(0.6)
    assert targets[1] - targets[0] == pytest.approx(0.2)
    for r in report.layers:
        assert abs(r.sparsity - r.target) <= 1 / r.shape[1]  # per-row rounding only


def test_save_pretrained_round_trip(tmp_path) -> None:
    model = tiny("llama")
    llm.prune(model, ids(), method="wanda", sparsity="2:4", progress=False)
    pk.bake(model)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert pk.sparsity(loaded, layers="model.layers.*").total == 0.5
    x = ids(1, 8, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, loaded(input_ids=x).logits)


def test_hooks_removed_and_modes_restored_when_pruning_fails(monkeypatch) -> None:
    model = tiny("llama").train()

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("prunekit.llm.oneshot.prune_layer", boom)
    with pytest.raises(RuntimeError, match="boom"):
        llm.prune(model, ids(), method="wanda", progress=False)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(m.training for m in model.modules())


class NoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(input_ids))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"sparsity": 1.5}, InvalidSparsityError, r"sparsity=1.5 is not a fraction"),
        ({"sparsity": "half"}, InvalidSparsityError, r"'half' is neither"),
        ({"sparsity": "2:4-2d"}, InvalidSparsityError, r"'2:4-2d': the one-shot LLM methods"),
        ({"sparsity": "3:7"}, IncompatibleLayerError, r"model.layers.0.self_attn.q_proj.*M=7"),
        ({"method": "obs"}, UnknownChoiceError, r"unknown method 'obs'"),
        ({"allocation": "erk"}, UnknownChoiceError, r"unknown allocation 'erk'"),
        ({"sparsity": "2:4", "allocation": "owl"}, PruningError, r"N:M \(2:4\) fixes"),
        ({"calibration": torch.full((2, 5), VOCAB)}, CalibrationError, r"ids 64..64.*0..63"),
        ({"calibration": []}, CalibrationError, r"calibration is empty"),
        ({"calibration": torch.rand(2, 5)}, CalibrationError, r"torch.float32, not token ids"),
        ({"calibration": [{"attention_mask": ids()}]}, CalibrationError, r"no 'input_ids'"),
        ({"blocks": "model.norm"}, UnsupportedModelError, r"blocks='model.norm'"),
    ],
)
def test_bad_input_raises_and_leaves_the_model_unchanged(kwargs, error, message) -> None:
    model = tiny("llama")
    before = snapshot(model)
    calibration = kwargs.pop("calibration", ids())
    with pytest.raises(error, match=message):
        llm.prune(model, calibration, progress=False, **kwargs)
    assert_unchanged(model, before)


def test_model_without_blocks_raises_unsupported() -> None:
    model = NoBlocks()
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"NoBlocks has no nn\.ModuleList"):
        llm.prune(model, ids(), progress=False)
    assert_unchanged(model, before)


def test_malloc_trim_is_looked_up_on_first_use_without_a_subprocess(monkeypatch) -> None:
    """Importing :mod:`prunekit.llm.memory` (every ``import prunekit.llm``) spawns nothing
    (``ctypes.util.find_library`` runs ldconfig); glibc's ``malloc_trim`` is still found."""
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    spawned: list[object] = []

    def popen(*args: object, **kwargs: object) -> None:
        spawned.append(args)
        raise OSError("no process may start here")

    monkeypatch.setattr(subprocess, "Popen", popen)
    importlib.reload(memory)
    memory.release()
    assert spawned == []
    assert (memory._libc_trim() is not None) == glibc
