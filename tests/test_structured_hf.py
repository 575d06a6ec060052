"""transformers architectures through pk.shrink (issue 17, item 6): vision and text configs
built offline at tiny sizes with random weights, each shrunk exactly at two ratios (the
check inside pk.shrink compares the shrunk model with the group-masked one relative to
the outputs' scale), the LayerNorm-normalised ones also in approximate mode (within the
deviation it reported), then run forward and backward in train and in eval mode.

A model prunekit refuses is listed in :data:`REFUSED` with the reason, and the test
asserts that refusal: nothing is skipped silently."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import prunekit as pk
from prunekit.inputs import call
from prunekit.structured import build, plan, score
from prunekit.structured.state import approximate_norms
from prunekit.structured.surgery import group_masked

T = pytest.importorskip("transformers")
Batch = dict[str, Tensor]


def image(size: int = 32) -> Batch:
    return {"pixel_values": torch.randn(2, 3, size, size)}


def text() -> Batch:
    return {"input_ids": torch.randint(0, 64, (2, 8))}


VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
           num_attention_heads=4, intermediate_size=64, num_labels=5)  # fmt: skip
STAGES = dict(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5)
SWIN = dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
            window_size=4, num_labels=5)  # fmt: skip
TEXT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64)  # fmt: skip
LEVIT = dict(image_size=64, patch_size=16, hidden_sizes=[32, 48], num_attention_heads=[2, 3],
             depths=[1, 1], key_dim=[8, 8], drop_path_rate=0, mlp_ratio=[2, 2],
             attention_ratio=[2, 2], down_ops=[["Subsample", 8, 2, 4, 2, 2]],
             num_labels=5)  # fmt: skip
MOBILE = dict(num_channels=3, image_size=32, depth_multiplier=0.25, num_labels=5)

MODELS: dict[str, Callable[[], tuple[nn.Module, Batch]]] = {
    "resnet": lambda: (T.ResNetForImageClassification(T.ResNetConfig(
        embedding_size=16, layer_type="bottleneck", **STAGES)), image()),
    "convnext": lambda: (T.ConvNextForImageClassification(T.ConvNextConfig(
        num_stages=2, layer_scale_init_value=1.0, **STAGES)), image()),
    "convnextv2": lambda: (T.ConvNextV2ForImageClassification(T.ConvNextV2Config(
        num_stages=2, **STAGES)), image()),
    "mobilenet_v1": lambda: (T.MobileNetV1ForImageClassification(
        T.MobileNetV1Config(**MOBILE)), image()),
    "mobilenet_v2": lambda: (T.MobileNetV2ForImageClassification(
        T.MobileNetV2Config(**MOBILE)), image()),
    "efficientnet": lambda: (T.EfficientNetForImageClassification(T.EfficientNetConfig(
        num_channels=3, image_size=32, width_coefficient=0.25, depth_coefficient=0.25,
        hidden_dim=320, num_labels=5)), image()),
    "regnet": lambda: (T.RegNetForImageClassification(T.RegNetConfig(
        embedding_size=16, groups_width=8, **STAGES)), image()),
    "swin": lambda: (T.SwinForImageClassification(T.SwinConfig(**SWIN)), image()),
    "swinv2": lambda: (T.Swinv2ForImageClassification(T.Swinv2Config(**SWIN)), image()),
    "vit": lambda: (T.ViTForImageClassification(T.ViTConfig(**VIT)), image()),
    "deit": lambda: (T.DeiTForImageClassification(T.DeiTConfig(**VIT)), image()),
    "beit": lambda: (T.BeitForImageClassification(T.BeitConfig(
        use_relative_position_bias=True, **VIT)), image()),
    "dinov2": lambda: (T.Dinov2ForImageClassification(T.Dinov2Config(
        mlp_ratio=2, **{k: v for k, v in VIT.items() if k != "intermediate_size"})), image()),
    "levit": lambda: (T.LevitForImageClassification(T.LevitConfig(**LEVIT)), image(64)),
    "mobilevit": lambda: (T.MobileViTForImageClassification(T.MobileViTConfig(
        image_size=32, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
        num_labels=5)), image()),
    "bert": lambda: (T.BertForSequenceClassification(T.BertConfig(num_labels=3, **TEXT)), text()),
    "gpt2": lambda: (T.GPT2LMHeadModel(T.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16)), text()),
    "llama": lambda: (T.LlamaForCausalLM(T.LlamaConfig(
        num_key_value_heads=2, max_position_embeddings=16, **TEXT)), text()),
}  # fmt: skip

REFUSED: dict[str, tuple[type[Exception], str]] = {}
"""Architectures pk.shrink refuses: name -> (error, words of its message). Empty today."""

KEPT_WHOLE = {
    "convnextv2": "GRN divides every channel by the mean over all channels of their spatial "
    "norms, and LayerNorms normalise the rest: no channel can go exactly (approximate mode "
    "removes them)",
}
"""Architectures pk.shrink runs on but, exactly, can remove nothing from: name -> why."""

APPROXIMATE = ["beit", "bert", "convnext", "convnextv2", "deit", "dinov2", "gpt2", "llama",
               "swin", "vit"]  # fmt: skip
"""LayerNorm-normalised residual streams: their hidden size shrinks only in approximate mode."""


def build_model(name: str) -> tuple[nn.Module, Batch]:
    torch.manual_seed(0)
    model, batch = MODELS[name]()
    return model.eval(), batch


def logits(model: nn.Module, batch: Batch) -> Tensor:
    return call(model, batch).logits


def runs_in_both_modes(model: nn.Module, batch: Batch) -> None:
    """Forward and backward in train and in eval mode; gradients fit their parameters."""
    for training in (True, False):
        model.train(training)
        logits(model, batch).float().square().mean().backward()
        for name, p in model.named_parameters():
            assert p.grad is None or p.grad.shape == p.shape, name
        model.zero_grad()
    model.eval()


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.mark.parametrize("ratio", [0.25, 0.5])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_shrinks_exactly_and_trains(name: str, ratio: float) -> None:
    model, batch = build_model(name)
    if name in REFUSED:
        error, words = REFUSED[name]
        with pytest.raises(error, match=words):
            pk.shrink(model, batch, ratio)
        return
    report = pk.shrink(model, batch, ratio)
    assert report.exact and report.deviation is not None and report.deviation <= 1e-4
    if name in KEPT_WHOLE:
        assert report.families == [] and report.params_after == report.params_before
        return runs_in_both_modes(model, batch)
    assert report.params_after < report.params_before
    assert report.macs_after < report.macs_before
    runs_in_both_modes(model, batch)


@pytest.mark.parametrize("name", APPROXIMATE)
def test_approximate_mode_is_within_its_reported_deviation(name: str) -> None:
    model, batch = build_model(name)
    with approximate_norms():
        graph = build(model, batch)
    decisions = plan(graph, score(model, graph, "l2"), 0.5)
    masked = group_masked(model, graph, {d.name: d.removed for d in decisions if d.removed})
    exact = pk.shrink(copy.deepcopy(model), batch, 0.5)
    with torch.no_grad():
        dense = logits(model, batch)
    report = pk.shrink(model, batch, 0.5, approximate=True)
    assert not report.exact and any(n.startswith("APPROXIMATE") for n in report.notes)
    assert report.macs_after < exact.macs_after  # the hidden size went too
    with torch.no_grad():
        ref, got = logits(masked, batch), logits(model, batch)
    scale = max(ref.abs().max().item(), dense.abs().max().item())  # as pk.shrink's
    assert (got - ref).abs().max().item() <= report.deviation * scale * (1 + 1e-4) + 1e-12
    runs_in_both_modes(model, batch)
