"""Run a function on several gloo ranks on localhost, for the torch.distributed tests."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[[int, Path], None], store: str, out: str, world: int) -> None:
    torch.set_num_threads(1)
    # a file store: no rank hosts it, so none can take it down while a peer still tears
    # down its process group (with a TCP store on rank 0 that aborted rank 1 at times)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, Path(out))
        # gloo: a rank that leaves while a peer still receives its last broadcast aborts it.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # The work is done and written: leave without the interpreter's teardown, where gloo's
    # transport threads, destroyed still joinable, aborted rank 0 at times in full runs
    # under load (SIGABRT, "terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable[[int, Path], None], out: Path, world: int = 2) -> None:
    """``fn(rank, out)`` in ``world`` spawned processes of one gloo process group; an
    exception (a failed assertion) on any rank fails the caller. ``fn`` must be a
    module-level function, so that the spawned processes can import it."""
    with tempfile.TemporaryDirectory() as folder:
        store = str(Path(folder) / "store")
        mp.spawn(_entry, args=(fn, store, str(out), world), nprocs=world, join=True)
