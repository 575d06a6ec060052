"""Every over-time pipeline on the user's own data and loop: a DataLoader over a
TensorDataset, an HF ``datasets.Dataset``, a training step of one's own; a resumed run
over a shuffled DataLoader equals an uninterrupted one bit for bit."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import killed_after_round
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunekit as pk
from prunekit.training import checkpoint

N, D, C = 96, 8, 3


def mlp() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, C)]
    return nn.Sequential(*layers)


def conv_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, C),
    )  # fmt: skip


def tensors(shape: tuple[int, ...] = (D,)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, *shape, generator=g), torch.randint(0, C, (N,), generator=g)


def loader(shape: tuple[int, ...] = (D,), generator: bool = False) -> DataLoader:
    gen = torch.Generator() if generator else None
    return DataLoader(TensorDataset(*tensors(shape)), batch_size=16, shuffle=True, generator=gen)


def evaluate(data: DataLoader):
    return lambda model: pk.training.accuracy(model, data)


def kept(model: nn.Module) -> list[float]:
    return [round(1 - r.sparsity, 4) for r in pk.sparsity(model).layers]


def test_lottery_on_a_dataloader():
    data = loader()
    report = pk.training.lottery(mlp, data, rounds=2, rate=0.5, epochs=1, control=False,
                                 evaluate=evaluate(data), validate=evaluate(data))  # fmt: skip
    assert [r.round for r in report.rounds] == [0, 1, 2]
    assert kept(report.model)[:2] == [0.25, 0.25]  # (1 - 0.5) ** 2 per hidden layer


def test_iterative_pruning_on_a_dataloader():
    data, model = loader(), mlp()
    report = pk.training.iterative_pruning(model, data, target=0.5, rounds=2, epochs=1,
                                           evaluate=evaluate(data), progress=False)  # fmt: skip
    assert report.rounds[-1].sparsity == pytest.approx(0.5, abs=1e-2)


def test_train_with_pruner_on_a_dataloader():
    data, model = loader(), mlp()
    pruner = pk.Pruner(model, target=0.5, schedule=pk.schedules.OneShot(at=3), scope="local")
    losses = pk.training.train_with_pruner(model, data, pruner, epochs=1, lr=1e-3, progress=False)
    assert len(losses) == 1 and pruner.step_count == len(data)
    assert kept(model)[0] == pytest.approx(0.5, abs=1e-2)


def test_soft_filter_pruning_and_network_slimming_on_a_dataloader():
    data, x = loader((1, 4, 4)), torch.randn(2, 1, 4, 4)
    sfp = pk.training.soft_filter_pruning(conv_bn(), data, x, ratio=0.5, epochs=1,
                                          evaluate=evaluate(data))  # fmt: skip
    slim = pk.training.network_slimming(conv_bn(), data, x, ratio=0.5, epochs=1,
                                        finetune_epochs=1, evaluate=evaluate(data))  # fmt: skip
    for report in (sfp, slim):
        assert len(report.epoch_accuracy) >= 1


def dict_step(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"].float()), batch["y"].long())


def dict_accuracy(data):
    @torch.no_grad()
    def score(model: nn.Module) -> float:
        hits = sum((model(b["x"].float()).argmax(-1) == b["y"]).sum().item() for b in data)
        return hits / N

    return score


def test_custom_step_on_dict_batches():
    x, y = tensors()
    data = [{"x": x[i : i + 32], "y": y[i : i + 32]} for i in range(0, N, 32)]
    model = mlp()
    report = pk.training.iterative_pruning(model, data, target=0.5, rounds=1, epochs=1,
                                           step=dict_step, evaluate=dict_accuracy(data),
                                           progress=False)  # fmt: skip
    assert report.rounds[-1].sparsity == pytest.approx(0.5, abs=1e-2)


def test_hf_datasets_dataset_through_a_dataloader():
    datasets = pytest.importorskip("datasets")
    x, y = tensors()
    table = datasets.Dataset.from_dict({"x": x.tolist(), "y": y.tolist()}).with_format("torch")
    data = DataLoader(table, batch_size=16, shuffle=True)
    report = pk.training.lottery(mlp, data, rounds=1, rate=0.5, epochs=1, control=False,
                                 step=dict_step, evaluate=dict_accuracy(data),
                                 validate=dict_accuracy(data))  # fmt: skip
    assert kept(report.model)[0] == 0.5


@pytest.mark.parametrize("generator", [False, True], ids=["global-rng", "own-generator"])
def test_resumed_lottery_on_a_shuffled_dataloader_is_bit_exact(tmp_path, caplog, generator):
    def run(directory, global_seed=123):
        torch.manual_seed(global_seed)  # what a generator-less DataLoader shuffles from
        data = loader(generator=generator)
        return pk.training.lottery(mlp, data, rounds=3, rate=0.5, epochs=2, control=False,
                                   evaluate=evaluate(data), validate=evaluate(data),
                                   checkpoint_dir=directory).model  # fmt: skip

    whole = run(tmp_path / "whole")
    with killed_after_round(1):
        run(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / checkpoint.STATE).read_text())["round"] == 1
    caplog.set_level(logging.INFO, logger="prunekit")
    resumed = run(tmp_path / "ckpt", global_seed=999)  # a new process: the checkpoint's RNG
    assert (
        f"lottery: resuming from round 2 of 3 (checkpoint {tmp_path / 'ckpt'})" in caplog.messages
    )
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
