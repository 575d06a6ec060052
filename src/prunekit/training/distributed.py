"""Identical masks on every rank under ``torch.distributed`` (DDP, launched with torchrun).

A :class:`~prunekit.Pruner` in a process group calls its :class:`MaskSync` hook, that is
:func:`sync_masks`, after every :func:`prunekit.prune`: rank 0's packed mask buffers are
broadcast to all ranks, so every rank holds exactly rank 0's masks. Nothing else is sent:
the weights are DDP's business.

The pipelines (:func:`~prunekit.training.lottery`,
:func:`~prunekit.training.iterative_pruning`, soft filter pruning, network slimming) do
the same after each prune, and train through
:func:`~prunekit.training.loop.data_parallel`: every rank draws the same global batches
and computes its share, and rank 0 alone writes checkpoints, which every rank then reads
through :func:`broadcast_bytes`.

Why broadcast the decision rather than all-reduce the scores:

- it is cheap: one bit per weight, packed, in a single ``dist.broadcast``, against 32 bits
  per weight (or per group) for the scores;
- it is exact: an all-reduce sums floats in an order that depends on the backend and the
  world size, so two ranks (or two runs) could rank weights that tie within rounding
  differently and cut different weights; a broadcast copies bytes.

With DDP the weights are already identical on every rank (DDP broadcasts rank 0's at
construction and averages the gradients every step), so for magnitude-type criteria
(``magnitude``, ``l1``, ``l2``, ``random`` with the same seed) rank 0's decision is the one
each rank would have computed on its own. For data-driven criteria (``gradient``,
``taylor``) each rank scores its own ``data`` batches and rank 0's decision wins; give
every rank the same calibration batches to make it the decision of that data.

The buffers travel over the process group's device: CUDA for NCCL, CPU for gloo.

DDP must see the masks when it is built: a parametrization registered on a wrapped module
hides the weight's gradient from DDP's reducer, and the next iteration fails with
"Expected to have finished reduction in the prior iteration". So a distributed Pruner
registers an all-kept mask on each of its layers (:func:`register_masks`) when it is
built: build the Pruner, then wrap the model in DDP. Later prunes only AND into those
masks, and DDP's buffer broadcast then also carries rank 0's masks at every forward.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from prunekit.errors import DistributedError
from prunekit.layers import weight_param
from prunekit.masks import WeightMask, apply_mask, get_mask, mask_param

__all__ = [
    "MaskSync",
    "broadcast_bytes",
    "check_shares",
    "is_initialized",
    "is_writer",
    "register_masks",
    "resolve",
    "sync_buffers",
    "sync_masks",
]

_INIT_FIX = "Fix: call torch.distributed.init_process_group first (torchrun sets its environment)"


def is_initialized() -> bool:
    """Whether ``torch.distributed`` is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def resolve(distributed: bool | None) -> bool:
    """Whether to synchronise masks: ``None`` = when a process group is initialised,
    ``True`` = required (:class:`~prunekit.errors.DistributedError` if there is none),
    ``False`` = never."""
    if distributed is None:
        return is_initialized()
    if not isinstance(distributed, bool):
        raise DistributedError(
            f"distributed={distributed!r} is not True, False or None; Fix: pass one of them."
        )
    if distributed and not is_initialized():
        raise DistributedError(
            "distributed=True but torch.distributed has no initialised process group; "
            f"{_INIT_FIX}, or pass distributed=None to synchronise only when there is one."
        )
    return distributed


def register_masks(modules: Iterable[nn.Module]) -> None:
    """Register an all-kept mask on each of ``modules`` that has none, so that a DDP
    wrapper built afterwards sees the mask parametrizations (see the module docstring)."""
    for module in modules:
        if get_mask(module) is None:
            apply_mask(module, torch.ones_like(weight_param(module), dtype=torch.bool))


def _masks(model: nn.Module) -> dict[str, WeightMask]:
    """Every mask parametrization of ``model``, by the name of the module it masks."""
    return {
        name: p for name, module in model.named_modules() if (p := mask_param(module)) is not None
    }


def _comm_device() -> torch.device:
    """The device the default process group communicates on (CUDA for NCCL)."""
    if "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _packed_bytes(module: nn.Module) -> int | None:
    """Bytes a packed mask of ``module.weight`` takes, or None if it has no weight."""
    try:
        return (weight_param(module).numel() + 7) // 8
    except AttributeError:
        return None


