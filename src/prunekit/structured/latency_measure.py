"""Measuring layer latency for :func:`~prunekit.structured.latency.latency_plan`.

A layer is timed **in isolation** at the input shape it sees in the model (captured by
forward hooks during one pass), with random weights of the width being measured: the
functional ``conv{1,2,3}d`` / ``linear`` call the module makes, in
``torch.inference_mode``, by :func:`seconds` (one warm-up call; the fastest of at least
five ~1 ms blocks, which co-tenant interference inflates least), twice, the faster of the
two passes over the widths counting (a stall of the machine rarely hits both).

Measurements are cached on disk, one JSON file per (device, torch version, threads,
layer signature, axis) under ``$XDG_CACHE_HOME/prunekit/latency`` (default
``~/.cache/prunekit/latency``), written atomically (:func:`prunekit.fsio.atomic_write`).
Cached points are scaled to the machine's present speed: the layer's full width is timed
again once per :class:`MeasuredLatency` and its cached curve scaled by now / then (a
shared CPU's speed drifts by 1.5x over minutes, which would otherwise skew the cached
layers against the whole model, timed now); a curve more than ``DRIFT`` times off is
timed again and rewritten. A cache file that does not parse or holds
something else than its key and positive timings is refused
(:class:`LatencyCacheError`), never silently used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from prunekit.errors import LatencyCacheError
from prunekit.fsio import atomic_write
from prunekit.inputs import Inputs, batch_size, call, eval_mode

TIMED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
CACHE_VERSION = 2
"""2: timed in blocks of about 1 ms (:func:`seconds`); version 1's single long blocks are
not read."""
BLOCK_S = 1e-3
"""The length of one timed block of calls."""
BLOCKS = 5
"""Blocks :func:`seconds` times at least (the fastest counts)."""
DRIFT = 2.0
"""Cached points more than this factor off the layer's present speed are timed again."""


@dataclass(frozen=True)
class LayerSpec:
    """What a timed layer computes: enough to rebuild it at another width.

    ``kind`` is ``"Conv1d"``/``"Conv2d"``/``"Conv3d"``/``"Linear"``; ``input_shape`` the
    shape it is called with at the timed batch size; for linear layers the conv fields
    are empty.
    """

    kind: str
    in_ch: int
    out_ch: int
    groups: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    bias: bool
    input_shape: tuple[int, ...]
    dtype: str

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_ch == self.out_ch

    def signature(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def spec_of(module: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype) -> LayerSpec:
    """The :class:`LayerSpec` of a conv / linear ``module`` called on ``input_shape``."""
    if isinstance(module, nn.Linear):
        return LayerSpec("Linear", module.in_features, module.out_features, 1, (), (), (), (),
                         module.bias is not None, input_shape, str(dtype))  # fmt: skip
    assert isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d)
    padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
    return LayerSpec(
        type(module).__name__, module.in_channels, module.out_channels, module.groups,
        tuple(module.kernel_size), tuple(module.stride), padding, tuple(module.dilation),
        module.bias is not None, input_shape, str(dtype),
    )  # fmt: skip


