"""Trace one forward pass and record how channels couple.

The model runs once, eagerly, on the example inputs, under a
:class:`torch.overrides.TorchFunctionMode`: every torch function it calls is computed as
usual and recorded; then, in the order they ran, a *rule* per operation
(:mod:`prunekit.structured.registry`; the built-in ones in
:mod:`prunekit.structured.rules`) propagates channel labels from the inputs to the
outputs and unites coupled atoms (:class:`Tracer` says why afterwards, not in between).
Running the real forward instead of a symbolic trace means Python control flow, Hugging
Face models and anything else that runs eagerly are traced as they execute; torch.fx /
torch.export would reject much of that. An operation without a rule that touches a
labelled tensor stops the trace with an :class:`UntraceableError` naming it and how to
register a rule; operations on unlabelled tensors (masks, positions, shapes) need no rule.

Modules can be traced as a whole by a *module rule* (``register_module_rule``): the
mode is suspended inside them and the rule sees the module, its inputs (keyword
arguments bound to their positions) and its output. RNNs are kept whole this way.

The pass runs in eval mode. If a module holding parameters did not run there (an
auxiliary head that only runs in training, as in GoogLeNet / Inception-v3), a second
pass runs in train mode and adds its couplings, so those branches are resized too; the
buffers it updates (BatchNorm statistics) are put back afterwards.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from torch.overrides import TorchFunctionMode

from prunekit.cost import MacCounter, unfused_attention
from prunekit.errors import CouplingError, UntraceableError
from prunekit.inputs import Inputs, call, set_mode
from prunekit.structured import rules as _builtin_rules  # noqa: F401  (registers them)
from prunekit.structured.labels import Atoms
from prunekit.structured.registry import ModuleRule, func_name, function_rule, module_rule
from prunekit.structured.state import HeadEvent, TraceState, output_tensors, tensors


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
    norms: int = 0  # normalisations approximate mode let channels through
    trained: bool = False  # a train-mode pass ran (some module runs only in training)
    # the floating-point outputs of the eval-mode pass: the model's outputs on the example
    # inputs (eval mode, no grad), so verify need not run the unpruned model again
    outputs: list[Tensor] = field(default_factory=list)
    macs: int | None = None  # MACs of the eval-mode pass (trace(macs=True)), as count_macs


# In-place operations that change a tensor's shape: the rules recorded before one runs are
# replayed first, while the shapes they read are still those their operations made.
_RESHAPED_IN_PLACE = frozenset(
    getattr(Tensor, n) for n in (
        "unsqueeze_", "squeeze_", "transpose_", "t_", "swapdims_", "swapaxes_", "resize_",
        "resize_as_", "as_strided_", "set_",
    ) if hasattr(Tensor, n)
)  # fmt: skip
# Outputs held by recorded operations before they are replayed. Held outputs cannot be
# freed for the next operations to reuse, so the allocator maps fresh pages for them:
# ResNet-50's trace at batch 1 took 62.8 ms holding 64 MiB, 50.1 ms holding 16 MiB,
# 50.6 / 52.7 ms at 8 / 2 MiB (rules run between more operations); MobileNetV2's 29.5
# vs 23.5 ms (20 interleaved passes each, 2 threads; not slower at batch 8).
FLUSH_BYTES = 16 << 20
# Floating-point outputs of at least this size are recorded as shape-only stand-ins
# (:meth:`Tracer.recorded`): rules read shapes and labels, never activation values
# (``register_rule``), and an activation the model has dropped is then freed at once for
# the next operation to reuse (MobileNetV2's trace 24.3 -> 20.3 ms, ResNet-50's 47.3 ->
# 43.2 ms, 25 interleaved passes). Smaller ones, and integer ones (indices a rule may
# read), are held as they are.
STAND_IN_BYTES = 1 << 16


class Tracer(TorchFunctionMode):
    """Runs a model once and fills a :class:`TraceState` (use :func:`trace`).

    The forward pass only *records* each operation (its function, arguments and output)
    and each module entered or left; the rules run afterwards, in the same order
    (:meth:`flush`). Running a rule's Python between two operations of the model lets the
    CPU thread pool fall asleep, so every next operation paid for waking it: traced
    operations ran ~30% slower than untraced ones at 2 threads (ResNet-50: 64 ms instead
    of 48 ms for the operations alone). Large floating-point activations are recorded as
    shape-only stand-ins (:meth:`recorded`); the other tensors are held until replayed:
    every ``FLUSH_BYTES`` of them, before an in-place reshape, and at the end.
    """

    def __init__(self, model: nn.Module, counter: MacCounter | None = None) -> None:
        super().__init__()
        self.model = model
        self.counter = counter  # counts each model operation, not the function rules' work
        self.state = TraceState(model)
        self.suspended = 0  # > 0 inside a module traced whole by a module rule
        self.ran: set[str] = set()  # names of the modules that ran
        self.pending: list[tuple[Callable[..., None], tuple]] = []  # replayed by flush()
        self.held = 0  # bytes of the outputs pending operations hold
        # id(activation) -> (a weak reference to it, its stand-in); dropped when it is freed
        self.stand_ins: dict[int, tuple[weakref.ref, Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in _RESHAPED_IN_PLACE:
            self.flush()
        if self.counter is None:
            out = func(*args, **kwargs)
        else:
            out = self.counter.call(func, args, kwargs)
        if not self.suspended:
            # the inputs first: an in-place reshape's output gets a new stand-in
            held = (func, self.recorded(args), self._kwargs(kwargs))
            recorded = self.recorded(out, new=True)
            self.pending.append((self._rule, (*held, recorded)))
            if isinstance(recorded, Tensor) and not recorded.is_meta:
                self.held += recorded.nbytes
                if self.held > FLUSH_BYTES:
                    self.flush()
        return out

    def recorded(self, value: Any, new: bool = False) -> Any:
        """``value`` as the rules will see it: lists, tuples and dicts copied (the model
        may append to one before the rule is replayed), every activation that has a
        stand-in replaced by it; with ``new`` (an operation's outputs), stand-ins made
        for the large floating-point ones (:data:`STAND_IN_BYTES`)."""
        if isinstance(value, Tensor):
            found = self.stand_ins.get(id(value))
            if found is None or (new and found[1].shape != value.shape):
                return self._stand_in(value) if new else value
            return found[1]
        kind = type(value)
        if kind is tuple or kind is list:
            return kind([self.recorded(v, new) for v in value])
        if kind is dict:
            return {k: self.recorded(v, new) for k, v in value.items()}
        return value

    def _kwargs(self, kwargs: dict) -> dict:
        return {k: self.recorded(v) for k, v in kwargs.items()} if kwargs else kwargs

    def _stand_in(self, t: Tensor) -> Tensor:
        """A meta tensor of ``t``'s shape and strides, standing in for it while it lives
        (an in-place reshape gets a new one); ``t`` itself if small, not floating point,
        a subclass or a parameter / buffer (their names are looked up by identity)."""
        if (type(t) is not Tensor or t.layout != torch.strided or not t.is_floating_point()
                or t.nbytes < STAND_IN_BYTES or id(t) in self.state.names):  # fmt: skip
            return t
        stand_in = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        at = id(t)
        drop = self.stand_ins.pop
        self.stand_ins[at] = (weakref.ref(t, lambda _, at=at: drop(at, None)), stand_in)
        return stand_in

    def flush(self) -> None:
        """Run the rules of everything recorded so far, in order (outside the mode: a
        rule's own operations are not traced)."""
        pending, self.pending, self.held = self.pending, [], 0
        for step, payload in pending:
            step(*payload)

    def _rule(self, func: Callable[..., Any], args: tuple, kwargs: dict, out: Any) -> None:
        if not _any_labelled(self.state, args, kwargs):
            return
        rule = function_rule(func)
        if rule is None:
            name, where = func_name(func), self.state.where
            raise UntraceableError(
                f"cannot trace {name!r} in module {where!r}: no rule says how it moves "
                "channels. Fix: register one with prunekit.structured.register_rule("
                f"{name!r}, rule), or trace the module whole with register_module_rule("
                "type(module), prunekit.structured.keep_whole)."
            )
        try:
            rule(self.state, func, args, kwargs, out)
        except CouplingError as exc:
            name, where = func_name(func), self.state.where
            raise CouplingError(
                f"{exc} in {name!r} of module {where!r}; Fix: the rule for {name!r} must "
                "couple equal-length channel runs (check a custom rule or a reshape)."
            ) from None

    @contextmanager
    def hooks(self) -> Iterator[None]:
        """Follow which module runs. A module traced whole by a module rule gets a pre-
        and a post-hook of its own, registered after the module's own hooks so they see
        what the model's hooks made of the inputs and outputs (torch runs hooks common to
        all modules first); every other module is followed by one pre- and one post-hook
        common to all modules (``register_module_forward_*_hook``), which skip modules
        outside the model: registering two hooks on each of MobileNetV2's 178 modules
        cost ~2 ms of a 10 ms pass."""
        known: dict[int, str] = {}
        handles = []
        for name, module in self.model.named_modules():
            rule = module_rule(module)
            if rule is None:
                known[id(module)] = name
                continue
            handles.append(module.register_forward_pre_hook(self._enter(name, rule)))
            handles.append(module.register_forward_hook(self._leave(rule), with_kwargs=True))
        handles.append(register_module_forward_pre_hook(self._enter_any(known)))
        handles.append(register_module_forward_hook(self._leave_any(known)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _enter_any(self, known: dict[int, str]) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            name = known.get(id(module))
            if name is not None:
                self.pending.append((self.state.stack.append, (name,)))
                self.ran.add(name)

        return hook

    def _leave_any(self, known: dict[int, str]) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            if id(module) in known:
                self.pending.append((self.state.stack.pop, ()))

        return hook

    def _enter(self, name: str, rule: ModuleRule) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            self.pending.append((self.state.stack.append, (name,)))
            self.ran.add(name)
            self.suspended += 1

        return hook

    def _leave(self, rule: ModuleRule) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            self.suspended -= 1
            if not self.suspended:
                held = self.recorded(_positional(module, args, kwargs))
                self.pending.append((rule, (self.state, module, held, self.recorded(out, True))))
            self.pending.append((self.state.stack.pop, ()))

        return hook


def _any_labelled(state: TraceState, args: tuple, kwargs: dict) -> bool:
    """Whether a tensor among ``args`` / ``kwargs`` (or in a list, tuple or dict among
    them, as ``torch.cat`` takes) carries channels; faster than flattening the tree."""
    for x in (*args, *kwargs.values()):
        if isinstance(x, Tensor) and state.is_labelled(x):
            return True
        if isinstance(x, list | tuple | dict) and any(map(state.is_labelled, tensors(x))):
            return True
    return False


def _positional(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """``args`` with ``kwargs`` bound to their positions (defaults fill the gaps)."""
    if not kwargs:
        return args
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError:
        return (*args, *kwargs.values())
    bound.apply_defaults()
    return (*bound.args, *bound.kwargs.values())


@contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Put every buffer's values back afterwards (a train-mode pass updates BatchNorm's)."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def _pass(tracer: Tracer, model: nn.Module, inputs: Inputs, training: bool) -> list[Tensor]:
    """One traced forward pass; returns the model's floating-point output tensors."""
    with set_mode(model, training), torch.no_grad(), tracer.hooks(), tracer:
        out = call(model, inputs)
    tracer.flush()
    found = output_tensors(out)
    tracer.state.block_inputs(*tracer.recorded(found))
    return [t for t in found if t.is_floating_point()]


def trace(model: nn.Module, inputs: Inputs, macs: bool = False) -> Trace:
    """Run ``model`` on ``inputs`` (eval mode, no grad; then train mode if some module
    holding parameters did not run) and return the coupling it showed.

    Every channel that reaches a model output is blocked: outputs keep their shape. With
    ``macs``, the eval-mode pass is also counted as :func:`prunekit.cost.count_macs`
    counts (:attr:`Trace.macs`; each operation of the model is counted by
    :meth:`~prunekit.cost.MacCounter.call`, from its shapes where a shortcut covers it,
    so the function rules' label work runs uncounted and at full speed).
    """
    counter = MacCounter() if macs else None
    tracer = Tracer(model, counter)
    with unfused_attention() if macs else nullcontext():
        outputs = _pass(tracer, model, inputs, training=False)
    tracer.counter = None
    idle = [
        n
        for n, m in model.named_modules()
        if n not in tracer.ran and any(p is not None for p in m._parameters.values())
    ]
    if idle:  # dropout draws from the global generator: fork it
        with buffers_kept(model), torch.random.fork_rng(devices=[]):
            _pass(tracer, model, inputs, training=True)
    state = tracer.state
    aliases = {names[0]: names for names in state.names.values()}
    found = None if counter is None else counter.macs
    return Trace(state.atoms, state.members, aliases, state.heads, state.producers,
                 state.norms, bool(idle), outputs, found)  # fmt: skip
