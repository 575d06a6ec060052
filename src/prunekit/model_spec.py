"""Load a model from a spec, the one way every command and recipe names a model.

A spec is one of

- a zoo name (``lenet5``, ``resnet20``, ... see :data:`prunekit.zoo.MODELS`), built with
  ``kwargs``;
- ``package.module:factory``: ``importlib.import_module("package.module").factory(**kwargs)``
  must return an ``nn.Module``;
- a transformers model directory (``config.json`` and weights): the class named first in
  ``config.architectures`` (``AutoModel`` when it names none transformers has), loaded with
  ``from_pretrained(directory, local_files_only=True)``.

An optional checkpoint then loads weights into the zoo / factory model: a safetensors file,
a torch file read with ``torch.load(weights_only=True)`` (never unpickling objects), or a
:func:`prunekit.save_shrunk` directory. Masked state dicts (``pk.prune`` without ``bake``)
load with their masks. Every failure raises a :class:`~prunekit.errors.PruningError`
subclass before anything is written.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from prunekit import masks, zoo
from prunekit.errors import (
    CheckpointError,
    MissingModelError,
    ModelSpecError,
    PruningError,
    UsageError,
    first_line,
    guarded,
)
from prunekit.inputs import Inputs
from prunekit.structured.io import LAYOUT, load_shrunk

KINDS = ("zoo", "factory", "transformers")
DEVICES = ("cpu", "cuda", "mps")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
PICKLE_SUFFIXES = (*TORCH_SUFFIXES, ".pkl", ".pickle")
# What transformers raises on a directory it cannot load (a bad config or weights).
LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError,
               SafetensorError)  # fmt: skip


@dataclass
class LoadedSpec:
    """A loaded model, how it was named (``kind`` is one of :data:`KINDS`) and the
    checkpoint loaded into it."""

    model: nn.Module
    spec: str
    kind: str
    checkpoint: Path | None = None

    @property
    def name(self) -> str:
        """A short name for folders and titles: the zoo name, factory or directory name."""
        if self.kind == "transformers":
            return Path(self.spec).resolve().name
        return self.spec.rsplit(":", 1)[-1]


def device(name: str) -> torch.device:
    """The device ``name`` (one of :data:`DEVICES`) a command or recipe runs on; an unknown
    name, or a device this machine lacks, is a :class:`~prunekit.errors.UsageError`."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}  # fmt: skip
    if name not in available:
        raise UsageError(f"device {name!r} is not one of {', '.join(DEVICES)}; Fix: pass cpu.")
    if not available[name]:
        why = f"is not available on this machine (torch sees no {name} device)"
        raise UsageError(f"device {name!r} {why}; Fix: pass cpu, or run where torch sees one.")
    return torch.device(name)


def describe() -> str:
    """One line on the spec forms, for ``--help`` texts and error messages."""
    return (
        f"a zoo name ({', '.join(zoo.MODELS)}), package.module:factory, or a transformers "
        "model directory (config.json + weights)"
    )


def resolve(spec: str, what: str = "model") -> Callable[..., Any]:
    """The callable ``package.module:name`` names: a model factory, a data function."""
    module_name, _, attr = spec.rpartition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # not found, an empty or relative name, or its own code failed
        raise ModelSpecError(
            f"{what} {spec!r}: module {module_name!r} does not import ({err}); Fix: install it "
            "or put its folder on PYTHONPATH."
        ) from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelSpecError(
            f"{what} {spec!r}: {module_name} has no callable {attr!r}; Fix: name a function or "
            f"class that builds the {what}."
        )
    return factory


def _factory(spec: str, kwargs: Mapping[str, Any]) -> nn.Module:
    attr, factory = spec.rpartition(":")[2], resolve(spec)
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as err:
        raise ModelSpecError(
            f"model {spec!r}: calling {attr}(**{dict(kwargs)!r}) failed ({err}); Fix: pass the "
            "keyword arguments it takes."
        ) from err
    except ValueError:  # no signature to check (a builtin): the call itself tells
        pass
    model = guarded(factory, f"model factory {spec!r} (called with {dict(kwargs)!r})")(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"model {spec!r}: {attr}() returned a {type(model).__name__}, not an nn.Module; "
            "Fix: return the model itself."
        )
    return model


