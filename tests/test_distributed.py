"""Pruning under torch.distributed: two gloo processes on localhost end with rank 0's masks,
the same masks (and weights) as one process over the same global batch, and distributed
pruning without a process group fails before anything is touched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import assert_unchanged, snapshot
from ranks import run_ranks
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from prunekit.errors import DistributedError
from prunekit.masks import get_mask
from prunekit.pruner import Pruner
from prunekit.schedules import Iterative, OneShot
from prunekit.training import sync_masks
from prunekit.training.distributed import MaskSync, register_masks

WORLD = 2
STEPS = 6
GLOBAL_BATCH = 16


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)
    )


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 8, generator=g), torch.randint(
        0, 4, (GLOBAL_BATCH,), generator=g
    )


def train_pruned(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Train with a Pruner on this rank's share of every global batch; the state dict."""
    model = make_mlp()
    sync = MaskSync.resolve(None)  # under the process group only
    pruner = Pruner(model, target=0.8, schedule=Iterative(steps=3, every=2), sync=sync,
                    scope="global", include_output=True)  # pre-DDP; every layer
    net = DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    share = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = global_batch(step)
        x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
    assert pruner.sparsity == pytest.approx(0.8, abs=1e-3)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def worker(rank: int, out: Path) -> None:
    save_file(train_pruned(rank, WORLD), out / f"ddp{rank}.safetensors")
    # Ranks whose weights differ (no DDP): the Pruner still leaves rank 0's masks everywhere.
    model = make_mlp(seed=rank)
    Pruner(model, target=0.5, sync=MaskSync(), scope="global", include_output=True).step()
    assert sync_masks(model) == 3  # already equal: a no-op that still agrees
    masks = {name: get_mask(m) for name, m in model.named_modules() if get_mask(m) is not None}
    save_file({k: v.to(torch.uint8) for k, v in masks.items()}, out / f"own{rank}.safetensors")
    # Models that disagree on the masked layers: an error on every rank, no hang.
    odd = make_mlp()
    if rank == 1:
        register_masks([odd[0]])
    with pytest.raises(DistributedError, match="disagree on the masked layers"):
        sync_masks(odd)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ranks")
    run_ranks(worker, out, WORLD)
    return out


def masks_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith(".packed")}


def test_two_ranks_match_each_other_and_one_process(ranks: Path) -> None:
    rank0, rank1 = (load_file(ranks / f"ddp{r}.safetensors") for r in range(WORLD))
    single = train_pruned(rank=0, world=1)
    assert len(masks_of(single)) == 3
    for key, packed in masks_of(single).items():
        assert torch.equal(rank0[key], rank1[key]), key
        assert torch.equal(rank0[key], packed), key
    for key, value in single.items():
        torch.testing.assert_close(rank0[key], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank1[key], rank0[key], rtol=0, atol=0)


def test_ranks_that_disagree_end_with_rank0_masks(ranks: Path) -> None:
    own0, own1 = (load_file(ranks / f"own{r}.safetensors") for r in range(WORLD))
    alone = make_mlp(seed=1)  # what rank 1 would have pruned on its own
    Pruner(alone, target=0.5, sync=False, scope="global", include_output=True).step()
    differs = False
    for name, mask in own0.items():
        assert torch.equal(own1[name], mask), name
        differs |= not torch.equal(get_mask(alone.get_submodule(name)).to(torch.uint8), mask)
    assert differs, "rank 1 alone prunes differently, so the test would not see a missing sync"


def test_distributed_required_without_process_group_raises() -> None:
    assert not dist.is_initialized()
    model = make_mlp()
    before = snapshot(model)
    fix = r"call torch\.distributed\.init_process_group first"
    with pytest.raises(DistributedError, match=fix):
        Pruner(model, target=0.5, schedule=OneShot(), sync=MaskSync.resolve(True))
    with pytest.raises(DistributedError, match=fix):
        Pruner(model, target=0.5, schedule=OneShot(), sync=MaskSync())
    assert_unchanged(model, before)
    with pytest.raises(DistributedError, match="init_process_group"):
        sync_masks(model)
    assert_unchanged(model, before)
    Pruner(model, target=0.5, sync=MaskSync.resolve(None)).step()  # no process group: plain
    assert get_mask(model[0]) is not None
