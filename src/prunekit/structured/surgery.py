"""Physical removal: slice every member tensor of the removed groups, then fix the modules.

After slicing, each module's size attributes are rewritten from its new tensors
(``in_features``, ``out_channels``, ``groups`` of a depthwise conv, ``num_features``...),
and attention modules get their head counts (``num_heads``, ``num_key_value_heads``,
``all_head_size``...) from the heads the trace saw them use. A transformers ``config``
is updated where every layer ended with the same size, so ``from_pretrained`` rebuilds
the model; otherwise the note says so and :func:`prunekit.structured.load_shrunk` loads it.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prunekit.structured.graph import DependencyGraph, Group, owner
from prunekit.structured.mha import unpack

HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
WIDTH_ATTRS = ("all_head_size", "split_size", "inner_dim")
HIDDEN_ATTRS = ("hidden_size", "n_embd", "d_model")  # a transformers config's stream width
SIZE_ATTRS = (
    "in_features", "out_features", "in_channels", "out_channels", "groups", "num_features",
    "embedding_dim", "num_embeddings", "nf", "nx", "num_parameters",
    *HEAD_ATTRS, *KV_HEAD_ATTRS, *WIDTH_ATTRS,
)  # fmt: skip


def attribute(module: nn.Module, name: str) -> Any:
    """``getattr(module, name, None)`` for a plain attribute or a class-level one (a
    property), without sending a missing name through ``nn.Module.__getattr__`` (which
    raises and catches an AttributeError: 20 per module when size attributes are read)."""
    own = vars(module)
    if name in own:
        return own[name]
    return getattr(module, name, None) if hasattr(type(module), name) else None


@functools.lru_cache(maxsize=1024)
def _class_level(cls: type) -> frozenset[str]:
    """The names of :data:`SIZE_ATTRS` that ``cls`` defines itself (properties)."""
    return frozenset(a for a in SIZE_ATTRS if hasattr(cls, a))


def size_attributes(module: nn.Module) -> dict[str, int]:
    """``module``'s integer size attributes among :data:`SIZE_ATTRS` (as :func:`attribute`
    reads them; the names to look for are known per class: snapshotting every module of
    a MobileNetV2 read 25 names each)."""
    own, on_class = vars(module), _class_level(type(module))
    found = {a: attribute(module, a) for a in SIZE_ATTRS if a in own or a in on_class}
    return {a: v for a, v in found.items() if isinstance(v, int)}


@dataclass(frozen=True)
class AttributeChange:
    module: str
    attr: str
    old: int
    new: int


def removed_groups(graph: DependencyGraph, removed: Mapping[str, Sequence[int]]) -> list[Group]:
    return [graph.family(name).groups[i] for name, idx in removed.items() for i in idx]


def group_masked(
    model: nn.Module, graph: DependencyGraph, removed: Mapping[str, Sequence[int]]
) -> nn.Module:
    """A copy of ``model`` with every member of the ``removed`` groups zeroed."""
    # The reference of verify=True: the group-masked model the shrunk one must equal
    # (verify=False skips it).
    masked = copy.deepcopy(model)
    zero_positions(dict(masked.named_parameters(remove_duplicate=False)), graph.positions(removed))
    return masked


def zero_positions(
    tensors: Mapping[str, Tensor], positions: Mapping[tuple[str, int], Tensor]
) -> None:
    """Zero every position of removed groups in ``tensors`` (by parameter name; a name
    not there is skipped) in place (``positions``: what
    :meth:`DependencyGraph.positions` gives): applied to a model's parameters, the
    *group-masked* model.

    Removing the groups physically computes exactly what this model computes.
    """
    with torch.no_grad():
        for (name, dim), index in positions.items():
            if name in tensors:
                tensors[name].index_fill_(dim, index.to(tensors[name].device), 0.0)


def zero_groups(model: nn.Module, groups: Sequence[Group]) -> None:
    """:func:`zero_positions` of ``groups`` (per-group objects)."""
    positions: dict[tuple[str, int], list[Tensor]] = {}
    for g in groups:
        for m in g.members:
            positions.setdefault((m.name, m.dim), []).append(m.index)
    params = dict(model.named_parameters(remove_duplicate=False))
    zero_positions(params, {key: torch.cat(parts) for key, parts in positions.items()})


def _tensors(model: nn.Module) -> dict[str, Tensor]:
    return {
        **dict(model.named_buffers(remove_duplicate=False)),
        **dict(model.named_parameters(remove_duplicate=False)),
    }


def assign(
    model: nn.Module, names: Sequence[str], value: Tensor, old: Tensor,
    modules: Mapping[str, nn.Module] | None = None,
) -> None:  # fmt: skip
    """Replace tensor ``old`` by ``value`` under every name it has (tied weights stay tied);
    ``modules``: ``dict(model.named_modules())`` where the caller has it."""
    new: Tensor = nn.Parameter(value, requires_grad=old.requires_grad)
    if not isinstance(old, nn.Parameter):
        new = value
    for name in names:
        path = owner(name)
        module = modules[path] if modules is not None else model.get_submodule(path)
        attr = name.rpartition(".")[2]
        if isinstance(new, nn.Parameter):
            module._parameters[attr] = new
        else:
            module._buffers[attr] = new


def resize_module(name: str, module: nn.Module) -> list[AttributeChange]:
    """Rewrite ``module``'s size attributes from its tensors' shapes."""
    weight = getattr(module, "weight", None)
    values: dict[str, int] = {}
    if isinstance(module, nn.Linear):
        values = {"out_features": weight.shape[0], "in_features": weight.shape[1]}
    elif isinstance(module, nn.modules.conv._ConvNd):
        values = _conv_sizes(module, weight)
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        ref = weight if weight is not None else module.running_mean
        values = {"num_features": ref.shape[0]}
    elif isinstance(module, nn.LayerNorm | nn.RMSNorm) and weight is not None:
        return _normalized(name, module, weight.shape[0])
    elif isinstance(module, nn.Embedding):
        values = {"num_embeddings": weight.shape[0], "embedding_dim": weight.shape[1]}
    elif isinstance(module, nn.PReLU):
        values = {"num_parameters": weight.numel()}
    elif isinstance(module, nn.MultiheadAttention):
        unpack(module)  # its num_heads follows from the heads the trace saw (_heads)
    elif hasattr(module, "nf") and weight is not None and weight.dim() == 2:  # HF Conv1D
        values = {"nf": weight.shape[1], "nx": weight.shape[0]}
    return _set(name, module, values)


def _normalized(name: str, module: nn.LayerNorm | nn.RMSNorm, size: int) -> list[AttributeChange]:
    """An approximate-mode norm that lost channels: its ``normalized_shape`` follows."""
    old = tuple(module.normalized_shape)
    if old[-1] == size:
        return []
    module.normalized_shape = (*old[:-1], size)
    return [AttributeChange(name, "normalized_shape", old[-1], size)]


def _conv_sizes(module: nn.modules.conv._ConvNd, weight: Tensor) -> dict[str, int]:
    groups = module.groups
    if module.transposed:
        return {"in_channels": weight.shape[0], "out_channels": weight.shape[1] * groups}
    depthwise = groups > 1 and groups == module.in_channels and weight.shape[1] == 1
    if depthwise:  # groups follow the channels; out = multiplier * in
        groups = weight.shape[0] * module.in_channels // module.out_channels
    return {"out_channels": weight.shape[0], "groups": groups,
            "in_channels": weight.shape[1] * groups}  # fmt: skip


def _set(name: str, module: nn.Module, values: Mapping[str, int]) -> list[AttributeChange]:
    changes = []
    for attr, new in values.items():
        old = getattr(module, attr, None)
        if isinstance(old, int) and old != new:
            setattr(module, attr, new)
            changes.append(AttributeChange(name, attr, old, new))
    return changes


def head_counts(graph: DependencyGraph, gone: set[int]) -> dict[str, tuple[int, int, int, int]]:
    """Per attention module: (heads, kept heads, key/value heads, kept key/value heads)."""
    atoms, out = graph.trace.atoms, {}
    for ev in graph.trace.heads:
        kept = [sum(atoms.find(a) not in gone for a in ids.tolist())
                for ids in (ev.q_heads, ev.kv_heads)]  # fmt: skip
        out.setdefault(ev.module, (len(ev.q_heads), kept[0], len(ev.kv_heads), kept[1]))
    return out


def _heads(model: nn.Module, counts: Mapping[str, tuple[int, int, int, int]]) -> list:
    changes = []
    for name, (heads, new_heads, kv, new_kv) in counts.items():
        module = model.get_submodule(name) if name != "<model>" else model
        values = {a: new_heads for a in HEAD_ATTRS if getattr(module, a, None) == heads}
        values |= {a: new_kv for a in KV_HEAD_ATTRS if getattr(module, a, None) == kv}
        for attr in WIDTH_ATTRS:
            width = getattr(module, attr, None)
            if isinstance(width, int) and width % heads == 0:
                values[attr] = width // heads * new_heads
        changes += _set(name, module, values)
    return changes


def _norm_weight(model: nn.Module, name: str) -> bool:
    """Whether tensor ``name`` is the affine of a LayerNorm / RMSNorm-like module."""
    module = model.get_submodule(owner(name))
    return "norm" in type(module).__name__.lower() and not isinstance(
        module, nn.modules.batchnorm._NormBase | nn.GroupNorm
    )


def _hidden_updates(model: nn.Module, config: object, graph: DependencyGraph,
                    removed: Mapping[str, Sequence[int]]) -> dict[str, set[int]]:  # fmt: skip
    """Approximate mode: the new width of the normalised residual stream, under the
    config's width attribute (``hidden_size``, ``n_embd``, ``d_model``)."""
    out: dict[str, set[int]] = {}
    streams = [
        f for f in graph.families
        if graph.trace.norms and any(_norm_weight(model, m.name) for m in f.groups[0].members)
    ]  # fmt: skip
    for attr in HIDDEN_ATTRS:
        size = getattr(config, attr, None)
        for fam in streams if isinstance(size, int) else ():
            if len(fam.groups) == size:
                out.setdefault(attr, set()).add(size - len(removed.get(fam.name, ())))
    return out


