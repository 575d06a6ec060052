"""The pipelines under torch.distributed: two gloo processes train data-parallel and end
with the same masks as each other and as one process over the same global batches; only
rank 0 writes checkpoints, every rank resumes from them, and bad input fails on every rank
(or, without a process group, before anything is touched)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import assert_unchanged, snapshot
from ranks import run_ranks
from safetensors.torch import load_file, save_file
from torch import nn

from prunekit.errors import CheckpointError, DistributedError
from prunekit.training import (
    checkpoint,
    iterative_pruning,
    lottery,
    network_slimming,
    soft_filter_pruning,
)
from prunekit.zoo import SmallVGG, load_dataset

WORLD = 2
# 1293 training examples after the 10% validation split: batches of 256 end with 13.
LOTTERY = dict(
    rounds=2, rate=0.3, rewind=2, epochs=1, lr=1e-2, batch_size=256, seed=3, control=False,
    include_output=True,  # every layer, as the two masks below
)
ITERATIVE = dict(
    target=0.8, rounds=2, epochs=1, finetune_lr=1e-3, batch_size=256, scope="global",
    include_output=True,
)
X8 = torch.zeros(1, 1, 8, 8)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def vgg() -> SmallVGG:
    torch.manual_seed(0)
    return SmallVGG(in_channels=1, widths=(4, 8, 8))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


class Interrupt(Exception):
    """Raised after round 1's checkpoint, as a kill would stop the run there."""


def run_pipelines(rank: int, out: Path) -> None:
    digits = load_dataset("digits", flat=True)
    writes: list[str] = []
    atomic_write = checkpoint.atomic_write

    def counted(path: Path, data: bytes) -> None:
        writes.append(path.name)
        atomic_write(path, data)

    checkpoint.atomic_write = counted
    report = lottery(mlp, digits, checkpoint_dir=out / "lottery", **LOTTERY)
    save_file(state(report.model), out / f"lottery{rank}.safetensors")
    (out / f"history{rank}.json").write_text(json.dumps([vars(r) for r in report.rounds]))

    model = mlp()
    iterative_pruning(model, digits, checkpoint_dir=out / "iter", progress=False, **ITERATIVE)
    save_file(state(model), out / f"iter{rank}.safetensors")
    assert (writes == []) == (rank == 1), writes  # rank 0 writes, rank 1 never

    # A run stopped after round 1 and started again resumes from rank 0's checkpoint.
    save_round = checkpoint.save_round

    def stop_after_round_1(directory, round, *args, **kwargs):
        save_round(directory, round, *args, **kwargs)
        if round == 1:
            raise Interrupt

    checkpoint.save_round = stop_after_round_1
    with pytest.raises(Interrupt):
        lottery(mlp, digits, checkpoint_dir=out / "resume", **LOTTERY)
    checkpoint.save_round = save_round
    resumed = lottery(mlp, digits, checkpoint_dir=out / "resume", **LOTTERY)
    save_file(state(resumed.model), out / f"resumed{rank}.safetensors")

    digits_2d = load_dataset("digits")
    net = vgg()
    soft_filter_pruning(net, digits_2d, X8, ratio=0.5, epochs=1, batch_size=256)
    save_file(state(net), out / f"sfp{rank}.safetensors")

    # Bad input fails on every rank alike, without hanging or touching the model.
    if rank == 0:
        (out / "bad").mkdir()
        (out / "bad" / checkpoint.STATE).write_text('{"format": 1, "tensors": ')
    dist.barrier()
    fresh = mlp()
    before = snapshot(fresh)
    with pytest.raises(CheckpointError, match="corrupted"):
        lottery(fresh, digits, checkpoint_dir=out / "bad", **LOTTERY)
    with pytest.raises(DistributedError, match="end with one of 1, fewer than the 2 ranks"):
        lottery(fresh, digits, **{**LOTTERY, "batch_size": 2})
    assert_unchanged(fresh, before)

    # Rank 0 failing to write a checkpoint fails every rank, instead of leaving them waiting.
    if rank == 0:
        checkpoint.atomic_write = disk_full
    with pytest.raises(CheckpointError, match="could not write the round-1 checkpoint"):
        checkpoint.save(out / "full", 1, {"w": torch.zeros(1)}, {}, {}, sync=True)