def timed_layers(model: nn.Module, inputs: Inputs, names: Iterable[str]) -> dict[str, tuple]:
    """``{name: input shape}`` of the ``names`` modules that ran exactly once, with zero
    padding, in one eval-mode pass on ``inputs`` (forward hooks; removed afterwards)."""
    modules = dict(model.named_modules())
    wanted = {n: modules[n] for n in names if isinstance(modules.get(n), TIMED)}
    seen: dict[str, list[tuple[int, ...]]] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda _, args, n=n: seen.setdefault(n, []).append(tuple(args[0].shape))
        )
        for n, m in wanted.items()
        if getattr(m, "padding_mode", "zeros") == "zeros"
    ]
    try:
        with eval_mode(model), torch.no_grad():
            call(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return {n: shapes[0] for n, shapes in seen.items() if len(shapes) == 1}


def runner(spec: LayerSpec, axis: str, width: int, device: torch.device) -> Callable[[], Tensor]:
    """The layer of ``spec`` with ``axis`` (``"in"``, ``"out"`` or ``"both"``) at
    ``width``, as a call on random data on ``device``."""
    cin = width if axis in ("in", "both") else spec.in_ch
    cout = width if axis in ("out", "both") else spec.out_ch
    groups = width if axis == "both" else spec.groups
    dtype = getattr(torch, spec.dtype.removeprefix("torch."))
    make = {"device": device, "dtype": dtype}
    bias = torch.randn(cout, **make) if spec.bias else None
    if spec.kind == "Linear":
        x = torch.randn(*spec.input_shape[:-1], cin, **make)
        w = torch.randn(cout, cin, **make)
        return lambda: F.linear(x, w, bias)
    x = torch.randn(spec.input_shape[0], cin, *spec.input_shape[2:], **make)
    w = torch.randn(cout, cin // groups, *spec.kernel, **make)
    conv = _CONV[getattr(nn, spec.kind)]
    return lambda: conv(x, w, bias, spec.stride, spec.padding, spec.dilation, groups)


def batched(inputs: Inputs, size: int) -> Inputs:
    """``inputs`` with every tensor of the example batch size repeated to ``size`` rows."""
    n = batch_size(inputs)

    def grow(v: Any) -> Any:
        if isinstance(v, Tensor) and v.dim() and v.shape[0] == n:
            return v[torch.arange(size, device=v.device) % n]
        return v

    if isinstance(inputs, Tensor):
        return grow(inputs)
    if isinstance(inputs, Mapping):
        return {k: grow(v) for k, v in inputs.items()}
    return type(inputs)(grow(v) for v in inputs)


def seconds(
    fn: Callable[[], Any], min_run_time: float, blocks: int = BLOCKS, median: bool = False
) -> float:
    """The fastest block's seconds per call of ``fn`` (with ``median``: the median
    block's, as ``pk.analysis.speedup`` counts): after one warm-up call, blocks of
    as many calls as take :data:`BLOCK_S` (one call where a call takes longer), until
    ``min_run_time`` has passed and at least ``blocks`` blocks ran. (Not
    ``torch.utils.benchmark``'s ``blocked_autorange``: it sizes blocks so the timer's
    overhead is 1e-4 of them, which for a 0.3 ms convolution is one block of 100 calls
    over ``min_run_time=0.02``: its "fastest block" is then a mean that a stall of the
    machine inflates, once cached 100-fold.)"""
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)

    def block(number: int) -> float:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        sync()
        return (time.perf_counter() - start) / number

    with torch.inference_mode():
        fn()
        sync()
        number, per_call = 1, block(1)
        while per_call * number < BLOCK_S:
            number = max(number * 2, math.ceil(BLOCK_S / max(per_call, 1e-9)))
            per_call = block(number)
        times, spent = [per_call], per_call * number
        while spent < min_run_time or len(times) < blocks:
            times.append(block(number))
            spent += times[-1] * number
        return statistics.median(times) if median else min(times)


class LatencyMeter(Protocol):
    """Where latencies come from: measured (:class:`MeasuredLatency`) or a table (tests)."""

    def layer(self, spec: LayerSpec, axis: str, widths: list[int]) -> dict[int, float]:
        """Seconds of the layer with ``axis`` at each of ``widths``."""

    def model(self, model: nn.Module, inputs: Inputs) -> float:
        """Seconds of one call of the whole ``model`` on ``inputs``."""

    def now(self, specs: list[LayerSpec]) -> float:
        """Seconds of the ``specs`` layers at full width, one call each, timed now (never
        cached: compared with :meth:`model` timed at the same moment)."""


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{_cpu_model() or platform.machine()}"


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                 if ln.startswith("model name")), platform.processor())  # fmt: skip


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/prunekit/latency`` (``~/.cache/prunekit/latency`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "prunekit" / "latency"


class MeasuredLatency:
    """Times layers on ``device`` (:func:`seconds`, ``min_run_time`` per width), caching
    every measured point in ``cache_dir`` (default :func:`cache_root`; ``None`` there and
    ``cache=False``: no cache)."""

    def __init__(
        self, device: torch.device | str = "cpu", min_run_time: float = 0.02,
        cache: bool = True, cache_dir: str | Path | None = None,
    ) -> None:  # fmt: skip
        self.device, self.min_run_time = torch.device(device), min_run_time
        self.dir = (Path(cache_dir) if cache_dir is not None else cache_root()) if cache else None
        self._drifts: dict[str, float] = {}

    def key(self, spec: LayerSpec, axis: str) -> dict[str, Any]:
        return {"version": CACHE_VERSION, "device": device_name(self.device),
                "torch": torch.__version__, "threads": torch.get_num_threads(),
                "layer": spec.signature(), "axis": axis}  # fmt: skip

    def path(self, key: dict[str, Any]) -> Path | None:
        if self.dir is None:
            return None
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.dir / f"{digest[:32]}.json"

    def layer(self, spec: LayerSpec, axis: str, widths: list[int]) -> dict[int, float]:
        key = self.key(spec, axis)
        path = self.path(key)
        points = read_cache(path, key) if path is not None else {}
        scale = self._drift(spec, axis, points)
        if scale is None:  # the cache is far off the present: timed again, rewritten
            points, scale = {}, 1.0
        missing = [w for w in widths if w not in points]
        for w in missing + missing:  # two passes, the faster counts: a stall hits one
            points[w] = min(points.get(w, math.inf), self._now(spec, axis, w))
        if missing and path is not None:
            write_cache(path, key, points)
        return {w: points[w] * scale for w in widths}

    def _drift(self, spec: LayerSpec, axis: str, points: dict[int, float]) -> float | None:
        """Now / then of the layer's full width (timed again once per layer and axis for
        this meter; 1.0 where it was never cached): the machine's speed drifts while the
        whole model is timed now, so cached points are scaled to the present. None (the
        cache is timed again) where they are more than :data:`DRIFT` times apart: a stall
        while the cache was written."""
        full = spec.in_ch if axis == "in" else spec.out_ch
        name = spec.signature() + axis
        if name in self._drifts:
            return self._drifts[name]
        ratio = self._now(spec, axis, full) / points[full] if full in points else 1.0
        far = not 1.0 / DRIFT <= ratio <= DRIFT
        self._drifts[name] = 1.0 if far else ratio
        return None if far else ratio

    def _now(self, spec: LayerSpec, axis: str, width: int) -> float:
        return seconds(runner(spec, axis, width, self.device), self.min_run_time)

    def now(self, specs: list[LayerSpec]) -> float:
        return sum(
            seconds(runner(spec, "out", spec.out_ch, self.device), self.min_run_time / 4, 3,
                    median=True)
            for spec in specs
        )  # fmt: skip

    def model(self, model: nn.Module, inputs: Inputs) -> float:
        """The median block over 5 ``min_run_time`` (three blocks at least) of the whole
        model, as ``pk.analysis.speedup`` counts (the fastest block of a batch-1 model
        flattered a shrunk copy by 20%); its callers compare it in turns."""
        with eval_mode(model):
            return seconds(lambda: call(model, inputs), 5 * self.min_run_time, 3, median=True)


def read_cache(path: Path, key: dict[str, Any]) -> dict[int, float]:
    """The points cached in ``path`` for ``key`` (``{}`` if there is no file)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        points = {int(w): float(s) for w, s in data["points"]}
        ok = data["key"] == key and all(w > 0 and s > 0 for w, s in points.items())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        ok, points = False, {}
        reason = f"{type(exc).__name__}: {exc}"
    else:
        reason = "its key or timings are not a latency measurement of this layer"
    if not ok:
        raise LatencyCacheError(
            f"latency cache file {str(path)!r} is corrupt ({reason}); Fix: delete it "
            "(the layer is measured again), or pass cache=False."
        )
    return points


def write_cache(path: Path, key: dict[str, Any], points: dict[int, float]) -> None:
    with contextlib.suppress(OSError):  # atomic_write names the path if it cannot write
        path.parent.mkdir(parents=True, exist_ok=True)
    data = {"key": key, "points": sorted(points.items())}
    atomic_write(path, json.dumps(data, indent=1).encode())
