"""Save a converted model to safetensors and load it into a fresh instance of its
architecture: the file holds the state dict (sparse buffers as they are) and, in its
header, the spec of every sparse module so that :func:`load` can rebuild them, plus a
SHA-256 of the tensors.

Loading trusts nothing in the file. Before the model is touched, every spec must be one
:meth:`~prunekit.sparse.base.SparseLinear.spec` could have written (known keys, known
format and dtype, sizes in ``[1, 2**31 - 1]``) for a layer the model has with the same
sizes, bias and dtype; every sparse module is built aside and its tensors must have the
spec's dtypes and shapes and keep the format's invariants (CSR / BSR row pointers and
column indices, N:M positions: :meth:`check_state`), so no kernel ever reads out of
bounds; and every other tensor must fit the model
(:func:`prunekit.masks.state_mismatch`). Only then are the new modules swapped in and the
rest loaded: a refused file leaves the model exactly as it was, without a copy of it.
"""

from __future__ import annotations

from pathlib import Path
from reprlib import repr as brief  # values from files can be huge
from typing import Any

from torch import Tensor, nn

from prunekit import masks
from prunekit.errors import CheckpointError, PruningError, first_line
from prunekit.layers import require_model
from prunekit.sparse.base import (
    SparseLinear,
    check_fields,
    read_tensors,
    write_tensors,
)
from prunekit.sparse.conv import SparseConv2d
from prunekit.sparse.formats import LINEAR_TYPES, from_spec, set_module
from prunekit.sparse.nm_linear import SemiStructuredLinear

_KEY = "prunekit.sparse"
_KINDS: dict[str, type[SparseLinear] | type[SparseConv2d]] = {
    **LINEAR_TYPES,
    "conv2d": SparseConv2d,
}


def save(model: nn.Module, path: str | Path) -> None:
    """Write ``model``'s state dict and its sparse modules' specs to ``path`` atomically:
    the file is complete or left as it was (:func:`prunekit.fsio.atomic_write`).

    Raises:
        PruningError: for a model holding ``"nm-cuda"`` modules (a CUDA-side layout); save
            the ``"nm"`` form, and convert to ``"nm-cuda"`` after loading.
        CheckpointError: ``path`` cannot be written (missing folder, read-only, disk full).
    """
    require_model(model)
    cuda = [n for n, m in model.named_modules() if isinstance(m, SemiStructuredLinear)]
    if cuda:
        raise PruningError(
            f"layers {cuda} are 'nm-cuda' (2:4 semi-structured) modules, which have no "
            "portable layout; Fix: save the model converted with format='nm' and convert "
            "to 'nm-cuda' after loading."
        )
    specs = {}
    for name, module in model.named_modules():
        inside_conv = any(name.startswith(f"{conv}.") for conv in specs)
        if isinstance(module, SparseLinear | SparseConv2d) and not inside_conv:
            specs[name] = module.spec()
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    write_tensors(path, state, _KEY, specs)