def _derived_heads_fit(config: object, updates: Mapping[str, set[int]]) -> bool:
    """A config without ``head_dim`` derives it as width / heads: whether that still gives
    the head size the layers have (removed heads and a narrower stream must agree)."""
    if isinstance(getattr(config, "head_dim", None), int):
        return True
    for heads_attr in ("num_attention_heads", "n_head"):
        for width_attr in HIDDEN_ATTRS:
            heads, width = getattr(config, heads_attr, None), getattr(config, width_attr, None)
            if not (isinstance(heads, int) and isinstance(width, int)) or width % heads:
                continue
            new_heads = next(iter(updates.get(heads_attr, {heads})))
            new_width = next(iter(updates.get(width_attr, {width})))
            if new_width != new_heads * (width // heads):
                return False
    return True


def update_config(model: nn.Module, graph: DependencyGraph, removed: Mapping[str, Sequence[int]],
                  counts: Mapping[str, tuple[int, int, int, int]]) -> list[str]:  # fmt: skip
    """Write the new sizes into a transformers ``config`` where every layer agrees."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    notes: list[str] = []
    updates = _hidden_updates(model, config, graph, removed)
    for heads, new_heads, kv, new_kv in counts.values():
        for attr in ("num_attention_heads", "n_head"):
            if getattr(config, attr, None) == heads:
                updates.setdefault(attr, set()).add(new_heads)
        if getattr(config, "num_key_value_heads", None) == kv:
            updates.setdefault("num_key_value_heads", set()).add(new_kv)
    if not _derived_heads_fit(config, updates):
        notes.append(
            "this config derives the head size from its width / heads, so it cannot describe "
            "removed heads at this width: save with prunekit.save_shrunk, load with load_shrunk"
        )
        derived = (*HIDDEN_ATTRS, *HEAD_ATTRS, *KV_HEAD_ATTRS)
        updates = {k: v for k, v in updates.items() if k not in derived}
    hidden = getattr(config, "n_embd", None)
    for attr, default in (("intermediate_size", None), ("n_inner", 4 * hidden if hidden else None)):
        size = getattr(config, attr, None) or default
        for fam in graph.families:
            if size and fam.kind == "channels" and len(fam.groups) == size:
                updates.setdefault(attr, set()).add(size - len(removed.get(fam.name, ())))
    return notes + _write(config, updates)


def _write(config: object, updates: Mapping[str, set[int]]) -> list[str]:
    notes = []
    for attr, values in updates.items():
        if len(values) == 1:
            old, new = getattr(config, attr), next(iter(values))
            if old != new:
                setattr(config, attr, new)
                notes.append(f"config.{attr}: {old} -> {new}")
        else:
            notes.append(
                f"layers now differ in {attr} ({sorted(values)}), which a config cannot say: "
                "save with prunekit.structured.save_shrunk and load with load_shrunk"
            )
    return notes


Cuts = dict[str, list[tuple[int, Tensor]]]


def kept_indices(
    model: nn.Module, graph: DependencyGraph, removed: Mapping[str, Sequence[int]],
    tensors: Mapping[str, Tensor] | None = None,
) -> Cuts:  # fmt: skip
    """Per tensor (its first name; ``graph.trace.aliases`` lists the others):
    ``[(dim, kept indices)]``, what :func:`remove` keeps of the ``removed`` groups
    (``tensors``: the model's tensors by name, where the caller has them)."""
    tensors = _tensors(model) if tensors is None else tensors
    out: Cuts = {}
    kept: dict[tuple[int, int], Tensor] = {}  # coupled dims share their positions' tensor
    for (name, dim), index in graph.positions(removed).items():
        size = tensors[name].shape[dim]
        if (id(index), size) not in kept:
            keep = np.ones(size, dtype=bool)  # numpy: small-array speed
            keep[index.numpy()] = False
            kept[id(index), size] = torch.from_numpy(np.flatnonzero(keep))
        out.setdefault(name, []).append((dim, kept[id(index), size]))
    return out


@dataclass(frozen=True)
class Slices:
    """What removing some groups keeps of a model: per tensor (its first name), the kept
    indices of each cut dimension (``kept``) and the new, smaller tensor (``tensors``)."""

    kept: Cuts
    tensors: dict[str, Tensor]


def slices(
    model: nn.Module, graph: DependencyGraph, removed: Mapping[str, Sequence[int]]
) -> Slices:
    """The new tensors of :func:`remove`, made without changing ``model`` (verify's
    reference computes the kept channels of its largest layers with them)."""
    tensors = _tensors(model)
    kept = kept_indices(model, graph, removed, tensors)
    new = {}
    with torch.no_grad():
        for name, cuts in kept.items():
            value = tensors[name].detach()
            for dim, index in cuts:
                value = value.index_select(dim, index.to(value.device))
            new[name] = value.contiguous()
    return Slices(kept, new)


def remove(
    model: nn.Module, graph: DependencyGraph, removed: Mapping[str, Sequence[int]],
    cut: Slices | None = None,
) -> tuple[list[AttributeChange], list[str]]:  # fmt: skip
    """Delete the ``removed`` groups (family name -> group indices) from ``model``
    (``cut``: their :func:`slices` of ``model``, where the caller made them).

    Returns the attribute changes and notes on the transformers config (if any).
    """
    cut = slices(model, graph, removed) if cut is None else cut
    tensors = _tensors(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, value in cut.tensors.items():
        assign(model, graph.trace.aliases.get(name, [name]), value, tensors[name], modules)
    changes = []
    for name in sorted({owner(alias) for n in cut.tensors for alias in graph.trace.aliases[n]}):
        changes += resize_module(name, modules[name])
    counts = head_counts(graph, graph.ids(removed)) if graph.trace.heads else {}
    return changes + _heads(model, counts), update_config(model, graph, removed, counts)
