"""Fused mixture-of-experts weights, pruned expert by expert on the tokens routed to each.

In transformers 5, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 (and the other
models whose experts module is built with ``use_experts_implementation``) store all
experts of a block in one module as 3-D parameters, called as ``experts(hidden (tokens,
hidden), top_k_index (tokens, k), top_k_weights (tokens, k))``:

    gate_up_proj  (experts, 2 * inter, hidden)   gate, up = (x @ gate_up_proj[e].T).chunk(2)
    down_proj     (experts, hidden, inter)       y_e = (act(gate) * up) @ down_proj[e].T

and the block adds ``top_k_weights * y_e`` over the k experts each token was sent to.
Each ``gate_up_proj[e]`` / ``down_proj[e]`` is a canonical ``(out, in)`` matrix, pruned
like a Linear layer with statistics from the tokens routed to expert ``e`` only: the
inputs of ``gate_up_proj[e]`` are those tokens' hidden states ``x_t``, the inputs of
``down_proj[e]`` are ``act(gate) * up`` of them (the routing weight multiplies the output,
so it is no part of the input). A forward pre-hook on the experts module reads the
router's decision (``top_k_index``) from its arguments, so any router and any
``experts_implementation`` (eager, grouped_mm...) gives the same statistics.

Other layouts (transposed, interleaved gate/up, with biases as in GPT-OSS, no gate) are
not recognised here: their tensors stay dense and the report lists them as skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

PARAMS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class FusedExperts:
    """One experts module of a block, named ``name``, with ``count`` experts."""

    name: str
    module: nn.Module

    @property
    def count(self) -> int:
        return int(self.module.gate_up_proj.shape[0])

    def matrices(self) -> Iterator[tuple[str, Tensor, int]]:
        """``(key, parameter, expert)`` for every expert matrix: key ``name.param.e``."""
        for param in PARAMS:
            tensor = getattr(self.module, param)
            for e in range(self.count):
                yield f"{self.name}.{param}.{e}", tensor, e


def _supported(module: nn.Module) -> bool:
    gate_up, down = (getattr(module, p, None) for p in PARAMS)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)):
        return False
    if gate_up.dim() != 3 or down.dim() != 3 or not callable(getattr(module, "act_fn", None)):
        return False
    layout = (
        getattr(module, "is_transposed", False),
        getattr(module, "has_bias", False),
        getattr(module, "is_concatenated", True),
        getattr(module, "has_gate", True),
    )
    experts, two_inter, hidden = gate_up.shape
    same = down.shape == (experts, hidden, two_inter // 2) and two_inter % 2 == 0
    return layout == (False, False, True, True) and same


def find_experts(block: nn.Module, prefix: str) -> list[FusedExperts]:
    """The fused experts modules of ``block`` in the layout of the module docstring."""
    return [
        FusedExperts(f"{prefix}.{name}", module)
        for name, module in block.named_modules()
        if _supported(module)
    ]


def _routed(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
    hidden = args[0] if args else kwargs["hidden_states"]
    index = args[1] if len(args) > 1 else kwargs["top_k_index"]
    return hidden, index


RowFn = Callable[[str, Tensor, Tensor], None]
"""``fn(key, inputs (tokens, in), matrix (out, in))`` for each expert matrix and batch."""


def _visit(experts: FusedExperts, hidden: Tensor, index: Tensor, fn: RowFn) -> None:
    module = experts.module
    gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()
    for e in range(experts.count):
        routed = (index == e).any(-1)
        if not bool(routed.any()):
            continue
        x = hidden[routed].to(gate_up.dtype)
        fn(f"{experts.name}.gate_up_proj.{e}", x, gate_up[e])
        gate, up = (x @ gate_up[e].T).chunk(2, dim=-1)
        fn(f"{experts.name}.down_proj.{e}", module.act_fn(gate) * up, down[e])


@contextmanager
def expert_hooks(
    experts: list[FusedExperts], rows: Callable[[Tensor], Tensor], fn: RowFn
) -> Iterator[None]:
    """While open, each forward of an experts module calls ``fn`` once per expert matrix
    on the tokens routed to that expert; ``rows`` keeps the real tokens of a
    ``(..., features)`` tensor (padding dropped) and is applied to the hidden states and to
    the router's ``top_k_index`` alike."""

    def hook(ex: FusedExperts) -> Callable[[nn.Module, tuple, dict], None]:
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden, index = _routed(args, kwargs)
            with torch.no_grad():
                _visit(ex, rows(hidden), rows(index), fn)

        return pre

    handles = [ex.module.register_forward_pre_hook(hook(ex), with_kwargs=True) for ex in experts]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
