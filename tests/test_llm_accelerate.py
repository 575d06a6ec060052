"""``pk.llm.prune`` on a model whose blocks accelerate offloads to disk: the same bits as
in memory, ``save_pretrained`` round trip, all-or-nothing on error (model as it was)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prunekit import llm
from prunekit.errors import IncompatibleLayerError, InvalidWeightError
from prunekit.llm import methods

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

DEVICE_MAP = {
    "model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk",
    "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
}  # fmt: skip
IDS = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=3, vocab_size=64,
    )  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def offloaded(checkpoint: Path, device_map: dict[str, str] = DEVICE_MAP) -> torch.nn.Module:
    """Block 0 resident on the CPU, the others and the embedding on disk (by default)."""
    folder = checkpoint.parent / "offload"
    return transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, device_map=device_map, offload_folder=folder
    )


def digest(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_offloaded_model_prunes_to_the_in_memory_bits(checkpoint: Path, method: str) -> None:
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    model = offloaded(checkpoint)
    source = digest(checkpoint)
    assert model.model.layers[1].mlp.up_proj.weight.is_meta
    expected = llm.prune(reference, IDS, method=method, sparsity=0.5, progress=False)
    report = llm.prune(model, IDS, method=method, sparsity=0.5, progress=False)
    assert [r.sparsity for r in report.layers] == [r.sparsity for r in expected.layers]
    assert [r.error for r in report.layers] == pytest.approx([r.error for r in expected.layers])
    assert model.model.layers[1].mlp.up_proj.weight.is_meta  # offloaded again
    assert torch.allclose(logits(model), logits(reference), atol=1e-6)
    model.save_pretrained(checkpoint.parent / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(checkpoint.parent / "out")
    state = reference.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert digest(checkpoint) == source  # the source checkpoint is never written
    assert not list((checkpoint.parent / "offload").glob("*.prunekit"))  # staging gone


def snapshot(model: torch.nn.Module, checkpoint: Path) -> tuple:
    hooks = [m._hf_hook for m in model.modules() if getattr(m, "_hf_hook", None) is not None]
    index = next(h.weights_map.dataset.index for h in hooks if h.weights_map is not None)
    metas = [n for n, p in model.named_parameters() if p.is_meta]
    offload = [getattr(h, "offload", None) for h in hooks]
    return json.dumps(index, sort_keys=True), metas, offload, digest(checkpoint.parent / "offload")


@pytest.mark.parametrize(
    ("options", "message"),
    [({"keep_masks": True}, "keep_masks=True"), ({"allocation": "owl"}, "allocation='owl'")],
)
def test_what_an_offloaded_model_cannot_do_is_refused_first(
    checkpoint: Path, options: dict, message: str
) -> None:
    model = offloaded(checkpoint)
    before, out = snapshot(model, checkpoint), logits(model)
    with pytest.raises(IncompatibleLayerError, match=message):
        llm.prune(model, IDS, method="wanda", sparsity=0.5, progress=False, **options)
    assert snapshot(model, checkpoint) == before and torch.equal(logits(model), out)


def test_a_failure_in_a_later_block_leaves_the_model_as_it_was(checkpoint: Path, monkeypatch):
    """Every block offloaded: all or nothing (a resident block is pruned in place, as in
    memory)."""
    model = offloaded(checkpoint, DEVICE_MAP | {"model.layers.0": "disk"})
    before, out = snapshot(model, checkpoint), logits(model)
    real = methods.solve

    def failing(method, weight, target, stats, name, **kwargs):
        if name.startswith("model.layers.2."):
            raise RuntimeError("boom")
        return real(method, weight, target, stats, name, **kwargs)

    monkeypatch.setattr(methods, "solve", failing)
    with pytest.raises(RuntimeError, match="boom"):
        llm.prune(model, IDS, method="sparsegpt", sparsity=0.5, progress=False)
    assert snapshot(model, checkpoint) == before
    assert torch.equal(logits(model), out)


def test_a_nan_in_an_offloaded_block_is_named_and_nothing_changes(checkpoint: Path) -> None:
    file = checkpoint / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.2.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})
    model = offloaded(checkpoint)
    before = snapshot(model, checkpoint)
    with pytest.raises(InvalidWeightError, match=r"model\.layers\.2\.mlp\.down_proj"):
        llm.prune(model, IDS, method="wanda", sparsity=0.5, progress=False)
    assert snapshot(model, checkpoint) == before
