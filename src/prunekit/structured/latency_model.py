"""The latency cost model of :func:`~prunekit.structured.latency.latency_plan` (pure: no timing).

Each timed layer (a convolution or linear layer whose channels some family removes) has
one measured **curve** per channel axis it loses channels on: ``"out"`` (its output
channels), ``"in"`` (its input channels) or ``"both"`` (a depthwise convolution, whose
input, output and groups shrink together). A curve is fitted to the measured
``(width, seconds)`` points as a monotone piecewise-linear function: the points are made
non-decreasing in width by pool-adjacent-violators (isotonic regression, Ayer et al.
1955: noise cannot make a narrower layer slower), then interpolated linearly and held
flat beyond the measured range.

The axes of a layer are timed one at a time, with the others at full width, and combined
multiplicatively (the GEMM a convolution or linear layer runs costs about ``in * out``):

    t_layer(w)  = T * (f + (1 - f) * prod_a (c_a(w_a) / c_a(C_a) - f) / (1 - f))
                  + R * w_out / C_out
    macs(w)     = M * prod_a w_a / C_a
    latency(k)  = T_rest + sum_layers t_layer(w(k))

``w_a = C_a - (positions of the removed groups of every family on axis a)``, ``k`` the
groups each family keeps, ``T`` and ``M`` the layer's seconds and MACs at full width,
``f`` the share of ``T`` no width removes (the per-call cost, a layer's curves extended
to width 0; :func:`floor_share`): only the rest is multiplied, since a product of the
axes' ratios counts the floor once per axis (a 1x1 convolution cut to 1/4 of its input
and output channels at batch 1 measured 11.4 us where the plain product said 7.6).
What the model spends outside the timed layers (BatchNorm, activations, additions,
pooling: the whole model's time minus theirs) is elementwise work on the layers'
outputs, so it is shared among the timed layers in proportion to their output elements
(``R``) and shrinks with their output width ``w_out`` (``"out"`` or ``"both"`` axis; a
layer whose outputs keep their width keeps its share, as does ``T_rest``, the part no
layer is timed for).

**round_to** (:func:`learn_step`): kernels that work on channel blocks (oneDNN's 8- and
16-channel blocks on CPU, tensor-core tiles on GPU) run a width that is not a multiple of
the block as fast as the next multiple. Timing widths ``w0 - S + 1`` and ``w0 - S``
around an aligned ``w0`` measures the drop ``d(S)`` of one channel step at ``S`` below
``w0``: on a staircase of step ``S*`` it is ``~ S* x slope`` where ``S`` is a multiple of
``S*`` and ``~ 0`` elsewhere; on a smooth curve it is ``~ slope`` everywhere. The learned
step is the smallest ``S`` with ``d(S) >= max(d) / 2``, or 1 when no drop stands out of
the noise (``max(d) < 2%`` of ``t(w0)``).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

STEPS = (1, 2, 4, 8, 16)
"""Candidate widths of a kernel's channel block (``round_to``)."""
NOISE = 0.02
"""A staircase drop smaller than this fraction of the layer's time is noise."""


def isotonic(values: Sequence[float]) -> list[float]:
    """The non-decreasing sequence closest to ``values`` in least squares
    (pool-adjacent-violators: merge neighbouring blocks while their means decrease)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, n2 = blocks.pop()
            m1, n1 = blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [m for m, n in blocks for _ in range(int(n))]


@dataclass(frozen=True)
class Curve:
    """Seconds of one layer against the width of one axis: monotone, piecewise linear."""

    widths: tuple[int, ...]
    seconds: tuple[float, ...]

    @classmethod
    def fit(cls, points: Mapping[int, float]) -> Curve:
        """The monotone piecewise-linear fit of measured ``{width: seconds}`` points."""
        widths = tuple(sorted(points))
        return cls(widths, tuple(isotonic([points[w] for w in widths])))

    def intercept(self) -> float:
        """The seconds at width 0 on the line through the two narrowest points, within
        ``[0, seconds at the narrowest]``: the call's cost that no width removes."""
        if len(self.widths) < 2:
            return 0.0
        (w0, w1), (t0, t1) = self.widths[:2], self.seconds[:2]
        return min(max(t0 - w0 * (t1 - t0) / (w1 - w0), 0.0), t0)

    def __call__(self, width: float) -> float:
        i = bisect.bisect_left(self.widths, width)
        if i == 0:
            return self.seconds[0]
        if i == len(self.widths):
            return self.seconds[-1]
        w0, w1 = self.widths[i - 1], self.widths[i]
        t0, t1 = self.seconds[i - 1], self.seconds[i]
        return t0 + (t1 - t0) * (width - w0) / (w1 - w0)


