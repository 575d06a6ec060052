"""The standing bad-input suite (issue 13, build item 6): its hub, and the checks of the
harness itself.

Hypothesis feeds every public entry point (``test_bad_inputs_api.py``), every CLI option
(``_cli``), every loader (``_files``, ``_states``) and every operation on unusual weights
(``_weights``) values and files it should refuse, and asserts a clean refusal: a
:class:`prunekit.PruningError` subclass whose message names the value (its repr, its text
or its type) or the key, raised before anything changed: the model's parameters, buffers,
hooks, parametrizations, ``requires_grad`` and training flags and which parameters are
tied are what they were (:func:`refuses_cleanly`).

This module holds what those modules share: the small models, the :data:`JUNK` values,
:func:`bounded` settings and :func:`refuses_cleanly`. CI tries every value of
:data:`CANON` and :data:`EXAMPLES` drawn ones per case (derandomized, so a run is
reproducible); ``PRUNEKIT_FUZZ`` set (``make fuzz``) draws :data:`FUZZ_EXAMPLES` random
ones instead. docs/RELIABILITY.md counts the tries.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import assert_unchanged, small_cnn, snapshot
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import prunekit as pk
from prunekit.errors import PruningError

FUZZ = os.environ.get("PRUNEKIT_FUZZ", "") not in ("", "0")
EXAMPLES, FUZZ_EXAMPLES = 6, 150
NOWHERE = "/nonexistent-prunekit-folder/file"  # a save that got through would fail here
LIMIT_S = 20  # a call that runs longer has hung (a time budget that was never checked)


def bounded(ci: int = EXAMPLES, fuzz: int = FUZZ_EXAMPLES) -> settings:
    """Hypothesis settings: ``ci`` derandomized examples, or ``fuzz`` random ones under
    ``PRUNEKIT_FUZZ``; no deadline (the first call of a case imports and warms up)."""
    return settings(
        max_examples=fuzz if FUZZ else ci,
        deadline=None,
        derandomize=not FUZZ,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


# -- models ------------------------------------------------------------------------------


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def cnn() -> nn.Module:
    return small_cnn()


def pruned(granularity: str = "element") -> nn.Module:
    """:func:`mlp` carrying prunekit masks (90% of its weights, or 2:4)."""
    model = mlp()
    sparsity = None if granularity == "2:4" else 0.9
    pk.prune(model, sparsity, granularity=granularity, include_output=True)  # its weights: all
    return model


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(torch.relu(self.up(h)))


class TinyLM(nn.Module):
    """A decoder-shaped model without transformers: embedding, a ModuleList of blocks,
    a head (what ``pk.llm.prune`` finds blocks in)."""

    def __init__(self, vocab: int = 32, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(2))
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for block in self.layers:
            h = block(h)
        return self.head(h)


def tiny_lm() -> nn.Module:
    torch.manual_seed(0)
    return TinyLM()


IMAGES = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
TOKENS = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(0))
_g = torch.Generator().manual_seed(0)
_x, _y = torch.randn(32, 8, generator=_g), torch.randint(0, 4, (32,), generator=_g)
DATA = SimpleNamespace(x_train=_x, y_train=_y, x_test=_x[:8], y_test=_y[:8])
BATCHES = [(_x[:16], _y[:16]), (_x[16:], _y[16:])]
FILES = Path(tempfile.mkdtemp(prefix="prunekit-bad-inputs-"))
atexit.register(shutil.rmtree, FILES, True)


@functools.cache
def sparse_file() -> Path:
    """A :func:`pk.sparse.save` file of :func:`pruned` in CSR (written once)."""
    model = pruned()
    pk.sparse.convert(model, "csr")
    pk.sparse.save(model, FILES / "sparse.safetensors")
    return FILES / "sparse.safetensors"


@functools.cache
def shrunk_dir() -> Path:
    """A :func:`pk.save_shrunk` directory of :func:`cnn` shrunk by half (written once)."""
    model = cnn().eval()
    pk.shrink(model, IMAGES, ratio=0.5)
    pk.save_shrunk(model, FILES / "shrunk")
    return FILES / "shrunk"


# -- junk --------------------------------------------------------------------------------


class Opaque:
    """An object of a type no prunekit function takes."""

    def __repr__(self) -> str:
        return "Opaque()"


def explode(*args: object) -> None:
    raise RuntimeError("a user's callable that raises")


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-8, 8),
    st.sampled_from([2**31, 2**63, 10**30, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(codec="ascii", exclude_categories=["Cc"]), max_size=6),
    st.binary(max_size=3),
)
OBJECTS = st.sampled_from(
    [Opaque(), torch.tensor(0.5), torch.zeros(2, 2), torch.tensor(float("nan")), len, explode]
)
JUNK = st.one_of(
    SCALARS,
    OBJECTS,
    st.lists(SCALARS, max_size=2),
    st.tuples(SCALARS, SCALARS),
    st.dictionaries(st.text(max_size=3), SCALARS, max_size=2),
)
"""Values of every kind: the strategy each argument is fuzzed with."""
CANON = [None, True, -1, 0, 2**63, float("nan"), float("inf"), 1.5, "", "abc", b"\x00",
         [None], (None, None), {"a": 1}, Opaque(), torch.tensor(0.5), explode]  # fmt: skip
"""One value of each kind, tried on every argument besides the drawn ones."""


def short(value: Any) -> bool:
    """Not a valid count that only takes long (2**31 epochs are valid, and slow)."""
    return not (type(value) is int and 8 < value < 2**63)


def tame(value: Any) -> bool:
    """Not a finite learning rate that only makes training diverge (the weight check then
    refuses the NaN weights, naming the layer rather than the rate)."""
    return not (is_real(value, -float("inf"), float("inf")) and abs(value) > 10)


def is_int(value: Any, low: int = 0, high: int = 2**63 - 1) -> bool:
    return type(value) is int and low <= value <= high


def is_real(value: Any, low: float, high: float, *, closed: bool = False) -> bool:
    """A real number (not a bool) in ``[low, high)`` (``[low, high]`` when ``closed``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return low <= value < high or (closed and value == high)


def not_fraction(value: Any) -> bool:
    return not is_real(value, 0.0, 1.0)


def not_count(value: Any) -> bool:
    return not is_int(value, 1)


def not_seed(value: Any) -> bool:
    return not is_int(value, 0)


def not_module(value: Any) -> bool:
    return not isinstance(value, nn.Module)


def not_real(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, int | float) or value != value


def not_spec(value: Any) -> bool:
    return value is not None and not isinstance(value, pk.PruneSpec)


def always(value: Any) -> bool:
    return True


def never(value: Any) -> bool:
    return False


# -- the checks --------------------------------------------------------------------------


class Hung(BaseException):
    """A call ran past :data:`LIMIT_S` (a BaseException: no ``except Exception`` eats it)."""


@contextmanager
def time_limit(seconds: int = LIMIT_S) -> Iterator[None]:
    """Raise :class:`Hung` in the body after ``seconds`` (SIGALRM, main thread only)."""

    def expire(signum: int, frame: object) -> None:
        raise Hung(f"the call ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def structure(model: nn.Module) -> dict[str, Any]:
    """What :func:`conftest.snapshot` leaves out: requires_grad flags, parametrizations
    (by type, per tensor), tied parameters and forward hooks taking kwargs."""
    by_tensor: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
    return {
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "ties": sorted(names for names in by_tensor.values() if len(names) > 1),
        "parametrizations": {
            f"{name}.{tensor}": [type(p).__name__ for p in plist]
            for name, m in model.named_modules()
            if parametrize.is_parametrized(m)
            for tensor, plist in m.parametrizations.items()
        },
        "kwarg_hooks": [len(m._forward_hooks_with_kwargs) for m in model.modules()],
        "dtypes": {n: (t.dtype, t.device) for n, t in model.state_dict().items()},
    }


def spellings(value: Any) -> list[str]:
    """How a message may name ``value``: its repr, its text, its type's name (as a word)."""
    names = [repr(value), str(value), getattr(value, "__qualname__", "")]
    if isinstance(value, float):
        names += [f"{value:g}", f"{value:,}"]
    elif isinstance(value, int) and not isinstance(value, bool):
        names.append(f"{value:,}")
    return [n for n in names if n.strip() and len(n) < 200]


def names(message: str, value: Any, keys: tuple[str, ...] = ()) -> bool:
    """Whether ``message`` names ``value`` (see :func:`spellings`) or one of ``keys``."""
    if any(s in message for s in [*spellings(value), *keys]):
        return True
    return re.search(rf"\b{re.escape(type(value).__name__)}\b", message) is not None


def refuses_cleanly(
    call: Callable[[], object], model: nn.Module | None, value: Any, keys: tuple[str, ...] = ()
) -> PruningError | None:
    """Run ``call()``; if it raises, assert a clean refusal of ``value`` (module
    docstring) and return the error; None if it ran. Any other exception propagates."""
    before = (snapshot(model), structure(model)) if model is not None else None
    try:
        with time_limit():
            call()
    except PruningError as err:
        message = str(err)
        assert names(message, value, keys), f"{message!r} names neither {value!r} nor {keys}"
        if before is not None:
            try:
                assert_unchanged(model, before[0])
                assert structure(model) == before[1]
            except AssertionError as changed:
                raise AssertionError(f"the refusal changed the model: {message}") from changed
        return err
    return None


# -- the harness checks itself -----------------------------------------------------------


def _refuse(message: str, change: Callable[[nn.Module], object] = lambda m: None) -> Callable:
    def call(model: nn.Module) -> None:
        change(model)
        raise PruningError(message)

    return call


@pytest.mark.parametrize(
    ("call", "failure"),
    [
        (_refuse("x=1.5 is not a fraction"), None),
        (_refuse("sparsity is not a fraction"), None),  # names the argument
        (_refuse("not a fraction"), "names neither"),
        (_refuse("x=1.5 ...", lambda m: pk.prune(m, 0.5)), "changed the model"),
        (_refuse("x=1.5 ...", lambda m: m.train(False)), "changed the model"),
        (_refuse("x=1.5 ...", lambda m: m[0].weight.requires_grad_(False)), "changed the model"),
        (lambda m: [][1], "IndexError"),
    ],
)
def test_the_harness_catches_what_it_must(call: Callable, failure: str | None) -> None:
    model = mlp()
    try:
        refuses_cleanly(lambda: call(model), model, 1.5, ("sparsity",))
    except (AssertionError, IndexError) as err:
        assert failure is not None and failure in f"{type(err).__name__}: {err}"
    else:
        assert failure is None


def test_a_call_that_hangs_is_stopped() -> None:
    with pytest.raises(Hung), time_limit(1):
        while True:
            pass
