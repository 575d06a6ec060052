"""BatchNorm folding: exact in eval mode, refused in train mode or on masked layers, and
only where the BatchNorm is its producer's sole consumer."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_unchanged, snapshot
from structured_models import randomize_norms
from torch import Tensor, nn

import prunekit as pk
from prunekit.errors import IncompatibleLayerError, UnsupportedModelError
from prunekit.structured import fold_batchnorm

X = torch.randn(2, 3, 12, 12)


class Block(nn.Module):
    """conv1 -> bn1 in attributes (not a Sequential), conv2's output used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.seq = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.BatchNorm2d(8))
        self.fc, self.bn3 = nn.Linear(8, 4), nn.BatchNorm1d(4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        y = self.conv2(x)
        x = self.seq(self.bn2(y) + y)
        return self.bn3(self.fc(x.mean((2, 3))))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(Block()).eval()


def _out(model: nn.Module) -> Tensor:
    with torch.no_grad():
        return model(X)


def test_traced_fold_is_exact_and_skips_shared_outputs():
    model = _model()
    folded = copy.deepcopy(model)
    report = fold_batchnorm(folded, X)
    assert sorted(report.folded) == [("conv1", "bn1"), ("fc", "bn3"), ("seq.0", "seq.1")]
    assert isinstance(folded.bn2, nn.BatchNorm2d)  # conv2's output also feeds the sum
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.seq[1], nn.Identity)
    torch.testing.assert_close(_out(folded), _out(model), atol=1e-5, rtol=0)


def test_without_inputs_only_sequential_pairs_fold():
    model = _model()
    folded = copy.deepcopy(model)
    assert fold_batchnorm(folded).folded == [("seq.0", "seq.1")]
    torch.testing.assert_close(_out(folded), _out(model), atol=1e-5, rtol=0)


def test_folded_model_still_shrinks_exactly():
    model = randomize_norms(nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3)
    )).eval()  # fmt: skip
    fold_batchnorm(model)
    report = pk.shrink(model, X, ratio=0.5)
    assert report.deviation is not None and report.deviation < 1e-4


def test_batchnorm_without_running_stats_is_skipped_with_the_reason():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    model.eval()
    report = fold_batchnorm(model)
    assert report.folded == [] and "track_running_stats=False" in report.skipped[0]


def test_train_mode_is_refused_and_nothing_changes():
    model = _model().train()
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"training mode.*model\.eval\(\)"):
        fold_batchnorm(model, X)
    assert_unchanged(model, before)


def test_masked_layer_is_refused_and_nothing_changes():
    model = _model()
    pk.prune(model, sparsity=0.5, granularity="filter", layers=["conv1"])
    before = snapshot(model)
    with pytest.raises(IncompatibleLayerError, match=r"conv1.*pk\.bake"):
        fold_batchnorm(model)
    assert_unchanged(model, before)
