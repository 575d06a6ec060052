"""What a model or a weight costs: the byte formulas of the storage formats and the one
MAC counter every part of prunekit uses.

==================  ===========================================================
CSR bytes           ``nnz * e + nnz * 4 + (rows + 1) * 4`` (values, int32 column
                    indices, int32 row pointers), ``e`` the element size in bytes
N:M bytes           ``numel * n / m * e + ceil(numel * n / m * ceil(log2 m) / 8)``
                    (the kept values, plus ``ceil(log2 m)`` index bits per kept value)
MACs                FLOPs / 2 of one forward pass, counted by
                    ``torch.utils.flop_counter.FlopCounterMode``
attention MACs      ``B * Hq * Lq * Lk * (E + Ev)`` for one fused
                    ``scaled_dot_product_attention`` (``Q K^T`` then ``A V``;
                    the softmax is not a MAC), whichever kernel runs it
batch norm MACs     0 (elementwise, as its decomposition counts): given by
                    :data:`BATCH_NORM_KERNELS`, so ``FlopCounterMode`` runs the
                    kernel instead of decomposing it into five operations
==================  ===========================================================

MACs are counted one way everywhere (:func:`macs_per_module`): the model in eval mode,
without gradients, and with the fused inference kernels of ``nn.MultiheadAttention`` and
``nn.TransformerEncoderLayer`` switched off (``torch.backends.mha``). Those kernels run
only without gradients and ``FlopCounterMode`` has no formula for them, so counting
through them would drop the attention products (``Q K^T`` and ``A V``) and make two
counts of one model depend on the mode they were taken in. Switched off, the modules
run the linear and matmul operations they are made of, each counted.

``FlopCounterMode`` knows the CUDA attention kernels but not the CPU ones
(``_scaled_dot_product_flash_attention_for_cpu``) nor the device-private one, which it
counts as 0 MACs; :data:`ATTENTION_KERNELS` gives them the attention formula above, so a
fused attention costs what its two matmuls cost on every device and in every mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    _get_current_dispatch_mode,
    _pop_mode_temporarily,
)
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from prunekit.cost_shortcuts import shortcut
from prunekit.errors import PruningError
from prunekit.inputs import Inputs, call, eval_mode


def csr_bytes(nnz: int, rows: int, elem_size: int) -> int:
    """Bytes of a CSR matrix: ``nnz * elem_size`` values + ``nnz * 4`` int32 column
    indices + ``(rows + 1) * 4`` int32 row pointers."""
    return nnz * elem_size + nnz * 4 + (rows + 1) * 4


def nm_bytes(numel: int, elem_size: int, n: int = 2, m: int = 4) -> int:
    """Bytes of ``numel`` weights stored N:M-compressed: the ``n`` kept values of every
    ``m``-group, ``numel * n / m * elem_size``, plus ``ceil(log2 m)`` index bits per kept
    value, ``ceil(numel * n / m * ceil(log2 m) / 8)``.

    Raises:
        PruningError: unless ``0 < n <= m`` and ``m`` divides ``numel``.
    """
    if not 0 < n <= m or numel % m:
        raise PruningError(
            f"N:M storage needs 0 < n <= m and m dividing numel; got n={n}, m={m}, "
            f"numel={numel}. Fix: pick m dividing the layer's reduction axis."
        )
    kept = numel // m * n
    index_bits = kept * (m - 1).bit_length()  # (m - 1).bit_length() == ceil(log2 m)
    return kept * elem_size + -(-index_bits // 8)


def _tracker_names(model: nn.Module) -> dict[nn.Module, str]:
    """The names ``FlopCounterMode`` (its ``ModuleTracker``) gives the modules of ``model``.

    The root is named after its class, children ``"<parent>.<child>"`` (``"Sequential.0"``
    for ``model[0]``, not ``"0"``); a module reachable by several paths keeps the last.
    """
    names: dict[nn.Module, str] = {}
    seen: set[nn.Module] = set()

    def visit(module: nn.Module, name: str) -> None:
        names[module] = name
        if module not in seen:
            seen.add(module)
            for child_name, child in module.named_children():
                visit(child, f"{name}.{child_name}")

    visit(model, type(model).__name__)
    return names


def attention_macs(
    query: torch.Size, key: torch.Size, value: torch.Size, *_: object, **__: object
) -> int:
    """MACs of ``softmax(Q K^T) V``: ``B * Hq * Lq * Lk * (E + Ev)``.

    ``query`` is ``(..., Hq, Lq, E)``, ``key`` ``(..., Hkv, Lk, E)``, ``value``
    ``(..., Hkv, Lk, Ev)``; grouped-query attention (``Hkv < Hq``) repeats the keys and
    values, so the cost follows the query heads. A causal mask is not discounted (the
    kernels compute the full product), as for ``FlopCounterMode``'s CUDA formulas.
    """
    batch = 1
    for size in query[:-2]:
        batch *= size
    return batch * query[-2] * key[-2] * (query[-1] + value[-1])


def _attention_flops(
    query: torch.Size, key: torch.Size, value: torch.Size, *_: object, **__: object
) -> int:
    return 2 * attention_macs(query, key, value)


ATTENTION_KERNELS = tuple(
    getattr(torch.ops.aten, name)
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_fused_attention_overrideable",
    )
    if hasattr(torch.ops.aten, name)
)
BATCH_NORM_KERNELS = tuple(
    getattr(torch.ops.aten, name)
    for name in ("native_batch_norm", "_native_batch_norm_legit",
                 "_native_batch_norm_legit_no_training")
    if hasattr(torch.ops.aten, name)
)  # fmt: skip


def _no_flops(*_: object, **__: object) -> int:
    return 0


_COUNTED_KERNELS = {
    **{kernel: _attention_flops for kernel in ATTENTION_KERNELS},
    **{kernel: _no_flops for kernel in BATCH_NORM_KERNELS},
    # FlopCounterMode decomposes an overload missing from its table: list them too
    **{getattr(k, o): _no_flops for k in BATCH_NORM_KERNELS for o in k.overloads()},
}


@contextmanager
def unfused_attention() -> Iterator[None]:
    """Run ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` as their composite
    operations (see the module docstring); restore the previous setting afterwards."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _shapes(x: object) -> object:
    """``x`` with every tensor replaced by its shape, as ``flop_counter.shape_wrapper``
    does with a ``tree_map`` (a tenth of a millisecond per operation; this is a loop)."""
    if isinstance(x, torch.Tensor):
        return x.shape
    if isinstance(x, list | tuple):
        found = [i.shape if isinstance(i, torch.Tensor) else _shapes(i) for i in x]
        return found if isinstance(x, list) else tuple(found)
    if isinstance(x, dict):
        return {k: _shapes(v) for k, v in x.items()}
    return x


# operation -> (formula, whether it takes shapes): torch's shape-wrapped formulas unwrapped;
# batch norm has no formula (None: 0 MACs, and not decomposed)
_FORMULAS = {
    **{
        k: (getattr(f, "__wrapped__", f), hasattr(f, "__wrapped__"))
        for k, f in flop_registry.items()
    },
    **{k: (None if f is _no_flops else f, True) for k, f in _COUNTED_KERNELS.items()},
}


_PLANS: dict[object, tuple[object, bool, bool]] = {}


def _plan(func: torch._ops.OpOverload) -> tuple[Any, bool, bool]:
    """``func``'s formula, whether it takes shapes, and whether ``FlopCounterMode`` would
    run it decomposed (no formula of its own, a CompositeImplicitAutograd kernel: the
    test ``OpOverload.decompose`` makes), looked up once per operation."""
    found = _PLANS.get(func)
    if found is None:
        formula, shapes = _FORMULAS.get(func._overloadpacket, (None, False))
        key = torch._C.DispatchKey.CompositeImplicitAutograd
        composite = func not in _FORMULAS and (
            key in func.py_kernels
            or torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key)
        )
        found = _PLANS[func] = (formula, shapes, composite)
    return found


class MacCounter(TorchDispatchMode):
    """The total MACs (FLOPs / 2) of the operations run inside, by the very formulas and
    decompositions ``FlopCounterMode`` applies (its registry plus :data:`ATTENTION_KERNELS`
    and :data:`BATCH_NORM_KERNELS`; a test holds the totals equal).

    Written by hand because ``FlopCounterMode`` also attributes every operation to the
    modules it runs in (a global forward hook on every module and a walk over the module
    stack per operation): a third of a forward pass on a MobileNetV2, paid by each counted
    pass of ``pk.shrink``, which needs the total alone. Entering it is cheap, so a traced
    pass can count each model operation and leave its function rules' work uncounted.
    Functions whose count follows from shapes (:mod:`prunekit.cost_shortcuts`) run
    unwatched and are counted by the same formulas (:meth:`call`; :func:`counting`).
    torch wraps its ``__torch_dispatch__`` in ``torch._dynamo.disable`` (as every mode's):
    without that, ``torch.cond`` or a compiled submodule would fail under it.
    """

    supports_higher_order_operators = True  # (torch.cond...: counted by FlopCounterMode)

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        # (formula, argument shapes, keyword shapes, output shape) of the operations run,
        # evaluated when :attr:`macs` is read: a formula's Python between two operations
        # let the thread pool fall asleep (MobileNetV2 ran ~25% slower counted)
        self.pending: list[tuple[Any, Any, Any, Any]] = []

    def call(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """Run the torch function ``func`` counted: from its shapes where a shortcut covers
        it (:mod:`prunekit.cost_shortcuts`), else with this mode watching the operations it runs."""
        found = shortcut(func, args, kwargs)
        if found is None:
            with self:
                return func(*args, **kwargs)
        out = func(*args, **kwargs)
        self.record(found, args, kwargs, out)
        return out

    def record(self, found: tuple[Any, Any], args: tuple, kwargs: dict, out: Any) -> None:
        """Count a call of a function ``found`` (a shortcut) covers, made unwatched."""
        if found[1] is not None:
            formula, shapes = found[1](args, kwargs)
            self.pending.append((formula, shapes, {}, out.shape))

    @property
    def macs(self) -> int:
        """MACs counted so far."""
        for formula, args, kwargs, out in self.pending:
            self.flops += formula(*args, out_shape=out, **kwargs)
        self.pending.clear()
        return self.flops // 2

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):  # its branches, as it counts
            with FlopCounterMode(display=False, custom_mapping=_COUNTED_KERNELS) as inner:
                out = func(*args, **kwargs)
            self.flops += inner.get_total_flops()
            return out
        formula, shapes, composite = _plan(func)
        if composite:  # as FlopCounterMode: a composite counts what it runs
            with self:
                done = func.decompose(*args, **kwargs)
            if done is not NotImplemented:
                return done
        out = func(*args, **kwargs)
        if formula is not None and shapes:
            self.pending.append((formula, _shapes(args), _shapes(kwargs), _shapes(out)))
        elif formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


class _Shortcuts(TorchFunctionMode):
    """While ``counter`` is the innermost dispatch mode, a function a shortcut covers runs
    unwatched and is counted from its shapes (:meth:`MacCounter.record`)."""

    def __init__(self, counter: MacCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        found = shortcut(func, args, kwargs)
        if found is None or _get_current_dispatch_mode() is not self.counter:
            return func(*args, **kwargs)
        with _pop_mode_temporarily():
            out = func(*args, **kwargs)
        self.counter.record(found, args, kwargs, out)
        return out


@contextmanager
def counting() -> Iterator[MacCounter]:
    """Count the operations run inside, as every count here is taken: with the fused
    attention kernels off and :data:`ATTENTION_KERNELS` given their formula. The caller
    runs the model in eval mode without gradients (a traced forward pass counts itself
    this way instead of running the model once more)."""
    with unfused_attention(), MacCounter() as counter, _Shortcuts(counter):
        yield counter


def macs_per_module(model: nn.Module, inputs: Inputs) -> tuple[dict[nn.Module, int], int]:
    """MACs (FLOPs / 2) of one forward pass of ``model`` on ``inputs`` (see
    :mod:`prunekit.inputs`): per module (its own and its children's operations), and of the
    whole model. Counted as the module docstring says; training flags are restored."""
    counter = FlopCounterMode(display=False, custom_mapping=_COUNTED_KERNELS)
    with eval_mode(model), unfused_attention(), counter, torch.no_grad():
        call(model, inputs)
    flops = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    per_module = {module: flops.get(name, 0) // 2 for module, name in _tracker_names(model).items()}
    return per_module, flops.get("Global", 0) // 2


def count_macs(model: nn.Module, inputs: Inputs) -> int:
    """Dense MACs of one forward pass of ``model`` on ``inputs``, counted as
    :func:`macs_per_module` counts them (the total alone: :class:`MacCounter`)."""
    with eval_mode(model), counting() as counter, torch.no_grad():
        call(model, inputs)
    return counter.macs


__all__ = [
    "MacCounter", "attention_macs", "count_macs", "counting", "csr_bytes", "macs_per_module",
    "nm_bytes", "unfused_attention",
]  # fmt: skip
