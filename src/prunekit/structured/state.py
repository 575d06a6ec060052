"""What a channel rule works with: the labels and atoms of one traced forward pass.

:class:`TraceState` is the state the tracer (:mod:`prunekit.structured.trace`) fills and
every rule (:mod:`prunekit.structured.registry`) reads and writes: the label of each
activation seen so far, the atoms of each parameter dimension, the union-find that
couples them, and the attention heads met on the way.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from prunekit.structured.labels import FIXED, Atoms, Label

# Leaves no container hides a tensor in: skipped without asking pytree.
_SCALARS = frozenset({int, float, bool, complex, str, type(None), type(Ellipsis), slice,
                      torch.dtype, torch.device, torch.layout, torch.memory_format})  # fmt: skip


def tensors(tree: Any) -> list[Tensor]:
    """The tensors among the leaves of ``tree`` (nested tuples, lists and dicts, and any
    other container pytree knows), in pytree's order. Plain tuples, lists and dicts are
    walked here: rules ask once per operation, and ``tree_flatten`` cost ~5 us a call."""
    found: list[Tensor] = []
    _collect(tree, found)
    return found


def _collect(x: Any, found: list[Tensor]) -> None:
    kind = type(x)
    if isinstance(x, Tensor):
        found.append(x)
    elif kind is tuple or kind is list:
        for v in x:
            _collect(v, found)
    elif kind is dict:
        for v in x.values():
            _collect(v, found)
    elif kind not in _SCALARS:  # a named tuple, a ModelOutput, a registered node...
        found.extend(v for v in tree_flatten(x)[0] if isinstance(v, Tensor))


def output_tensors(out: Any) -> list[Tensor]:
    """The tensors of a model's output (a transformers ``ModelOutput`` included)."""
    # ModelOutput is a dict subclass; pytree sees through tuples and plain dicts
    return tensors(dict(out) if isinstance(out, Mapping) else out)


def arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call: by keyword, else the ``i``-th positional one."""
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


@dataclass
class HeadEvent:
    """Attention in ``module``: the head labels of its queries and of its keys/values."""

    module: str
    q_heads: Tensor
    kv_heads: Tensor


_APPROXIMATE: ContextVar[bool] = ContextVar("approximate", default=False)


@contextmanager
def approximate_norms() -> Iterator[None]:
    """Trace in *approximate* mode: channels normalised by a LayerNorm / RMSNorm over the
    last dimension (a transformer's hidden size) become removable. The norm's statistics
    then run over fewer channels, so the result is no longer exact
    (:func:`prunekit.shrink` with ``approximate=True`` measures the deviation)."""
    token = _APPROXIMATE.set(True)
    try:
        yield
    finally:
        _APPROXIMATE.reset(token)


class TraceState:
    """Labels, atoms and heads of one traced forward pass of ``model`` (the rules' API)."""

    def __init__(self, model: nn.Module) -> None:
        self.atoms = Atoms()
        self.members: dict[tuple[str, int], Tensor] = {}
        self.member_keys: dict[int, tuple[str, int]] = {}  # id(atoms) -> key
        self.producers: list[tuple[str, int]] = []
        # id(activation) -> (a weak reference to it, its label). The reference's callback
        # drops the entry when the activation is freed, so its id cannot be reused for a
        # new tensor, and the trace holds no activation: holding every one to the end of
        # the pass took ResNet-50's trace at batch 8 to 1241 MB (546 MB now, 472 untraced).
        self.labels: dict[int, tuple[weakref.ref, Label]] = {}
        self.names: dict[int, list[str]] = {}
        self.params: set[int] = set()
        for name, p in model.named_parameters(remove_duplicate=False):
            self.names.setdefault(id(p), []).append(name)
            self.params.add(id(p))
        for name, b in model.named_buffers(remove_duplicate=False):
            self.names.setdefault(id(b), []).append(name)
        self.stack: list[str] = []  # names of the modules being run, innermost last
        self.approximate = _APPROXIMATE.get()  # see approximate_norms
        self.norms = 0  # normalisations the approximate mode let channels through
        self.heads: list[HeadEvent] = []

    def label(self, t: Any) -> Label | None:
        """The label of an activation, or of a parameter used as one (see ``param_label``)."""
        if not isinstance(t, Tensor):
            return None
        if id(t) in self.labels:
            return self.labels[id(t)][1]
        if id(t) in self.params:
            return self.param_label(t)
        return None

    def param_label(self, p: Tensor) -> Label | None:
        """A parameter used directly by an operation without a rule of its own (a LayerScale
        gain, a class token): its channels run along its last dimension of size > 1."""
        dims = [d for d in range(p.dim()) if p.shape[d] > 1]
        return Label(dims[-1], self.param_atoms(p, dims[-1])) if dims else None

    def is_param(self, t: Any) -> bool:
        return isinstance(t, Tensor) and id(t) in self.names

    def is_labelled(self, t: Tensor) -> bool:
        """Whether ``t`` carries channels: a labelled activation or a parameter."""
        return id(t) in self.labels or id(t) in self.params

    def param_atoms(self, p: Tensor, dim: int) -> Tensor:
        """The atoms of dimension ``dim`` of parameter or buffer ``p`` (fresh the first time)."""
        dim = dim % p.dim()
        key = (self.names[id(p)][0], dim)
        if key not in self.members:
            self.members[key] = self.atoms.new(p.shape[dim])
            self.member_keys[id(self.members[key])] = key
        return self.members[key]

    def couple(self, p: Tensor, dim: int, ids: Tensor) -> None:
        """Dimension ``dim`` of parameter or buffer ``p`` goes with atoms ``ids``, index by
        index. The first time, the dimension takes ``ids`` as its atoms: the same classes
        as fresh atoms united with them, without the atoms or the union (a BatchNorm's
        four vectors and a conv's inputs; ResNet-50: 28 K atoms instead of 159 K). After,
        or when ``ids`` cannot be taken (``FIXED``, another length, a strided view a rule
        may reshape), its atoms are united with ``ids``."""
        dim = dim % p.dim()
        key = (self.names[id(p)][0], dim)
        fits = ids.dim() == 1 and ids.numel() == p.shape[dim] and ids.is_contiguous()
        if key not in self.members and fits and not bool((ids == FIXED).any()):
            self.members[key] = ids
            return
        self.atoms.unite(self.param_atoms(p, dim), ids)

    def set(self, out: Any, label: Label | None) -> None:
        if isinstance(out, Tensor) and label is not None:
            at = id(out)
            ref = weakref.ref(out, lambda _, at=at: self.labels.pop(at, None))
            self.labels[at] = (ref, Label(label.dim % out.dim(), label.ids))
            key = self.member_keys.get(id(label.ids))
            if key is not None and key not in self.producers:
                self.producers.append(key)

    def set_full(self, out: Any, full: Tensor) -> None:
        """Label ``out`` from per-element labels (normalised to one varying dimension)."""
        if isinstance(out, Tensor):
            self.set(out, self.atoms.normalize(full))

    def full(self, t: Tensor) -> Tensor:
        """Per-element labels of ``t`` (``FIXED`` everywhere if it carries none)."""
        label = self.label(t)
        if label is None:
            return torch.full(t.shape, FIXED, dtype=torch.long)
        return label.full(t.shape)

    def block_inputs(self, *tensors: Any) -> None:
        for t in tensors:
            label = self.label(t)
            if label is not None:
                self.atoms.block(label.ids)

    @property
    def where(self) -> str:
        return self.stack[-1] if self.stack and self.stack[-1] else "<model>"