def load(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a file written by :func:`save` into ``model`` (the dense architecture), in place:
    its layers named in the file become sparse modules, then every other tensor loads
    strictly (masks included, via :func:`prunekit.masks.load_state_dict`). Returns ``model``.

    Raises:
        CheckpointError: the file is unreadable, truncated, corrupted or edited, was not
            written by :func:`save`, or was saved from another architecture or dtype;
            ``model`` is left unchanged.
    """
    require_model(model)
    specs, state = read_tensors(path, _KEY, "prunekit.sparse.save")
    fail = f"{str(path)!r} does not load into {type(model).__name__}"
    fix = (
        "Fix: load it into the architecture and dtype it was saved from, or save it again "
        "with prunekit.sparse.save if it was edited or corrupted."
    )
    if not isinstance(specs, dict):
        raise CheckpointError(f"{fail}: its header {brief(specs)} is not a JSON object; {fix}")
    nested = [a for a in specs for b in specs if a.startswith(f"{b}.")]
    if nested:
        raise CheckpointError(f"{fail}: layers {brief(nested)} are inside other layers; {fix}")
    modules = dict(model.named_modules())
    built = {}
    for name, spec in specs.items():
        try:
            built[name] = _build(name, spec, modules, state)
        except CheckpointError as err:
            raise CheckpointError(f"{fail}: layer {name!r}: {first_line(err)}; {fix}") from err
    problems = _rest_mismatch(model, state, list(built))
    if problems:
        raise CheckpointError(f"{fail}: {'; '.join(problems)}; {fix}")
    for name, module in built.items():
        set_module(model, name, module)
    masks.load_state_dict(model, state)
    return model


def _kind(spec: object, kinds: dict[str, Any]) -> Any:
    """The class of ``spec``'s ``format`` among ``kinds``."""
    fmt = spec.get("format") if isinstance(spec, dict) else None
    if not isinstance(fmt, str) or fmt not in kinds:
        raise CheckpointError(f"spec {brief(spec)} has no known format (one of {list(kinds)})")
    return kinds[fmt]


def _check_spec(spec: object) -> dict[str, Any]:
    """``spec`` if it is a known format's spec (a conv's GEMM spec checked first)."""
    kind = _kind(spec, _KINDS)
    if kind is SparseConv2d:
        gemm = check_fields(spec, SparseConv2d.SPEC_FIELDS)["gemm"]
        _kind(gemm, LINEAR_TYPES).check_spec(gemm)
    return kind.check_spec(spec)


def _expected(spec: dict[str, Any]) -> dict[str, Any]:
    """The target layer's attributes a module built from ``spec`` replaces faithfully."""
    if spec["format"] != "conv2d":
        want = {k: spec[k] for k in ("in_features", "out_features", "bias")}
        return {**want, "dtype": spec["dtype"]}
    conv = spec["conv"]
    sizes = ("kernel_size", "stride", "padding", "dilation")
    return {
        **{k: conv[k] for k in ("in_channels", "out_channels", "bias")},
        **{k: tuple(conv[k]) for k in sizes},
        "groups": 1,
        "padding_mode": "zeros",
        "dtype": spec["gemm"]["dtype"],
    }


def _actual(target: nn.Module, keys: list[str]) -> dict[str, Any]:
    """``target``'s values of the :func:`_expected` keys (absent ones as None)."""
    floats = [t for t in (*target.parameters(), *target.buffers()) if t.is_floating_point()]
    have = {
        "bias": getattr(target, "bias", None) is not None,
        "dtype": str(floats[0].dtype) if floats else None,
        "groups": getattr(target, "groups", 1),
        "padding_mode": getattr(target, "padding_mode", "zeros"),
    }
    return {k: have[k] if k in have else getattr(target, k, None) for k in keys}


def _build(
    name: str, spec: object, modules: dict[str, nn.Module], state: dict[str, Tensor]
) -> nn.Module:
    """The sparse module ``spec`` describes, checked against the layer it replaces and
    loaded with its checked tensors from ``state``; the model is not touched."""
    spec = _check_spec(spec)
    target = modules.get(name) if name else None  # "" would replace the model itself
    if target is None:
        raise CheckpointError("the model has no such layer")
    want = _expected(spec)
    have = _actual(target, list(want))
    if have != want:
        diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
        raise CheckpointError(f"the model's {type(target).__name__} differs (model, file): {diff}")
    module: SparseLinear | SparseConv2d = from_spec(spec)  # type: ignore[assignment]
    prefix = f"{name}."
    tensors = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    keys = module.state_dict().keys()
    if tensors.keys() != keys:
        missing, unexpected = sorted(keys - tensors.keys()), sorted(tensors.keys() - keys)
        raise CheckpointError(f"tensors missing {missing}, unexpected {brief(unexpected)}")
    module.check_state(tensors)
    module.load_state_dict(tensors)
    return module


def _rest_mismatch(model: nn.Module, state: dict[str, Tensor], names: list[str]) -> list[str]:
    """What keeps the tensors outside the ``names`` layers from loading into ``model``: the
    model's own tensors stand in for those layers, so only the rest is compared."""
    inside = tuple(f"{name}." for name in names)
    probe = {k: v for k, v in state.items() if not k.startswith(inside)}
    probe |= {k: v for k, v in model.state_dict().items() if k.startswith(inside)}
    return masks.state_mismatch(model, probe)
