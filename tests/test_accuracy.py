"""End to end on real data: LeNet-300-100 on the 5,000-image MNIST subset, 90% global magnitude."""

from __future__ import annotations

import copy

import pytest
import torch

import prunekit as pk
from prunekit.zoo import LeNet300100, evaluate, load_dataset, train

MARGIN = 0.02  # accuracy points the 90%-sparse, fine-tuned model may lose against dense


@pytest.mark.slow
def test_lenet300_prunes_to_90_percent_and_recovers_after_fine_tuning():
    data = load_dataset("mnist5k", flat=True)
    torch.manual_seed(0)
    model = LeNet300100()
    train(model, data, epochs=4, lr=1e-3, seed=0, progress=False)
    dense = evaluate(model, data.x_test, data.y_test)
    assert dense > 0.90

    pruned = copy.deepcopy(model)
    report = pk.prune(pruned, 0.9, scope="global")
    assert report.sparsity == pytest.approx(0.9, abs=1e-6)
    at_once = evaluate(pruned, data.x_test, data.y_test)
    train(pruned, data, epochs=2, lr=3e-4, seed=1, progress=False)
    finetuned = evaluate(pruned, data.x_test, data.y_test)

    assert pk.sparsity(pruned).total == pytest.approx(0.9, abs=1e-6)  # fine-tuning kept zeros
    assert finetuned >= dense - MARGIN, (dense, at_once, finetuned)
    assert finetuned >= at_once
