"""Head pruning inside nn.MultiheadAttention: whole heads leave the packed in-projection
and out_proj, num_heads follows, and the result computes what the head-masked model
computes under every mask and mode PyTorch's module takes."""

from __future__ import annotations

import copy

import pytest
import torch
from structured_models import assert_trains, masked_and_shrunk
from torch import nn

import prunekit as pk
from prunekit.structured import build
from prunekit.structured.mha import HeadPrunedMultiheadAttention


def encoder(batch_first: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_heads_are_pruned_exactly_under_every_mask(batch_first: bool) -> None:
    model = encoder(batch_first)
    x = torch.randn(2, 10, 32) if batch_first else torch.randn(10, 2, 32)
    masked, small, decisions = masked_and_shrunk(model, x, 0.5)
    heads = [(d.name, d.kept, d.total) for d in decisions if d.kind == "heads"]
    assert heads == [("layers.0.self_attn", 2, 4), ("layers.1.self_attn", 2, 4)]
    attn = small.layers[0].self_attn
    assert isinstance(attn, HeadPrunedMultiheadAttention) and attn.num_heads == 2
    assert attn.in_proj_weight.shape == (3 * 16, 32) and attn.out_proj.in_features == 16
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[:, -3:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(10)
    for kwargs in ({}, {"src_key_padding_mask": padding}, {"mask": causal, "is_causal": True},
                   {"mask": causal < 0}):  # fmt: skip
        with torch.no_grad():
            diff = (masked(x, **kwargs) - small(x, **kwargs)).abs().max()
        assert diff < 1e-5, kwargs
    assert_trains(small, x)


def test_attention_weights_and_unbatched_inputs() -> None:
    model = encoder()
    x = torch.randn(2, 10, 32)
    masked, small, _ = masked_and_shrunk(model, x, 0.5)
    a, b = masked.layers[0].self_attn, small.layers[0].self_attn
    with torch.no_grad():
        (ya, wa), (yb, wb) = a(x, x, x), b(x, x, x)
        assert (ya - yb).abs().max() < 1e-5 and wb.shape == wa.shape == (2, 10, 10)
        assert b(x, x, x, average_attn_weights=False)[1].shape == (2, 2, 10, 10)
        assert b(x, x, x, need_weights=False)[1] is None
        (ya, _), (yb, _) = a(x[0], x[0], x[0]), b(x[0], x[0], x[0])
        assert (ya - yb).abs().max() < 1e-5


def test_shrink_reports_heads_and_verifies() -> None:
    model, x = encoder(), torch.randn(2, 10, 32)
    dense = copy.deepcopy(model)
    report = pk.shrink(model, x, ratio=0.5)
    assert report.deviation is not None and report.deviation < 1e-5
    assert [(f.kind, f.kept) for f in report.families if f.kind == "heads"] == [("heads", 2)] * 2
    assert report.macs_after < report.macs_before
    assert type(dense.layers[0].self_attn) is nn.MultiheadAttention  # copies untouched


def test_unsupported_configurations_stay_whole() -> None:
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, kdim=8, vdim=8, batch_first=True)
            self.fc = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
            return self.fc(self.attn(x, memory, memory)[0])

    graph = build(Cross().eval(), (torch.randn(2, 5, 16), torch.randn(2, 7, 8)))
    assert not any(f.kind == "heads" for f in graph.families)
    biased = nn.MultiheadAttention(16, 4, add_bias_kv=True, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    assert not any(f.kind == "heads" for f in build(biased, (x, x, x)).families)


class PatchEncoder(nn.Module):
    """A ViT built from nn.TransformerEncoder after a patch embedding: the encoder layer
    reads ``x.is_nested`` of an intermediate tensor (metadata, no channel moves)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 4, 4)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.encoder(tokens).mean(1))


def test_an_encoder_after_a_patch_embedding_is_shrunk_exactly() -> None:
    torch.manual_seed(0)
    model, x = PatchEncoder().eval(), torch.randn(2, 3, 16, 16)
    masked, small, decisions = masked_and_shrunk(model, x, 0.5)
    assert {d.kind for d in decisions if d.removed} >= {"heads"}
    with torch.no_grad():
        assert (masked(x) - small(x)).abs().max() < 1e-5
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert_trains(small, x)