def load_transformers(path: Path, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """The transformers model saved in ``path``, offline, as the class its config names
    (``config.architectures``; ``AutoModel`` otherwise), in eval mode. Only safetensors
    weights are read (a pickle such as ``pytorch_model.bin`` is never unpickled), and a
    config that asks for more weights than the files hold is refused before anything is
    allocated.

    Raises:
        MissingModelError: no ``config.json`` there. ModelSpecError: it does not load.
    """
    import transformers

    kwargs = kwargs or {}
    if not (path / "config.json").is_file():
        raise MissingModelError(
            f"model directory {str(path)!r} has no config.json; Fix: pass a save_pretrained "
            "directory or " + describe() + "."
        )
    stored = _stored_weights(path)
    cls: Any = transformers.AutoConfig
    try:
        config = cls.from_pretrained(path, local_files_only=True)
        names = [a for a in config.architectures or [] if hasattr(transformers, a)]
        cls = getattr(transformers, names[0]) if names else transformers.AutoModel
        if stored is not None:
            _check_size(path, cls, config, stored)
        model = cls.from_pretrained(path, local_files_only=True, use_safetensors=True, **kwargs)
    except PruningError:
        raise
    except LOAD_ERRORS as err:
        raise ModelSpecError(
            f"model directory {str(path)!r}: {cls.__name__}.from_pretrained failed: "
            f"{first_line(err)}; Fix: save the model there with "
            "save_pretrained."
        ) from err
    return model.eval()


def _stored_weights(path: Path) -> int | None:
    """How many weights the directory's safetensors files hold (their headers only), or
    None when it has none; a directory with pickle weights only is refused."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelSpecError(
                f"model directory {str(path)!r} holds its weights as pickles only ({pickles[0]}), "
                "which prunekit never unpickles (loading a pickle can run any code); Fix: in a "
                "trusted environment, load it and save_pretrained(dir, safe_serialization=True)."
            )
        return None
    total = 0
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as weights:
                total += sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())  # noqa: SIM118 (no __iter__)
        except (SafetensorError, OSError) as err:
            raise ModelSpecError(
                f"model directory {str(path)!r}: {file.name} is not a readable safetensors file "
                f"({err}); Fix: save the model there again with save_pretrained."
            ) from err
    return total


def _check_size(path: Path, cls: Any, config: Any, stored: int) -> None:
    """Refuse a config asking for more weights than the files hold (counted on the meta
    device: nothing allocated): ``from_pretrained`` would allocate and randomly initialise
    the rest."""
    build = cls.from_config if hasattr(cls, "from_config") else cls
    with torch.device("meta"):
        needed = sum(p.numel() for p in build(config).parameters())
    if needed > stored:
        raise ModelSpecError(
            f"model directory {str(path)!r}: its config.json builds a {cls.__name__} of "
            f"{needed:,} weights but its safetensors files hold {stored:,}; Fix: pass the "
            "config.json saved with those weights (save_pretrained writes both)."
        )


def _build(spec: str, kwargs: Mapping[str, Any]) -> tuple[nn.Module, str]:
    if spec in zoo.MODELS:
        try:
            return zoo.build_model(spec, **kwargs), "zoo"
        except (TypeError, ValueError, RuntimeError) as err:  # kwargs that do not build it
            raise ModelSpecError(
                f"model {spec!r}: kwargs {dict(kwargs)!r} do not fit ({err}); Fix: pass the "
                f"keyword arguments of {zoo.MODELS[spec].__name__}."
            ) from err
    path = Path(spec)
    if path.is_dir():
        return load_transformers(path, kwargs), "transformers"
    if ":" in spec and not path.exists():
        return _factory(spec, kwargs), "factory"
    if path.exists():
        raise ModelSpecError(f"model {spec!r} is a file, not a model; Fix: pass {describe()}.")
    raise MissingModelError(f"model {spec!r} does not exist; Fix: pass {describe()}.")


def _read(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors or torch checkpoint file, never unpickling objects."""
    try:
        if path.suffix in TORCH_SUFFIXES:
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            state = load_file(str(path))
    except Exception as err:  # the readers see only the file's bytes: any failure is the file's
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not read as safetensors or a weights-only torch "
            f"file ({first_line(err)}); Fix: save it with safetensors.torch.save_file "
            "or torch.save(model.state_dict())."
        ) from err
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a state dict of tensors; Fix: save "
            "model.state_dict()."
        )
    return dict(state)


def _storage(t: Tensor) -> tuple[int, int]:
    """Where ``t``'s data lives; tensors with no elements never alias one another."""
    return (t.data_ptr(), 0) if t.numel() else (id(t), 1)


def _mismatch(model: nn.Module, state: Mapping[str, Tensor]) -> list[str]:
    """What keeps ``state`` from loading strictly into ``model`` (tied weights stored once
    count as present)."""
    expected = model.state_dict()
    aliases: dict[int, set[str]] = {}
    for name, t in expected.items():
        aliases.setdefault(_storage(t), set()).add(name)
    present = set(state)
    missing = [k for k in expected if not aliases[_storage(expected[k])] & present]
    problems = [f"missing keys {missing[:4]}"] if missing else []
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:4]}")
    for k, t in state.items():
        if k in expected and tuple(t.shape) != tuple(expected[k].shape):
            problems.append(f"{k}: checkpoint {tuple(t.shape)} vs model {tuple(expected[k].shape)}")
    return problems


