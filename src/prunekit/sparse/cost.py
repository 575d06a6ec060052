"""The cost model behind ``convert(format="auto")``: seconds of one layer's GEMM per format.

``auto`` builds every format a layer fits, asks a cost function for each one's seconds at
the given batch size, and keeps the cheapest sparse format only when it costs at most
``margin`` times dense (:func:`choose`), so it never picks a format slower than dense.
The default cost, :class:`MeasuredCost`, times the layer's GEMM once and caches the
result per (format, GEMM shape, sparsity to 1%, batch size, detail). Any callable
``Candidate -> seconds`` can replace it (a roofline model, a table, a fake in tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Candidate:
    """One layer in one format, as the cost function sees it.

    ``shape`` is the GEMM ``(out, in)``; ``batch_size`` the number of input rows (for a
    conv: images x output pixels); ``detail`` the format parameter (block size, N:M);
    ``run`` is the converted layer's GEMM with its real code path, ``x (batch_size, in) ->
    (batch_size, out)``, for ``x`` of the layer's ``dtype`` on its ``device``.
    """

    layer: str
    format: str
    shape: tuple[int, int]
    sparsity: float
    batch_size: int
    detail: str
    run: Callable[[Tensor], Tensor]
    dtype: torch.dtype = torch.float32
    device: torch.device = CPU


CostFn = Callable[[Candidate], float]


class MeasuredCost:
    """Seconds of ``candidate.run`` on random input, measured once per key: the fastest
    block of ``torch.utils.benchmark``'s ``blocked_autorange`` (the minimum, not the
    median, is what co-tenant interference inflates least when comparing formats).

    Keep one instance to reuse its :attr:`cache` across ``convert`` calls.
    """

    def __init__(self, min_run_time: float = 0.05) -> None:
        self.min_run_time = min_run_time
        self.cache: dict[tuple[object, ...], float] = {}

    @staticmethod
    def key(c: Candidate) -> tuple[object, ...]:
        return (c.format, c.shape, round(c.sparsity, 2), c.batch_size, c.detail, c.dtype, c.device)

    def __call__(self, c: Candidate) -> float:
        # Imported here: torch.utils.benchmark pulls in setuptools (~0.3 s), and only
        # format="auto" times anything.
        from torch.utils import benchmark

        key = self.key(c)
        if key not in self.cache:
            x = torch.randn(c.batch_size, c.shape[1], dtype=c.dtype, device=c.device)
            with torch.inference_mode():
                c.run(x)  # warm-up
                timer = benchmark.Timer(
                    stmt="run(x)",
                    globals={"run": c.run, "x": x},
                    num_threads=torch.get_num_threads(),
                )
                measured = timer.blocked_autorange(min_run_time=self.min_run_time)
                self.cache[key] = min(measured.times)
        return self.cache[key]


def choose(costs: dict[str, float], margin: float) -> tuple[str, str]:
    """``(format, reason)``: the cheapest sparse format if it costs at most ``margin`` x the
    ``"dense"`` cost, else ``"dense"``. ``costs`` maps format -> seconds, dense included."""
    dense = costs["dense"]
    ratios = {f: c / dense for f, c in costs.items() if f != "dense"}
    text = ", ".join(f"{f} {r:.2f}x" for f, r in sorted(ratios.items(), key=lambda kv: kv[1]))
    if not ratios:
        return "dense", "no sparse format fits"
    best = min(ratios, key=ratios.__getitem__)
    if ratios[best] <= margin:
        return best, f"fastest ({text} of dense time)"
    return "dense", f"dense is fastest ({text} of dense time; needs <= {margin:g}x)"
