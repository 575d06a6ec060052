"""Run a function on several gloo ranks on localhost, for the torch.distributed tests."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[[int, Path], None], port: int, out: str, world: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, Path(out))
        # gloo: a rank that leaves while a peer still receives its last broadcast aborts it.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[[int, Path], None], out: Path, world: int = 2) -> None:
    """``fn(rank, out)`` in ``world`` spawned processes of one gloo process group; an
    exception (a failed assertion) on any rank fails the caller. ``fn`` must be a
    module-level function, so that the spawned processes can import it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_entry, args=(fn, port, str(out), world), nprocs=world, join=True)