def load_checkpoint(model: nn.Module, checkpoint: str | Path, spec: str = "model") -> nn.Module:
    """Load ``checkpoint`` (see the module docstring) into ``model`` in place; return it.

    Raises:
        MissingModelError: the path does not exist.
        CheckpointError: unreadable, or keys / shapes that do not match ``model``.
    """
    path = Path(checkpoint)
    if not path.exists():
        raise MissingModelError(
            f"checkpoint {str(path)!r} does not exist; Fix: pass a safetensors / torch file "
            "or a save_shrunk directory."
        )
    if path.is_dir():
        if not (path / LAYOUT).is_file():
            raise CheckpointError(
                f"checkpoint directory {str(path)!r} has no {LAYOUT}; Fix: pass a directory "
                "written by prunekit.save_shrunk, or the weights file itself."
            )
        return load_shrunk(model, path)
    state = _read(path)
    fix = (
        f"Fix: pass the checkpoint saved from {spec!r} (and the --model-kwargs it was built with)."
    )
    if any(masks.is_mask_key(k) for k in state):
        problems = masks.state_mismatch(model, state)  # checked before any mask is registered
        if problems:
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not match {spec!r}: {'; '.join(problems)}; {fix}"
            )
        masks.load_state_dict(model, state)
        return model
    problems = _mismatch(model, state)
    if problems:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match {spec!r}: {'; '.join(problems)}; {fix}"
        )
    full = dict(state)
    expected = model.state_dict()
    for k, t in expected.items():  # a tied weight stored once fills its aliases
        if k not in full:
            full[k] = next(state[a] for a in state if _storage(expected[a]) == _storage(t))
    model.load_state_dict(full)
    return model


def load_model(
    spec: str,
    *,
    kwargs: Mapping[str, Any] | None = None,
    checkpoint: str | Path | None = None,
) -> LoadedSpec:
    """Build the model named by ``spec`` and load ``checkpoint`` into it (module docstring).

    Raises:
        MissingModelError: a path that does not exist.
        ModelSpecError: a factory that does not import, is not callable, rejects ``kwargs``
            or returns no ``nn.Module``; an unknown name.
        CheckpointError: a checkpoint that does not read or does not match the model.
    """
    if not isinstance(spec, str):
        raise ModelSpecError(f"model spec {spec!r} is not a string; Fix: pass {describe()}.")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ModelSpecError(f"kwargs={kwargs!r} is not a mapping; Fix: e.g. {{'width': 8}}.")
    if checkpoint is not None and not isinstance(checkpoint, str | Path):
        raise ModelSpecError(f"checkpoint={checkpoint!r} is not a path; Fix: pass a file name.")
    model, kind = _build(spec, kwargs or {})
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, spec)
    return LoadedSpec(model, spec, kind, Path(checkpoint) if checkpoint else None)


def check_fits(model: nn.Module, name: str, data: zoo.Dataset) -> None:
    """Raise a :class:`ModelSpecError` unless ``model`` accepts ``data``'s inputs."""
    try:
        with torch.no_grad():
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            model.eval()(data.x_train[:2].to(device))
    except RuntimeError as err:
        raise ModelSpecError(
            f"model {name!r} does not accept {data.name} inputs of shape "
            f"{tuple(data.input_shape)}: {first_line(err)}; "
            "Fix: pick a model built for that input shape (or pass its --model-kwargs)."
        ) from err


def example_inputs(loaded: LoadedSpec, *, input_shape: tuple[int, ...] | None = None) -> Inputs:
    """One input the model accepts, the first that applies: a seeded ``randn(input_shape)``,
    the zoo's example input, or for transformers a token / pixel batch sized by the config
    (an input of the data: :func:`prunekit.cli_model.example_input`).

    Raises:
        ModelSpecError: a factory model given no ``input_shape``.
    """
    gen = torch.Generator().manual_seed(0)
    if input_shape is not None:
        return torch.randn(*input_shape, generator=gen)
    if loaded.kind == "zoo":
        return zoo.example_input(loaded.spec)
    if loaded.kind == "transformers":
        config = loaded.model.config
        if getattr(loaded.model, "main_input_name", "input_ids") == "pixel_values":
            size = getattr(config, "image_size", 32)
            size = size if isinstance(size, int) else size[0]
            channels = getattr(config, "num_channels", 3)
            return {"pixel_values": torch.randn(1, channels, size, size, generator=gen)}
        vocab = getattr(config, "vocab_size", 100)
        return {"input_ids": torch.randint(0, vocab, (1, 16), generator=gen)}
    raise ModelSpecError(
        f"model {loaded.spec!r} needs an example input; Fix: pass --dataset or "
        "--input-shape 1,1,28,28."
    )
