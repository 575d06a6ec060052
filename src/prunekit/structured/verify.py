"""The checks around :func:`prunekit.shrink`: finite weights before, equal outputs after.

Before anything changes, every parameter and buffer must be finite (a NaN or inf makes
every score and every output comparison meaningless).

After removal, the shrunk model's outputs are compared with the *group-masked* model's
(the removed groups zeroed, nothing removed), on the example inputs. Both quantities are
measured relative to the output's scale ``s = max(|y_masked|, |y_dense|)``, so an output
of scale 1e-3 is held to the same standard as one of scale 10:

=============  ====================================================================
deviation      ``max |y_shrunk - y_masked| / s``; the check fails above
               ``max(1e-4, 20 * eps(dtype))``
sensitivity    ``max |y_dense - y_masked| / s``: how much zeroing the removed groups
               moves the outputs on these inputs
=============  ====================================================================

A check is only as strong as its sensitivity: if zeroing the removed groups barely moves
the outputs (sensitivity < 1e-3, e.g. a model whose outputs do not depend on those
channels at the example inputs), a wrong channel kept or removed could go unseen. Then
random inputs are drawn at 1x, then 10x the example inputs' scale (floating inputs
``N(0, max(1, k std(x))^2)``, integer inputs uniform over the values seen) until one
reaches 1e-3, and every input set drawn is checked too. The 1x draw is skipped when it
would only repeat the example inputs' scale (every input floating point with std >= 0.9:
the draw's std, ``max(1, std)``, is then within 10% of theirs).
If none reaches 1e-3 the report says the check was weak,
with the sensitivity it reached, instead of passing silently.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from prunekit.cost import counting, unfused_attention
from prunekit.errors import InvalidWeightError, ShrinkVerificationError
from prunekit.inputs import Inputs, call, call_eval, set_mode
from prunekit.structured.graph import Group
from prunekit.structured.masked import group_masked_tensors, hooked, masking, swapped
from prunekit.structured.state import output_tensors
from prunekit.structured.surgery import Slices, attribute, size_attributes
from prunekit.structured.trace import buffers_kept

RTOL = 1e-4
WEAK = 1e-3
SCALES = (1.0, 10.0)  # random inputs at 1x and 10x the example inputs' scale


def require_finite(model: nn.Module) -> None:
    """Refuse a model holding NaN or inf in a parameter or buffer, naming the tensor."""
    found = [t for t in (*model.parameters(), *model.buffers())
             if t.is_floating_point() and not t.is_meta]  # fmt: skip
    if _all_finite(found):  # names only when one is to be given
        return
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if not t.is_floating_point() or t.is_meta:
            continue
        if _all_finite([t]):
            continue
        values = sorted({str(v) for v in t[~torch.isfinite(t)].tolist()})
        layer = name.rpartition(".")[0] or "<model>"
        raise InvalidWeightError(
            f"layer {layer!r} holds {int((~torch.isfinite(t)).sum())} non-finite value(s) "
            f"({', '.join(values)}) in {name!r}; channel scores and the output check would be "
            "meaningless. Fix: repair the weights (check the training run) before shrinking."
        )


def _all_finite(found: Sequence[Tensor]) -> bool:
    """Whether every value of every tensor is finite, from their sums: a NaN or inf makes
    a sum NaN or inf, so finite sums prove them all finite (the sums of each dtype and
    device checked at once: one result read, not one per tensor); a non-finite sum (or an
    overflow of large finite values) is settled element by element."""
    sums: dict[tuple, list[Tensor]] = {}
    for t in found:
        sums.setdefault((t.dtype, t.device), []).append(t.sum())
    if all(bool(torch.isfinite(torch.stack(s)).all()) for s in sums.values()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in found)


def outputs(model: nn.Module, inputs: Inputs) -> list[Tensor]:
    """The floating-point output tensors of ``model`` on ``inputs`` (eval mode, no grad;
    attention unfused, as every pass compared here runs: the trace's, counted, too)."""
    with torch.no_grad(), unfused_attention():
        found = output_tensors(call_eval(model, inputs))
    return [t for t in found if t.is_floating_point()]


def _relative(a: Sequence[Tensor], b: Sequence[Tensor], scale: Sequence[float]) -> float:
    return max(
        ((x.double() - y.double()).abs().max().item() / s if x.numel() else 0.0)
        for x, y, s in zip(a, b, scale, strict=True)
    )


@dataclass
class Probe:
    """One input set of the check: the group-masked outputs expected there."""

    inputs: Inputs
    expected: list[Tensor]
    scale: list[float]
    sensitivity: float
    what: str


def _probe(ref: list[Tensor], expected: list[Tensor], inputs: Inputs, what: str) -> Probe:
    """A probe from the dense outputs ``ref`` and the group-masked ones ``expected``."""
    same = [r.shape for r in ref] == [e.shape for e in expected]
    if not same:
        return Probe(inputs, expected, [1.0] * len(expected), 0.0, what)
    scale = [
        max(r.abs().max().item() if r.numel() else 0.0, e.abs().max().item() if e.numel() else 0.0,
            torch.finfo(torch.float32).tiny)
        for r, e in zip(ref, expected, strict=True)
    ]  # fmt: skip
    sens = _relative(ref, expected, scale) if expected else 0.0
    return Probe(inputs, expected, scale, sens, what)


def counted_outputs(model: nn.Module, inputs: Inputs) -> tuple[list[Tensor], int]:
    """:func:`outputs`, and the MACs of that forward pass (as ``count_macs`` counts)."""
    with counting() as counter:
        found = outputs(model, inputs)
    return found, counter.macs


def departed(before: list[Tensor], after: list[Tensor], inputs: Inputs) -> list[str]:
    """A note when the shrunk model, whose eval outputs on ``inputs`` are ``after``, no
    longer computes the caller's own (masked) model, whose outputs were ``before``:
    removing all-zero weight groups also drops what those channels still emitted (a bias
    or a BatchNorm shift), which the group-masked model verify compares with has zeroed
    too. Empty when they agree to :func:`tolerance` of the outputs' scale ``max |y|``."""
    if not before or [t.shape for t in before] != [t.shape for t in after]:
        return []
    found = _probe(before, after, inputs, "your model")
    if found.sensitivity <= tolerance(after):
        return []
    return [
        f"the removed channels' weights were zero but they still emitted a bias or a "
        f"BatchNorm shift: the shrunk model differs from your masked model by "
        f"{found.sensitivity:.3g} of its output scale on the example inputs (it equals the "
        "group-masked model, where those are zero too). Fix: fine-tune after shrinking, or "
        "zero those biases / shifts before it to keep the function exactly."
    ]


def _random_like(inputs: Inputs, factor: float, gen: torch.Generator) -> Inputs:
    def draw(x: Any) -> Any:
        if not isinstance(x, Tensor) or x.numel() == 0 or x.dtype == torch.bool:
            return x
        if x.is_floating_point():
            std = max(1.0, factor * float(x.double().std())) if x.numel() > 1 else factor
            return (torch.randn(x.shape, generator=gen) * std).to(x.dtype).to(x.device)
        low, high = int(x.min()), int(x.max()) + 1
        return torch.randint(low, high, x.shape, generator=gen).to(x.dtype).to(x.device)

    return tree_map(draw, inputs)


def _at_unit_scale(inputs: Inputs) -> bool:
    """Whether every input tensor is floating point with std >= 0.9: a draw at 1x scale,
    ``N(0, max(1, std)^2)``, then has the example inputs' scale to within 10%."""
    found = [x for x in tree_leaves(inputs) if isinstance(x, Tensor)]
    return bool(found) and all(
        x.is_floating_point() and x.numel() > 1 and float(x.double().std()) >= 0.9 for x in found
    )


Outputs = Callable[[Inputs], list[Tensor]]
"""A model's floating-point outputs on some inputs (eval mode, no grad)."""


def probes(dense: nn.Module, masked: nn.Module, inputs: Inputs, seed: int = 0) -> list[Probe]:
    """The input sets to check the shrunk model on: the example inputs, and while the
    check is weak (sensitivity < :data:`WEAK`), random inputs at a larger scale (each
    one drawn is checked too)."""
    return compared(partial(outputs, dense), partial(outputs, masked), inputs, seed)


def compared(dense: Outputs, masked: Outputs, inputs: Inputs, seed: int = 0) -> list[Probe]:
    """:func:`probes` of two functions giving the dense and the group-masked outputs."""
    found = [_probe(dense(inputs), masked(inputs), inputs, "the example inputs")]
    gen = torch.Generator().manual_seed(seed)
    for factor in SCALES:
        if max(p.sensitivity for p in found) >= WEAK:
            break
        if factor == 1.0 and _at_unit_scale(inputs):
            continue
        drawn = _random_like(inputs, factor, gen)
        what = f"random inputs at {factor:g}x scale"
        try:
            found.append(_probe(dense(drawn), masked(drawn), drawn, what))
        except Exception:  # inputs the model cannot take: keep the probes found
            continue
    return found


def swapped_probes(
    model: nn.Module, positions: Mapping[tuple[str, int], Tensor], inputs: Inputs,
    dense_outputs: list[Tensor] | None = None, seed: int = 0, cut: Slices | None = None,
) -> list[Probe]:  # fmt: skip
    """:func:`probes` without a copy of the model: the group-masked outputs come from
    ``model`` with channels zeroed around the layers whose arithmetic allows it (those
    layers on their kept channels alone with ``cut``, the removal's new tensors) and
    :func:`~prunekit.structured.masked.group_masked_tensors` swapped in for the other
    positions (:mod:`prunekit.structured.masked`, made once), the dense ones on the
    example inputs from ``dense_outputs`` where given (the trace's,
    :attr:`~prunekit.structured.trace.Trace.outputs`), so the example inputs
    cost one forward pass, not two."""
    found = masking(model, positions)
    tensors = group_masked_tensors(model, found.rest)

    def dense(x: Inputs) -> list[Tensor]:
        return dense_outputs if x is inputs and dense_outputs is not None else outputs(model, x)

    def masked(x: Inputs) -> list[Tensor]:
        with swapped(model, tensors), hooked(model, found, cut):
            return outputs(model, x)

    return compared(dense, masked, inputs, seed)


def refilled(masked: nn.Module, groups: Sequence[Group], seed: int = 0) -> nn.Module:
    """A copy of ``masked`` whose ``groups`` hold random values (``N(0, std^2)`` of each
    tensor): the sensitivity reference when the removed groups were zero already
    (``ratio=None``), where the dense model equals the group-masked one."""
    filled = copy.deepcopy(masked)
    params = dict(filled.named_parameters(remove_duplicate=False))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for member in (m for g in groups for m in g.members if m.name in params):
            p = params[member.name]
            std = float(p.double().std()) if p.numel() > 1 else 1.0
            shape = list(p.shape)
            shape[member.dim] = member.index.numel()
            noise = torch.randn(shape, generator=gen, dtype=p.dtype) * (std or 1.0)
            p.index_copy_(member.dim, member.index.to(p.device), noise.to(p.device))
    return filled


def tolerance(outs: Sequence[Tensor]) -> float:
    """``max(1e-4, 20 eps)`` of the widest-error dtype among ``outs``."""
    eps = max((torch.finfo(t.dtype).eps for t in outs), default=0.0)
    return max(RTOL, 20 * eps)


@dataclass(frozen=True)
class Check:
    """What the check measured: the worst relative deviation and the best sensitivity."""

    deviation: float
    sensitivity: float
    note: str
    macs: int | None = None  # of the shrunk model on the example inputs (count_macs' count)
    outputs: list[Tensor] = field(default_factory=list)  # the shrunk model's, on them


def _train_mode_problem(model: nn.Module, inputs: Inputs) -> str:
    """Whether ``model`` fails in train mode (a branch only training runs), as a message;
    BatchNorm statistics and the global generator are put back."""
    try:
        fork = torch.random.fork_rng(devices=[])
        with set_mode(model, True), torch.no_grad(), buffers_kept(model), fork:
            call(model, inputs)
    except Exception as exc:  # any failure of the shrunk model is reported
        return f"the shrunk model does not run in train mode ({type(exc).__name__}: {exc})"
    return ""


def check(
    model: nn.Module, found: Sequence[Probe], exact: bool = True, train: bool = False
) -> Check:
    """Compare ``model`` (shrunk) with every probe; raise ShrinkVerificationError if it
    does not run (with ``train``, in train mode too), or (``exact``) on a mismatch (the
    caller undoes the removal). Not ``exact``: the deviation is measured, never refused.
    The forward pass on the example inputs (the first probe) is counted as
    :func:`prunekit.cost.count_macs` counts (:attr:`Check.macs`)."""
    problem = _train_mode_problem(model, found[0].inputs) if train else ""
    deviation, first, macs = 0.0, [], None
    for probe in found if not problem else ():
        try:
            if macs is None:
                actual, macs = counted_outputs(model, probe.inputs)
                first = actual
            else:
                actual = outputs(model, probe.inputs)
        except Exception as exc:  # any failure of the shrunk model is reported
            problem = f"the shrunk model does not run ({type(exc).__name__}: {exc})"
            break
        shapes = [tuple(t.shape) for t in actual] != [tuple(t.shape) for t in probe.expected]
        if shapes:
            problem = "its outputs have other shapes or count than the group-masked model's"
            break
        dev = _relative(actual, probe.expected, probe.scale) if actual else 0.0
        deviation = max(deviation, dev)
        if exact and not dev <= tolerance(actual):
            problem = (
                f"on {probe.what} its outputs differ from the group-masked model's by {dev:.3g} "
                f"of their scale {max(probe.scale):.3g} (tolerance {tolerance(actual):.3g})"
            )
            break
    if problem:
        raise ShrinkVerificationError(problem)
    note = _weak_note(found) if exact else ""
    return Check(deviation, max(p.sensitivity for p in found), note, macs, first)


def _weak_note(found: Sequence[Probe]) -> str:
    best = max(p.sensitivity for p in found)
    if best >= WEAK:
        return ""
    tried = ", ".join(p.what for p in found)
    return (
        f"verify was weak: zeroing the removed groups moves the outputs by at most {best:.2g} "
        f"of their scale ({tried}; < {WEAK:g}), so a wrong channel could go unseen. Fix: pass "
        "example inputs on which the removed channels matter (real data), or check accuracy."
    )


Snapshot = tuple[list[tuple[nn.Module, dict, dict, dict]], dict[str, Any]]


def snapshot(model: nn.Module) -> Snapshot:
    """References to every module's tensors and size attributes (removal never mutates a
    tensor in place, so keeping the old references is enough to undo it)."""
    modules = [(m, dict(m._parameters), dict(m._buffers), _attributes(m)) for m in model.modules()]
    config = getattr(model, "config", None)
    return modules, dict(vars(config)) if hasattr(config, "__dict__") else {}


def _attributes(module: nn.Module) -> dict[str, Any]:
    shape = attribute(module, "normalized_shape")
    extra = {"normalized_shape": shape} if isinstance(shape, tuple) else {}
    return {**size_attributes(module), **extra, "__class__": type(module)}


def restore(model: nn.Module, saved: Snapshot) -> None:
    """Undo a removal: put back every tensor, size attribute and config value saved."""
    modules, config = saved
    for m, parameters, buffers, attrs in modules:
        m._parameters.update(parameters)
        m._buffers.update(buffers)
        for attr, value in attrs.items():
            setattr(m, attr, value)
    if config:
        vars(model.config).update(config)
