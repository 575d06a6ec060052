"""Save a shrunk model and load it into its own class, without replaying the pruning.

``save_shrunk(model, directory)`` writes ``model.safetensors`` (tied weights stored once)
and ``shrunk.json``: every tensor's shape, every module's size attributes
(``in_features``, ``num_heads``...) and a SHA-256 of the weights file and the layout
together. Both files are written into a temporary sibling folder that replaces
``directory`` only once complete (:func:`prunekit.fsio.atomic_directory`), so a save
killed at any point leaves the previous save or the new one, never one's weights with
the other's layout. A transformers model is also written with ``save_pretrained`` when
its updated config rebuilds the shrunk shapes, so ``from_pretrained`` works too
(``save_shrunk`` says whether it does).

``load_shrunk(fresh_model, directory)`` trusts nothing in the files: the layout may only
name tensors and modules the model has, give every tensor its number of dimensions and
sizes in ``[1, current size]``, and set only the size attributes the module has among
:data:`~prunekit.structured.surgery.SIZE_ATTRS`, to ints in ``[1, current value]`` (a
layout only ever shrinks a fresh model, which also bounds what loading allocates); the
digest must match (a layout written before digests is accepted on the other checks); and
every weight must have the layout's shape. Only then are the tensors swapped in and the
attributes set: a refused directory leaves the model exactly as it was. No pickle is
ever read.

What shrinking changed beyond sizes comes back too: every LayerNorm / RMSNorm's
``normalized_shape`` (``norms`` in the layout, narrowed by approximate mode; it must
match the norm's weight) and, for an ``nn.MultiheadAttention`` whose heads were pruned,
the class :class:`~prunekit.structured.mha.HeadPrunedMultiheadAttention` (from its
in-projection, which must hold ``3 * num_heads * head_dim`` rows). Masks the model kept
through the shrink are saved and registered again (:mod:`~prunekit.structured.shrunk_masks`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from reprlib import repr as brief  # values from files can be huge
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import Tensor, nn

from prunekit.errors import CheckpointError, ShrunkLayoutError
from prunekit.fsio import atomic_directory
from prunekit.layers import require_model
from prunekit.structured import shrunk_masks
from prunekit.structured.mha import unpack
from prunekit.structured.surgery import SIZE_ATTRS, assign, size_attributes

WEIGHTS, LAYOUT = "model.safetensors", "shrunk.json"
FORMAT, _DIGEST = "prunekit-shrunk/1", "sha256"
_OPTIONAL = (_DIGEST, "norms", "masks")  # layouts without them are read without them
_FIX = "Fix: pass a directory written by pk.save_shrunk (save it again if it was edited or cut)."


def _normalized(module: nn.Module | None) -> tuple[int, ...] | None:
    """``module.normalized_shape`` (LayerNorm, RMSNorm), or None."""
    shape = getattr(module, "normalized_shape", None)
    ok = isinstance(shape, tuple) and all(type(s) is int for s in shape)
    return shape if ok else None


def _layout(model: nn.Module) -> dict[str, Any]:
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    attributes = {name: size_attributes(m) for name, m in model.named_modules()}
    norms = {name: _normalized(m) for name, m in model.named_modules()}
    return {
        "format": FORMAT,
        "shapes": {name: list(t.shape) for name, t in tensors.items()},
        "attributes": {name: attrs for name, attrs in attributes.items() if attrs},
        "norms": {name: list(shape) for name, shape in norms.items() if shape is not None},
    }


def _digest(weights: Path, layout: dict[str, Any]) -> str:
    """SHA-256 of the weights file's bytes (and the masks file's, if the layout lists
    masks) and of the layout (without its digest)."""
    digest = hashlib.sha256()
    for file in [weights, *([weights.parent / shrunk_masks.MASKS] if "masks" in layout else [])]:
        with open(file, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(chunk)
    body = {k: v for k, v in layout.items() if k != _DIGEST}
    digest.update(json.dumps(body, sort_keys=True).encode())
    return digest.hexdigest()


def config_rebuilds(model: nn.Module) -> bool:
    """Whether ``type(model)(model.config)`` has exactly the shrunk model's tensor shapes."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "_from_config"):
        return False
    with torch.device("meta"):
        skeleton = type(model)._from_config(config)
    want = {n: t.shape for n, t in model.state_dict().items()}
    return {n: t.shape for n, t in skeleton.state_dict().items()} == want


