"""The model matrix (issue 15, item 6): tiny 2-block configs of every supported decoder
family (MoE: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3), each pruned by
magnitude, Wanda and SparseGPT to exactly the stated sparsity on what it prunes (Linear /
Conv1D layers and fused MoE experts; embeddings, head, norms and routers stay dense), then
saved with ``save_pretrained`` and loaded with ``from_pretrained`` to the same tensors and
bit-identical logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from prunekit import llm
from prunekit.llm.blocks import find_blocks

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64
_ATTN = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4}
_GQA = {**_ATTN, "num_key_value_heads": 2}
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
CONFIGS: dict[str, dict[str, object]] = {
    "llama": _GQA,
    "mistral": _GQA,
    "qwen2": _GQA,
    "qwen3": {**_GQA, "head_dim": 8},
    "gemma": {**_GQA, "head_dim": 8},
    "gemma2": {**_GQA, "head_dim": 8, "query_pre_attn_scalar": 8},
    "gemma3_text": {**_GQA, "head_dim": 8, "query_pre_attn_scalar": 8},
    "phi": _ATTN,
    "phi3": {**_GQA, "pad_token_id": 0},
    "gpt2": {"n_embd": 32, "n_head": 4, "n_positions": 64},
    "opt": {"hidden_size": 32, "ffn_dim": 64, "num_attention_heads": 4,
            "word_embed_proj_dim": 32},
    "gpt_neox": _ATTN,
    "falcon": {"hidden_size": 32, "num_attention_heads": 4},
    "bloom": {"hidden_size": 32, "n_head": 4},
    "mixtral": {**_GQA, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {**_GQA, **_MOE, "shared_expert_intermediate_size": 48},
    "qwen3_moe": {**_GQA, **_MOE, "head_dim": 8},
    "olmoe": {**_ATTN, "num_experts": 4, "num_experts_per_tok": 2},
    "deepseek_v3": {**_ATTN, "moe_intermediate_size": 32, "n_routed_experts": 4,
                    "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
                    "first_k_dense_replace": 1, "n_shared_experts": 1, "q_lora_rank": 16,
                    "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                    "v_head_dim": 8},
}  # fmt: skip
"""Architecture (``model_type``) -> config overrides: hidden 32, 2 blocks."""


def tiny(arch: str) -> nn.Module:
    config = transformers.AutoConfig.for_model(
        arch, vocab_size=VOCAB, num_hidden_layers=2, **CONFIGS[arch]
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def pruned_tensor(model: nn.Module, record_name: str) -> torch.Tensor:
    """The tensor a report record names: a layer's weight, or expert ``e`` of a fused
    experts parameter (``...experts.down_proj.3``)."""
    head, _, last = record_name.rpartition(".")
    if last.isdigit():
        return model.get_parameter(head)[int(last)]
    return model.get_submodule(record_name).weight


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("arch", CONFIGS)
def test_prunes_to_the_target_and_round_trips(arch: str, method: str, tmp_path: Path) -> None:
    model = tiny(arch)
    embedding = model.get_input_embeddings().weight.detach().clone()
    calibration = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))
    report = llm.prune(model, calibration, method=method, sparsity=0.5, progress=False)
    _, blocks = find_blocks(model)
    assert report.sparsity == 0.5 and len(report.layers) >= 4 * len(blocks)
    for record in report.layers:
        zeros = (pruned_tensor(model, record.name) == 0).sum().item()
        assert record.sparsity == 0.5 and zeros == record.numel // 2, record.name
    for block in report.blocks:
        assert block.sparsity == 0.5 and 0.9 < block.share < 1, block
        assert all(not name.endswith(".parametrizations.weight.original") for name in block.dense)
    assert torch.equal(model.get_input_embeddings().weight, embedding)  # outside: dense
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    state, reloaded = model.state_dict(), loaded.state_dict()
    assert state.keys() == reloaded.keys()
    assert all(torch.equal(state[k], reloaded[k]) for k in state)
    x = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)