def grid(size: int) -> list[int]:
    """The widths a curve is measured at: full, 3/4, 1/2, 3/8 and 1/4 of ``size``,
    multiples of 16 (the largest block in :data:`STEPS`) where ``size >= 64``, else of 1
    (below 1/4 the curve is held flat: no family loses more than ``max_ratio`` of its
    groups, 0.8 by default). A grid of multiples of 8 put a width such as 72 on the curve,
    which a depthwise convolution at batch 1 ran 2x slower than 64, and the
    interpolation between made every width near it look slow."""
    align = 16 if size >= 64 else 1
    out = {size}
    for fraction in (0.75, 0.5, 0.375, 0.25):
        out.add(max(1, int(size * fraction) // align * align))
    return sorted(out)


def probe_base(size: int) -> int | None:
    """The aligned width ``w0`` (a multiple of 32, about half of ``size``) the staircase
    is probed below; None for layers too narrow to probe (``size < 64``)."""
    return size // 2 // 32 * 32 if size >= 64 else None


def probe_widths(w0: int) -> list[int]:
    """``w0 - S + 1`` and ``w0 - S`` for every candidate step ``S``."""
    return sorted({w for s in STEPS for w in (w0 - s + 1, w0 - s)})


def learn_step(points: Mapping[int, float], w0: int) -> int:
    """The channel block the measured ``points`` show below ``w0`` (module docstring)."""
    drops = {s: points[w0 - s + 1] - points[w0 - s] for s in STEPS}
    top = max(drops.values())
    if top < NOISE * points[w0]:
        return 1
    return min(s for s, d in drops.items() if d >= top / 2)


@dataclass(frozen=True)
class Axis:
    """One channel axis of a timed layer: its full ``size``, its fitted ``curve`` and, per
    family on it, ``cum[n]``: the positions its ``n`` least important groups hold."""

    size: int
    curve: Curve
    families: tuple[tuple[str, tuple[int, ...]], ...]

    def width(self, kept: Mapping[str, int]) -> int:
        gone = sum(cum[len(cum) - 1 - kept[f]] for f, cum in self.families)
        return self.size - gone


def floor_share(axes: Sequence[Axis]) -> float:
    """The share ``f`` of a layer's full-width time that no width removes (its per-call
    cost): the smallest of its axes' :meth:`Curve.intercept` / full-width seconds; 0 for
    a layer with one axis (its curve alone is exact)."""
    if len(axes) < 2:
        return 0.0
    return min(a.curve.intercept() / max(a.curve(a.size), 1e-30) for a in axes)


@dataclass(frozen=True)
class LayerCost:
    """A timed layer: full-width ``seconds`` and ``macs``, its shrinking ``axes``,
    ``follow``, the seconds of the elementwise work on its output (``R``), and ``floor``,
    the share of ``seconds`` no width removes (:func:`floor_share`)."""

    name: str
    seconds: float
    macs: int
    axes: Mapping[str, Axis]
    follow: float = 0.0
    floor: float = 0.0

    def latency(self, kept: Mapping[str, int]) -> float:
        f = self.floor
        scale = 1.0
        for axis in self.axes.values():
            share = axis.curve(axis.width(kept)) / max(axis.curve(axis.size), 1e-30)
            scale *= max(share - f, 0.0) / max(1.0 - f, 1e-30)
        output = self.axes.get("out") or self.axes.get("both")
        rest = self.follow * (1.0 if output is None else output.width(kept) / output.size)
        return self.seconds * (f + (1.0 - f) * scale) + rest

    def macs_at(self, kept: Mapping[str, int]) -> float:
        out = float(self.macs)
        for axis in self.axes.values():
            out *= axis.width(kept) / axis.size
        return out

    def families(self) -> set[str]:
        return {f for axis in self.axes.values() for f, _ in axis.families}


@dataclass(frozen=True)
class ModelCost:
    """Every timed layer, plus the constant rest of the model's time and MACs."""

    layers: tuple[LayerCost, ...]
    rest_seconds: float
    rest_macs: int

    def latency(self, kept: Mapping[str, int]) -> float:
        return self.rest_seconds + sum(layer.latency(kept) for layer in self.layers)

    def macs(self, kept: Mapping[str, int]) -> float:
        return self.rest_macs + sum(layer.macs_at(kept) for layer in self.layers)

    def of_family(self) -> dict[str, list[LayerCost]]:
        """The layers each family changes."""
        out: dict[str, list[LayerCost]] = {}
        for layer in self.layers:
            for f in layer.families():
                out.setdefault(f, []).append(layer)
        return out


def cumulative(counts: Sequence[int]) -> tuple[int, ...]:
    """``(0, c0, c0 + c1, ...)``: positions held by the first ``n`` groups, ``n = 0..len``."""
    out = [0]
    for c in counts:
        out.append(out[-1] + int(c))
    return tuple(out)


def aligned_down(kept: int, step: int) -> int:
    """The next smaller multiple of ``step`` below ``kept`` (``kept - step`` if aligned)."""
    return kept - step if kept % step == 0 else kept // step * step


def min_keep(total: int, step: int) -> int:
    """Groups a family keeps at least: one block (never empty), at most all of them."""
    return min(total, max(1, step))


def ratio_for(total: int, kept: int) -> float:
    """The ratio ``r`` with ``total - floor(r * total) == kept`` (as ``pk.shrink`` reads
    it), nudged up by ulps where the float product rounds below the integer."""
    r = (total - kept) / total
    while math.floor(r * total) < total - kept:
        r = math.nextafter(r, 1.0)
    return r
