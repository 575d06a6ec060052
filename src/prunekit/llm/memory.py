"""Peak memory of a code region: CUDA allocator peak, or the process's peak RSS on Linux.

On CPU the kernel's high-water mark ``VmHWM`` is reset at the start (writing ``5`` to
``/proc/self/clear_refs``, Linux >= 4.0) and read at the end; the figure is that peak minus
the resident size at the start, i.e. what the region added on top of the loaded model.
Where the reset is not permitted the figure is an upper bound (``source`` says so); off
Linux it is None.
"""

from __future__ import annotations

import ctypes
import functools
import re
import sys
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


@functools.cache
def _libc_trim() -> ctypes._CFuncPtr | None:
    """glibc's ``malloc_trim``, looked up on first use among the symbols the process has
    loaded (None elsewhere: other allocators return memory by themselves or offer no such
    call)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release() -> None:
    """Give the memory freed since the last call back to the kernel (glibc ``malloc_trim(0)``:
    free pages inside the heap too, not only at its top). Called after each block: without
    it, the blocks' freed tensors stay resident in glibc's heap (its mmap threshold rises
    to the size of the largest freed block), and a later block's tensors, which do not fit
    the holes, grow the process instead of reusing them."""
    trim = _libc_trim()
    if trim is not None:
        trim(0)


def _status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    return int(match[1]) * 1024 if match else 0


class PeakMemory:
    """``with PeakMemory(device) as peak: ...``; then ``peak.bytes`` (None if unmeasurable)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes: int | None = None
        self.source = "cuda allocator" if device.type == "cuda" else "process RSS"
        self._base = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif _STATUS.exists():
            self._base = _status_bytes("VmRSS")
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:  # the peak cannot be reset: it may predate this block
                self.source += ", upper bound"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif _STATUS.exists():
            self.bytes = max(0, _status_bytes("VmHWM") - self._base)