def save_shrunk(model: nn.Module, directory: str | Path) -> bool:
    """Write ``model`` to ``directory`` as a whole (see the module docstring); returns
    whether ``from_pretrained`` can also load it.

    Raises:
        CheckpointError: ``directory`` holds files that are not a previous save (they
            would be replaced), is a file, or cannot be written; it is left as it was.
        InvalidWeightError: a tensor of the model is on the meta device (nothing to save).
    """
    require_model(model, real=True)
    path = Path(directory)
    if path.is_dir() and any(path.iterdir()) and not (path / LAYOUT).is_file():
        raise CheckpointError(
            f"{str(path)!r} holds files that pk.save_shrunk did not write, and a save "
            "replaces the whole folder; Fix: pass a new or empty folder, or one "
            "pk.save_shrunk wrote."
        )
    plain, masks = shrunk_masks.split(model)
    with atomic_directory(path) as tmp:
        rebuilds = config_rebuilds(plain)
        if rebuilds:  # its config.json; from_pretrained also reads the weights saved next
            plain.save_pretrained(tmp)  # type: ignore[operator]
        save_model(plain, str(tmp / WEIGHTS))  # over save_pretrained's (renamed keys)
        layout = _layout(plain)
        if masks:
            layout["masks"] = shrunk_masks.write(tmp / shrunk_masks.MASKS, masks)
        layout[_DIGEST] = _digest(tmp / WEIGHTS, layout)
        (tmp / LAYOUT).write_text(json.dumps(layout, indent=1))
    return rebuilds


def load_shrunk(model: nn.Module, directory: str | Path) -> nn.Module:
    """Resize ``model`` (a fresh instance of the saved model's class) and load the weights,
    all or nothing (see the module docstring). Returns ``model``.

    Raises:
        CheckpointError: a file is missing, unreadable, truncated, malformed or corrupted,
            or the weights do not match the layout.
        ShrunkLayoutError: the layout names tensors, modules or sizes ``model`` does not
            have (it was saved from another class).
    """
    require_model(model)
    path = Path(directory)
    layout = _read_layout(path / LAYOUT)
    _check_layout(path / LAYOUT, layout, model)
    state = _read_weights(path / WEIGHTS, layout)
    plan = _plan(path / WEIGHTS, model, layout["shapes"], state)
    masks = (
        shrunk_masks.read(path / shrunk_masks.MASKS, layout["masks"]) if "masks" in layout else {}
    )
    with torch.no_grad():
        for names, old, value in plan:
            if value.shape == old.shape:
                old.copy_(value)
            else:
                assign(model, names, value.to(dtype=old.dtype, device=old.device), old)
    modules = dict(model.named_modules())
    for name, attrs in layout["attributes"].items():
        for attr, size in attrs.items():
            setattr(modules[name], attr, size)
    for name, shape in layout.get("norms", {}).items():
        modules[name].normalized_shape = tuple(shape)
    for module in modules.values():
        if isinstance(module, nn.MultiheadAttention):
            unpack(module)  # heads pruned: the class that runs them
    shrunk_masks.register(model, masks)
    return model


