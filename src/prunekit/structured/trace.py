"""Trace one forward pass and record how channels couple.

The model runs once, eagerly, on the example inputs, under a
:class:`torch.overrides.TorchFunctionMode`: every torch function it calls is computed as
usual, then a *rule* (:mod:`prunekit.structured.rules`) propagates channel labels from
the inputs to the outputs and unites coupled atoms. Running the real forward instead of
a symbolic trace means Python control flow, Hugging Face models and anything else that
runs eagerly are traced as they execute; torch.fx / torch.export would reject much of
that. An operation without a rule that touches a labelled tensor stops the trace with an
:class:`UntraceableError` naming it and how to register a rule; operations on unlabelled
tensors (masks, positions, shapes) need no rule.

Modules can be traced as a whole by a *module rule* (:func:`register_module_rule`): the
mode is suspended inside them and the rule sees the module, its inputs and its output.
RNNs and ``nn.MultiheadAttention`` are kept whole this way by default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from prunekit.errors import PruningError
from prunekit.inputs import Inputs, call, eval_mode
from prunekit.structured.labels import FIXED, Atoms, CouplingError, Label

FunctionRule = Callable[["Tracer", Callable[..., Any], tuple, dict, Any], None]
ModuleRule = Callable[["Tracer", nn.Module, tuple, Any], None]

_FUNCTION_RULES: dict[Callable[..., Any] | str, FunctionRule] = {}
_MODULE_RULES: dict[type[nn.Module], ModuleRule] = {}


class UntraceableError(PruningError):
    """The trace met an operation on channel-carrying tensors that has no rule."""


def register_rule(func: Callable[..., Any] | str, rule: FunctionRule) -> None:
    """Teach the tracer a torch function (or a function name, e.g. ``"my_op"``).

    ``rule(tracer, func, args, kwargs, out)`` is called after ``func`` ran; it reads input
    labels with ``tracer.label(t)``, couples channels with ``tracer.atoms.unite(a, b)``,
    marks channels that must stay with ``tracer.atoms.block(ids)``, gives parameters
    atoms with ``tracer.param_atoms(p, dim)`` and labels outputs with ``tracer.set``.
    """
    _FUNCTION_RULES[func] = rule


def register_module_rule(module_type: type[nn.Module], rule: ModuleRule) -> None:
    """Trace every ``module_type`` instance as one operation: ``rule(tracer, module, args, out)``.

    Inside the module nothing is traced. :func:`keep_whole` is a ready rule for modules
    that must not change (their parameters keep their shape, their inputs keep every
    channel, their outputs carry none).
    """
    _MODULE_RULES[module_type] = rule


def keep_whole(tracer: Tracer, module: nn.Module, args: tuple, out: Any) -> None:
    """Module rule: the module stays as it is, so every channel it reads is kept."""
    for t in _tensors(args):
        label = tracer.label(t)
        if label is not None:
            tracer.atoms.block(label.ids)


def _tensors(tree: Any) -> list[Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, Tensor)]


def func_name(func: Callable[..., Any]) -> str:
    if getattr(func, "__name__", "") == "__get__":  # a property such as Tensor.T
        return getattr(getattr(func, "__self__", None), "__name__", "__get__")
    return getattr(func, "__name__", repr(func))


@dataclass
class HeadEvent:
    """Attention in ``module``: the head labels of its queries and of its keys/values."""

    module: str
    q_heads: Tensor
    kv_heads: Tensor


@dataclass
class Trace:
    """What one traced forward pass found."""

    atoms: Atoms
    # (tensor name, dim) -> atom per index of that dim, for parameters and buffers
    members: dict[tuple[str, int], Tensor]
    # every qualified name of each traced parameter/buffer (tied weights have several)
    aliases: dict[str, list[str]]
    heads: list[HeadEvent] = field(default_factory=list)
    # (tensor name, dim) whose atoms label some operation's output, in call order
    producers: list[tuple[str, int]] = field(default_factory=list)
    macs: int = 0  # of the traced forward pass (FlopCounterMode)


class Tracer(TorchFunctionMode):
    """Runs a model once and collects :class:`Trace` (use :func:`trace`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.atoms = Atoms()
        self.members: dict[tuple[str, int], Tensor] = {}
        self.member_keys: dict[int, tuple[str, int]] = {}  # id(atoms) -> key
        self.producers: list[tuple[str, int]] = []
        self.labels: dict[int, tuple[Tensor, Label]] = {}
        self.names: dict[int, list[str]] = {}
        self.params: set[int] = set()
        for name, p in model.named_parameters(remove_duplicate=False):
            self.names.setdefault(id(p), []).append(name)
            self.params.add(id(p))
        for name, b in model.named_buffers(remove_duplicate=False):
            self.names.setdefault(id(b), []).append(name)
        self.stack: list[str] = []
        self.suspended = 0
        self.heads: list[HeadEvent] = []

    # -- the API rules use -------------------------------------------------------------
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

    def param_atoms(self, p: Tensor, dim: int) -> Tensor:
        """The atoms of dimension ``dim`` of parameter or buffer ``p`` (fresh the first time)."""
        dim = dim % p.dim()
        key = (self.names[id(p)][0], dim)
        if key not in self.members:
            self.members[key] = self.atoms.new(p.shape[dim])
            self.member_keys[id(self.members[key])] = key
        return self.members[key]

    def set(self, out: Any, label: Label | None) -> None:
        if isinstance(out, Tensor) and label is not None:
            self.labels[id(out)] = (out, Label(label.dim % out.dim(), label.ids))
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

    # -- the mode ----------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.suspended:
            return out
        inputs = _tensors((args, kwargs))
        if not any(id(t) in self.labels or id(t) in self.params for t in inputs):
            return out
        name = func_name(func)
        rule = _FUNCTION_RULES.get(func) or _FUNCTION_RULES.get(name)
        if rule is None:
            raise UntraceableError(
                f"cannot trace {name!r} in module {self.where!r}: no rule says how it moves "
                "channels. Fix: register one with prunekit.structured.register_rule("
                f"{name!r}, rule), or trace the module whole with register_module_rule("
                "type(module), prunekit.structured.keep_whole)."
            )
        try:
            rule(self, func, args, kwargs, out)
        except CouplingError as exc:
            raise CouplingError(
                f"{exc} in {name!r} of module {self.where!r}; Fix: the rule for {name!r} must "
                "couple equal-length channel runs (check a custom rule or a reshape)."
            ) from None
        return out

    @contextmanager
    def hooks(self) -> Iterator[None]:
        handles = []
        for name, module in self.model.named_modules():
            rule = next((r for t, r in _MODULE_RULES.items() if isinstance(module, t)), None)
            handles.append(module.register_forward_pre_hook(self._enter(name, rule)))
            handles.append(module.register_forward_hook(self._leave(rule)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _enter(self, name: str, rule: ModuleRule | None) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            self.stack.append(name)
            if rule is not None:
                self.suspended += 1

        return hook

    def _leave(self, rule: ModuleRule | None) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            if rule is not None:
                self.suspended -= 1
                if not self.suspended:
                    rule(self, module, args, out)
            self.stack.pop()

        return hook


def trace(model: nn.Module, inputs: Inputs) -> Trace:
    """Run ``model`` once on ``inputs`` (eval mode, no grad) and return the coupling it showed.

    Every channel that reaches a model output is blocked: outputs keep their shape.
    """
    from prunekit.structured import rules  # noqa: F401  (registers the built-in rules)

    tracer = Tracer(model)
    counter = FlopCounterMode(display=False)  # the same pass counts the MACs
    with eval_mode(model), torch.no_grad(), tracer.hooks(), counter, tracer:
        out = call(model, inputs)
    tracer.block_inputs(*_tensors(_output_tree(out)))
    aliases = {names[0]: names for names in tracer.names.values()}
    macs = counter.get_total_flops() // 2
    return Trace(tracer.atoms, tracer.members, aliases, tracer.heads, tracer.producers, macs)


def _output_tree(out: Any) -> Any:
    # transformers' ModelOutput is a dict subclass; pytree sees through tuples and dicts
    return dict(out) if isinstance(out, Mapping) else out