def disk_full(path: Path, data: bytes) -> None:
    raise OSError(28, "No space left on device")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pipelines")
    run_ranks(run_pipelines, out, WORLD)
    return out


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", flat=True)


def masks_of(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.endswith(".packed")}


def assert_ranks_match_one_process(ranks: Path, name: str, single: dict) -> None:
    rank0, rank1 = (load_file(ranks / f"{name}{r}.safetensors") for r in range(WORLD))
    assert rank0.keys() == rank1.keys() == single.keys()
    assert len(masks_of(single)) == 2
    for key, packed in masks_of(single).items():
        assert torch.equal(rank0[key], packed), key
    for key, value in rank0.items():
        assert torch.equal(rank1[key], value), key  # the ranks agree bit for bit
        torch.testing.assert_close(value, single[key], rtol=1e-4, atol=1e-5)


def test_lottery_two_ranks_match_one_process(ranks: Path, digits) -> None:
    single = lottery(mlp, digits, distributed=False, **LOTTERY)
    assert_ranks_match_one_process(ranks, "lottery", state(single.model))
    history = json.loads((ranks / "history0.json").read_text())
    assert history == json.loads((ranks / "history1.json").read_text())
    assert [h["remaining"] for h in history] == [r.remaining for r in single.rounds]
    assert json.loads((ranks / "lottery" / checkpoint.STATE).read_text())["round"] == 2


def test_iterative_pruning_two_ranks_match_one_process(ranks: Path, digits) -> None:
    model = mlp()
    iterative_pruning(model, digits, progress=False, distributed=False, **ITERATIVE)
    assert_ranks_match_one_process(ranks, "iter", state(model))


def test_distributed_run_resumes_from_rank0_checkpoint(ranks: Path) -> None:
    for r in range(WORLD):
        resumed = load_file(ranks / f"resumed{r}.safetensors")
        uninterrupted = load_file(ranks / f"lottery{r}.safetensors")
        assert resumed.keys() == uninterrupted.keys()
        for key, value in uninterrupted.items():
            assert torch.equal(resumed[key], value), key


def test_soft_filter_pruning_ranks_shrink_alike(ranks: Path) -> None:
    rank0, rank1 = (load_file(ranks / f"sfp{r}.safetensors") for r in range(WORLD))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank1[k], v) for k, v in rank0.items())
    convs = [v.shape[0] for k, v in rank0.items() if k.endswith("weight") and v.dim() == 4]
    assert convs == [2, 4, 4]  # floor(0.5 * width) filters removed per family


@pytest.mark.parametrize("pipeline", ["lottery", "iterative", "sfp", "slimming"])
def test_distributed_required_without_process_group(tmp_path, digits, pipeline) -> None:
    assert not dist.is_initialized()
    model = vgg() if pipeline in ("sfp", "slimming") else mlp()
    before = snapshot(model)
    run = {
        "lottery": lambda: lottery(model, digits, checkpoint_dir=tmp_path, distributed=True),
        "iterative": lambda: iterative_pruning(
            model, digits, target=0.5, checkpoint_dir=tmp_path, distributed=True
        ),
        "sfp": lambda: soft_filter_pruning(
            model, load_dataset("digits"), X8, epochs=1, distributed=True
        ),
        "slimming": lambda: network_slimming(
            model, load_dataset("digits"), X8, epochs=1, distributed=True
        ),
    }[pipeline]
    with pytest.raises(DistributedError, match=r"call torch\.distributed\.init_process_group"):
        run()
    assert_unchanged(model, before)
    assert list(tmp_path.iterdir()) == []