def _read_layout(file: Path) -> dict[str, Any]:
    """``shrunk.json`` as a dict of the right kinds (values checked by :func:`_check_layout`)."""
    try:
        layout = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise CheckpointError(f"cannot read {str(file)!r} as JSON ({err}); {_FIX}") from err
    kinds = {"format": str, "shapes": dict, "attributes": dict, "norms": dict, "masks": dict}
    kinds[_DIGEST] = str
    if not isinstance(layout, dict):
        bad = [f"the file holds {brief(layout)}, not an object"]
    else:
        bad = [f"unknown key {k!r}" for k in layout if k not in kinds] + [
            f"{k!r} = {brief(layout.get(k))} is not a {t.__name__}"
            for k, t in kinds.items()
            if (k in layout or k not in _OPTIONAL) and not isinstance(layout.get(k), t)
        ]
        if not bad and layout["format"] != FORMAT:
            bad = [f"'format' = {brief(layout['format'])}, not {FORMAT!r}"]
    if bad:
        raise CheckpointError(f"{str(file)!r} is not a shrunk layout: {bad[0]}; {_FIX}")
    return layout


Problem = tuple[type[CheckpointError | ShrunkLayoutError], str]


def _size(where: str, value: object, current: int) -> list[Problem]:
    """What is wrong with ``value`` replacing a size that is ``current`` now (at ``where``):
    not an int in ``[1, current]`` (``0`` where the size is ``0``)."""
    if type(value) is not int or value < min(1, current):
        return [(CheckpointError, f"{where} = {brief(value)} is not a positive int")]
    if value > current:
        why = f"is larger than the model's {current} (a layout only shrinks)"
        return [(ShrunkLayoutError, f"{where} = {value} {why}")]
    return []


def _check_layout(file: Path, layout: dict[str, Any], model: nn.Module) -> None:
    """Refuse a layout that names what ``model`` lacks or sizes it could not have written."""
    tensors = {**dict(model.named_buffers(remove_duplicate=False)),
               **dict(model.named_parameters(remove_duplicate=False))}  # fmt: skip
    modules = dict(model.named_modules())
    problems: list[Problem] = []
    for name, shape in layout["shapes"].items():
        if name not in tensors:
            problems.append((ShrunkLayoutError, f"tensor {brief(name)} is not in the model"))
            continue
        current = tensors[name].shape
        if not isinstance(shape, list) or len(shape) != len(current):
            why = f"is not a list of {len(current)} sizes"
            problems.append((CheckpointError, f"shapes[{name!r}] = {brief(shape)} {why}"))
        else:
            for axis, (size, now) in enumerate(zip(shape, current, strict=True)):
                problems += _size(f"shapes[{name!r}][{axis}]", size, now)
    for name, attrs in layout["attributes"].items():
        if name not in modules:
            problems.append((ShrunkLayoutError, f"module {brief(name)} is not in the model"))
        elif not isinstance(attrs, dict):
            why = "is not an object"
            problems.append((CheckpointError, f"attributes[{name!r}] = {brief(attrs)} {why}"))
        else:
            problems += _attributes(name, attrs, size_attributes(modules[name]))
    for name, shape in layout.get("norms", {}).items():
        problems += _norm(name, shape, modules.get(name), layout["shapes"])
    problems += shrunk_masks.problems(layout.get("masks", {}), model, layout["shapes"])
    problems += [] if problems else _heads(layout, modules)
    if problems:
        kind, what = problems[0]
        raise kind(
            f"{str(file)!r} does not fit {type(model).__name__}: {what}; Fix: load it into a "
            "fresh instance of the class that was shrunk, from a directory pk.save_shrunk wrote."
        )


def _attributes(name: str, attrs: dict[str, Any], current: dict[str, int]) -> list[Problem]:
    """The problems of module ``name``'s layout ``attrs`` given its ``current`` sizes."""
    out: list[Problem] = []
    for attr, value in attrs.items():
        where = f"attributes[{name!r}][{brief(attr)}]"
        if attr not in SIZE_ATTRS:
            out.append((CheckpointError, f"{where} is not a size attribute prunekit writes"))
        elif attr not in current:
            out.append((ShrunkLayoutError, f"{where}: the module has no such size"))
        else:
            out += _size(where, value, current[attr])
    return out


