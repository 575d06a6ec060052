"""Python's cyclic garbage collector paused while :func:`prunekit.shrink` works.

Tracing, planning and removal allocate tens of thousands of small objects that stay
alive until the call returns (records, labels, index tensors: a torch tensor is a
container to the collector). Every 700 allocations CPython's collector scans the young
ones, and every ~10 scans the older ones too: on MobileNetV2 that was 15 young and one
older collection per call, ~4 ms of a 77 ms call (measured with ``gc.callbacks``), all
of it scanning objects still in use. Paused, nothing is scanned; what the call leaves is
freed by reference counting when it returns, and any cycle among it by the next
collection once the collector runs again. Only the library's own work is paused: the
user's data loop (``data=``: their batches, model and loss, many passes) runs with the
collector as the caller had it (:func:`as_caller`). ``timeit`` pauses it the same way.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")
_CALLER: ContextVar[bool | None] = ContextVar("collector_on_entry", default=None)


@contextmanager
def paused() -> Iterator[None]:
    """The collector disabled inside; re-enabled on exit (error or not) if it was on.
    Nested pauses keep the outermost caller's state for :func:`as_caller`."""
    was = gc.isenabled()
    outer = _CALLER.get()
    token = _CALLER.set(was if outer is None else outer)
    gc.disable()
    try:
        yield
    finally:
        _CALLER.reset(token)
        if was:
            gc.enable()


def pausing(func: Callable[P, R]) -> Callable[P, R]:
    """``func`` run :func:`paused`."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with paused():
            return func(*args, **kwargs)

    return wrapper


@contextmanager
def as_caller() -> Iterator[None]:
    """Inside a :func:`paused` call whose caller had the collector on: on inside, paused
    again on exit; anywhere else: nothing changes."""
    if not _CALLER.get() or gc.isenabled():
        yield
        return
    gc.enable()
    try:
        yield
    finally:
        gc.disable()


__all__ = ["as_caller", "paused", "pausing"]
