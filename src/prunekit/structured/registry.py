"""The channel-rule registry: which rule traces each torch function and module type.

A *function rule* ``rule(state, func, args, kwargs, out)`` runs after ``func`` ran on
channel-carrying tensors; a *module rule* ``rule(state, module, args, out)`` traces a
whole module as one operation. ``state`` is the :class:`~prunekit.structured.state.
TraceState` of the pass. The tracer (:mod:`prunekit.structured.trace`) looks rules up
here; the built-in ones (:mod:`prunekit.structured.rules`) and users' are registered here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from prunekit.structured.state import TraceState, tensors

FunctionRule = Callable[[TraceState, Callable[..., Any], tuple, dict, Any], None]
ModuleRule = Callable[[TraceState, nn.Module, tuple, Any], None]

_FUNCTION_RULES: dict[Callable[..., Any] | str, FunctionRule] = {}
_MODULE_RULES: dict[type[nn.Module], ModuleRule] = {}


def func_name(func: Callable[..., Any]) -> str:
    """The name rules are registered under: ``"add"`` for ``torch.add`` and ``Tensor.add``."""
    if getattr(func, "__name__", "") == "__get__":  # a property such as Tensor.T
        return getattr(getattr(func, "__self__", None), "__name__", "__get__")
    name = getattr(func, "__name__", None)  # repr only when there is none: once per op
    return name if isinstance(name, str) else repr(func)


def register_rule(func: Callable[..., Any] | str, rule: FunctionRule) -> None:
    """Teach the tracer a torch function (or a function name, e.g. ``"my_op"``).

    ``rule(state, func, args, kwargs, out)`` is called after the forward pass, in the
    order the operations ran, so it reads shapes and labels, not values: a floating-point
    activation of 64 KiB or more reaches it as a meta tensor of the shape it had then (a
    stand-in; the activation itself is freed when the model drops it), and smaller ones
    may have been changed in place since. It reads input labels with
    ``state.label(t)``, couples channels with ``state.atoms.unite(a, b)``, marks channels
    that must stay with ``state.atoms.block(ids)``, gives parameters atoms with
    ``state.param_atoms(p, dim)`` (or ties a parameter dimension to channels it goes
    with, as a norm's vectors go with its input's, by ``state.couple(p, dim, ids)``: the
    same as uniting, cheaper) and labels outputs with ``state.set``.
    """
    _FUNCTION_RULES[func] = rule


def register_module_rule(module_type: type[nn.Module], rule: ModuleRule) -> None:
    """Trace every ``module_type`` instance as one operation: ``rule(state, module, args, out)``.

    Inside the module nothing is traced. :func:`keep_whole` is a ready rule for modules
    that must not change (their parameters keep their shape, their inputs keep every
    channel, their outputs carry none).
    """
    _MODULE_RULES[module_type] = rule


def keep_whole(state: TraceState, module: nn.Module, args: tuple, out: Any) -> None:
    """Module rule: the module stays as it is, so every channel it reads is kept."""
    state.block_inputs(*tensors(args))


def function_rule(func: Callable[..., Any]) -> FunctionRule | None:
    """The rule registered for ``func`` itself, else for its name (None if neither)."""
    return _FUNCTION_RULES.get(func) or _FUNCTION_RULES.get(func_name(func))


def module_rule(module: nn.Module) -> ModuleRule | None:
    """The rule of the first registered type ``module`` is an instance of (None if none)."""
    return next((r for t, r in _MODULE_RULES.items() if isinstance(module, t)), None)