def _norm(name: str, shape: object, module: nn.Module | None,
          shapes: dict[str, Any]) -> list[Problem]:  # fmt: skip
    """The problems of ``normalized_shape`` = ``shape`` for module ``name``: a list of as
    many sizes, each in ``[1, current]``, equal to the norm's weight shape if it has one."""
    where, current = f"norms[{brief(name)}]", _normalized(module)
    if current is None:
        return [(ShrunkLayoutError, f"{where}: the model has no LayerNorm / RMSNorm there")]
    if not isinstance(shape, list) or len(shape) != len(current):
        return [
            (CheckpointError, f"{where} = {brief(shape)} is not a list of {len(current)} sizes")
        ]
    out = [p for axis, (size, now) in enumerate(zip(shape, current, strict=True))
           for p in _size(f"{where}[{axis}]", size, now)]  # fmt: skip
    weight = getattr(module, "weight", None)
    want = shapes.get(
        f"{name}.weight" if name else "weight", None if weight is None else list(weight.shape)
    )
    if not out and want is not None and want != shape:
        out.append((CheckpointError, f"{where} = {shape} but its weight is {want}"))
    return out


def _heads(layout: dict[str, Any], modules: dict[str, nn.Module]) -> list[Problem]:
    """Each nn.MultiheadAttention's in-projection must hold ``3 * num_heads * head_dim``
    rows after loading (heads are removed whole)."""
    out: list[Problem] = []
    for name, m in modules.items():
        if not isinstance(m, nn.MultiheadAttention) or m.in_proj_weight is None:
            continue
        key = f"{name}.in_proj_weight" if name else "in_proj_weight"
        rows = layout["shapes"].get(key, list(m.in_proj_weight.shape))[0]
        heads = layout["attributes"].get(name, {}).get("num_heads", m.num_heads)
        if rows != 3 * heads * m.head_dim:
            why = f"3 x num_heads {heads} x head_dim {m.head_dim}"
            out.append((CheckpointError, f"shapes[{key!r}] has {rows} rows, not {why}"))
    return out


def _read_weights(file: Path, layout: dict[str, Any]) -> dict[str, Tensor]:
    """The tensors of ``model.safetensors``, once the digest (if any) matches."""
    try:
        if _DIGEST in layout and layout[_DIGEST] != _digest(file, layout):
            raise CheckpointError(
                f"{str(file)!r} and its {LAYOUT} do not match their SHA-256 (edited, "
                f"corrupted, or not saved together); {_FIX}"
            )
        return load_file(str(file))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"cannot read {str(file)!r} ({err}); {_FIX}") from err


def _plan(
    file: Path, model: nn.Module, shapes: dict[str, list[int]], state: dict[str, Tensor]
) -> list[tuple[list[str], Tensor, Tensor]]:
    """``(names, old tensor, new value)`` for every tensor the file has values for, each
    value of the layout's shape (the model's when the layout leaves it out)."""
    aliases: dict[int, list[str]] = {}
    tensors: dict[int, Tensor] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False),
                    *model.named_buffers(remove_duplicate=False)]:  # fmt: skip
        aliases.setdefault(id(t), []).append(name)
        tensors[id(t)] = t
    persistent = set(model.state_dict())
    problems = [f"unexpected tensor {brief(k)}" for k in state if k not in persistent]
    plan = []
    for key, names in aliases.items():
        old = tensors[key]
        listed = [shapes[n] for n in names if n in shapes] or [list(old.shape)]
        want = listed[0]
        if any(shape != want for shape in listed):
            problems.append(f"tied tensors {names} have shapes {listed} in the layout")
        stored = [n for n in names if n in state]
        if not stored and (any(n in persistent for n in names) or want != list(old.shape)):
            problems.append(f"no values for {names[0]!r}")
        problems += [
            f"{n!r} is {list(state[n].shape)}, the layout says {want}"
            for n in stored
            if list(state[n].shape) != want
        ]
        if stored:
            plan.append((names, old, state[stored[0]]))
    if problems:
        raise CheckpointError(
            f"{str(file)!r} does not match its {LAYOUT}: {problems[0]}"
            f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}; {_FIX}"
        )
    return plan