def sync_masks(model: nn.Module, src: int = 0) -> int:
    """Give every rank ``src``'s masks; returns the number of masks synchronised.

    A collective: every rank of the default process group must call it, with the same
    ``src``. A rank lacking a mask where ``src`` has one gets it; a rank whose model
    disagrees with ``src`` (a layer missing, a different weight size, a mask where ``src``
    has none) raises :class:`~prunekit.errors.DistributedError` on every rank, before any
    mask is touched.

    Args:
        model: the model each rank trains (the module wrapped in DDP, or the wrapper).
        src: the rank whose masks win.
    """
    if not is_initialized():
        raise DistributedError(f"sync_masks needs a torch.distributed process group; {_INIT_FIX}.")
    local = _masks(model)
    layout = [[(name, p.packed.numel()) for name, p in local.items()]]
    dist.broadcast_object_list(layout, src=src)
    wanted: list[tuple[str, int]] = layout[0]
    modules = dict(model.named_modules())
    problems = [f"{n!r} is masked but not on rank {src}" for n in local.keys() - dict(wanted)]
    problems += [
        f"{n!r} (rank {src}: {size} bytes)"
        for n, size in wanted
        if n not in modules or _packed_bytes(modules[n]) != size
    ]
    device = _comm_device()
    agree = torch.tensor([0 if problems else 1], dtype=torch.int32, device=device)
    dist.all_reduce(agree, op=dist.ReduceOp.MIN)
    if not agree.item():
        here = f"; on this rank: {', '.join(problems)}" if problems else ""
        raise DistributedError(
            f"rank {dist.get_rank()}: the ranks' models disagree on the masked layers{here}; "
            "Fix: build the same model on every rank and prune it with the same Pruner."
        )
    if not wanted:
        return 0
    for name, _ in wanted:
        if name not in local:
            register_masks([modules[name]])
    masks = _masks(model)
    flat: Tensor = torch.cat([masks[n].packed.reshape(-1).to(device) for n, _ in wanted])
    dist.broadcast(flat, src=src)
    for (name, _), chunk in zip(wanted, flat.split([s for _, s in wanted]), strict=True):
        masks[name].packed.copy_(chunk.view_as(masks[name].packed))
    return len(wanted)


def is_writer(sync: bool) -> bool:
    """Whether this process writes files and shows progress: always when not ``sync``,
    else rank 0 only."""
    return not sync or dist.get_rank() == 0


def broadcast_bytes(chunks: Sequence[bytes] | None, count: int, src: int = 0) -> list[bytes]:
    """``src``'s ``count`` byte strings on every rank (the others pass None): the lengths,
    then the bytes, in two ``dist.broadcast`` calls. A collective, like :func:`sync_masks`."""
    device = _comm_device()
    mine = dist.get_rank() == src
    if mine and (chunks is None or len(chunks) != count):
        raise DistributedError(f"rank {src} must give {count} byte strings; Fix: pass them.")
    sizes = torch.tensor([len(c) for c in chunks] if mine else [0] * count, device=device)
    dist.broadcast(sizes, src=src)
    joined = b"".join(chunks) if mine else b""
    flat = (
        torch.frombuffer(bytearray(joined), dtype=torch.uint8).to(device)
        if mine and joined
        else torch.empty(int(sizes.sum()), dtype=torch.uint8, device=device)
    )
    dist.broadcast(flat, src=src)
    return [c.cpu().numpy().tobytes() for c in flat.split(sizes.tolist())]


def sync_buffers(model: nn.Module, src: int = 0) -> None:
    """Give every rank ``src``'s buffers (BatchNorm statistics, masks): DDP broadcasts them
    before each forward, so after the last one each rank holds its own shard's statistics."""
    device = _comm_device()
    for buffer in model.buffers():
        moved = buffer.to(device)
        dist.broadcast(moved, src=src)
        buffer.copy_(moved)


def check_shares(n: int, batch_size: int) -> None:
    """Raise :class:`~prunekit.errors.DistributedError` unless every batch of ``batch_size``
    drawn from ``n`` examples (the short last one included) gives every rank an example."""
    world = dist.get_world_size()
    last = n % batch_size or batch_size
    if min(batch_size, last) < world:
        raise DistributedError(
            f"batches of {batch_size} from {n} examples end with one of {last}, fewer than the "
            f"{world} ranks, so a rank would get no example; Fix: a batch_size >= {world} whose "
            f"remainder n % batch_size is 0 or >= {world}."
        )


@dataclass(frozen=True)
class MaskSync:
    """The hook a :class:`~prunekit.Pruner` calls to keep masks identical across ranks:
    :meth:`register` (all-kept masks that DDP must see, before it wraps the model) when
    it is built, and ``hook(model)`` (:func:`sync_masks` from rank ``src``) after every
    prune. :meth:`resolve` gives one for ``distributed=``, or None."""

    src: int = 0

    @staticmethod
    def resolve(distributed: bool | None) -> MaskSync | None:
        """A ``MaskSync`` when masks must be synchronised (:func:`resolve`), else None."""
        return MaskSync() if resolve(distributed) else None

    def register(self, modules: Iterable[nn.Module]) -> None:
        """:func:`register_masks`; a :class:`~prunekit.errors.DistributedError` before any
        module is touched when there is no process group (nothing to agree with)."""
        if not is_initialized():
            raise DistributedError(
                f"MaskSync needs a torch.distributed process group; {_INIT_FIX}."
            )
        register_masks(modules)

    def __call__(self, model: nn.Module) -> None:
        """:func:`sync_masks` from rank ``src``."""
        sync_masks(model, self.src)
