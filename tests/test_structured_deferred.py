"""The tracer records operations and replays their rules afterwards: the same graph as
running each rule right after its operation, whatever the model does to its arguments."""

from __future__ import annotations

import importlib
import weakref

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.errors import UntraceableError
from prunekit.structured import build
from prunekit.structured.graph import DependencyGraph
from prunekit.zoo import build_model, example_input

trace_module = importlib.import_module("prunekit.structured.trace")


class DenseBlock(nn.Module):
    """DenseNet's pattern: each layer reads ``torch.cat`` of a list it then appends to."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layers = nn.ModuleList(nn.Conv2d(8 + 4 * i, 4, 3, padding=1) for i in range(3))
        self.head = nn.Conv2d(20, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(torch.relu(layer(torch.cat(features, 1))))
        return self.head(torch.cat(features, 1))


class InPlace(nn.Module):
    """In-place operations on activations, and an in-place reshape of a constant a rule
    read before it: a gain per channel of ``a`` (so those channels stay) that becomes a
    gain per row once squeezed."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gain = torch.full((6, 1, 1), 2.0)
        y = self.a(x).relu_() * gain
        gain.squeeze_(-1)  # (6, 1): a gain per row, had it been read now
        z = self.b(y).relu_()
        z.add_(z * 0.5)
        return self.c(z)


def _structure(graph: DependencyGraph) -> list[tuple]:
    return [
        (f.name, len(f), [(r.name, r.dim, r.positions.tolist(), r.group.tolist()) for r in f.runs])
        for f in graph.families
    ]


MODELS = {
    "densenet-like": (DenseBlock, lambda: torch.randn(1, 3, 8, 8)),
    "in-place": (InPlace, lambda: torch.randn(1, 3, 6, 6)),
    **{name: (lambda n=name: build_model(n), lambda n=name: example_input(n)) for name in
       ("resnet20", "mobilenetv2", "vit", "gpt")},
}  # fmt: skip


RECORDINGS = {  # attribute of the trace module: (baseline, changed)
    "rules right after each operation": ("FLUSH_BYTES", None, -1),
    "every floating activation a stand-in": ("STAND_IN_BYTES", 1 << 62, 0),
}


@pytest.mark.parametrize("recording", RECORDINGS)
@pytest.mark.parametrize("name", MODELS)
def test_the_graph_does_not_depend_on_how_the_trace_records(
    name: str, recording: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rules replayed after the pass or right after each operation; activations held or
    recorded as shape-only stand-ins: one graph."""
    attribute, baseline, changed = RECORDINGS[recording]
    factory, make_input = MODELS[name]
    torch.manual_seed(0)
    model, x = factory().eval(), make_input()
    if baseline is not None:
        monkeypatch.setattr(trace_module, attribute, baseline)
    before = _structure(build(model, x))
    monkeypatch.setattr(trace_module, attribute, changed)
    assert _structure(build(model, x)) == before
    assert before  # something to compare: the models have removable families


def test_a_list_appended_to_after_cat_is_read_as_it_was() -> None:
    torch.manual_seed(0)
    model, x = DenseBlock().eval(), torch.randn(1, 3, 8, 8)
    before = model(x)
    report = pk.shrink(model, x, ratio=0.5)
    assert report.params_after < report.params_before
    assert model.head.in_channels < 20
    torch.testing.assert_close(model(x).shape, before.shape)


def test_an_untraceable_in_place_reshape_is_named_and_the_model_kept() -> None:
    class Reshaped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            y.unsqueeze_(0)
            return self.b(y.squeeze(0))

    model, x = Reshaped().eval(), torch.randn(1, 3, 8, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UntraceableError, match="'unsqueeze_' in module '<model>'"):
        pk.shrink(model, x, ratio=0.5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_modules_are_followed_by_hooks_common_to_all_and_removed_after() -> None:
    """A module outside the model (held in a plain list) is not pushed on the module
    stack: an operation without a rule after it is named in the module it ran in; no
    hook common to all modules stays behind (on success or error)."""
    hooks = importlib.import_module("torch.nn.modules.module")

    class Inner(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.special.erfcx(x)  # no rule

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.inner = nn.Conv2d(3, 4, 1), Inner()
            self.outside = [nn.ReLU()]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(self.outside[0](self.conv(x)))

    before = (len(hooks._global_forward_pre_hooks), len(hooks._global_forward_hooks))
    with pytest.raises(UntraceableError, match="'special_erfcx' in module 'inner'"):
        pk.shrink(Outer().eval(), torch.randn(1, 3, 4, 4), ratio=0.5)
    pk.shrink(DenseBlock().eval(), torch.randn(1, 3, 8, 8), ratio=0.5)
    after = (len(hooks._global_forward_pre_hooks), len(hooks._global_forward_hooks))
    assert after == before


def test_the_trace_holds_no_activation_it_has_replayed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Labels refer to activations weakly: once replayed (here after every operation), an
    activation the model dropped is freed during the pass (a trace that held every one
    needed all of them in memory at once)."""
    monkeypatch.setattr(trace_module, "FLUSH_BYTES", -1)
    model, x = build_model("resnet20").eval(), example_input("resnet20")
    seen: list[weakref.ref] = []
    alive: list[int] = []
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d)]
    for m in convs:
        m.register_forward_hook(lambda _m, _a, out: seen.append(weakref.ref(out)))
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    last.register_forward_pre_hook(lambda *_: alive.append(sum(r() is not None for r in seen)))
    trace_module.trace(model, x)
    assert len(seen) == len(convs) > 20
    assert alive == [0]  # every conv / BN output freed before the classifier ran


def test_a_large_activation_the_model_dropped_is_freed_before_its_rule_runs() -> None:
    """A stand-in keeps a large activation's shape for its rule, not its memory: the
    pass frees it when the model drops it, long before the rules are replayed."""
    seen: list[weakref.ref] = []
    alive: list[bool] = []

    class Dropping(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)  # 16 x 32 x 32 floats: 64 KiB, a stand-in
            seen.append(weakref.ref(y))
            z = self.b(torch.relu(y))
            del y
            alive.append(seen[0]() is not None)
            return z

    model, x = Dropping().eval(), torch.randn(1, 3, 32, 32)
    assert trace_module.STAND_IN_BYTES <= 16 * 32 * 32 * 4 < trace_module.FLUSH_BYTES
    graph = build(model, x)
    assert alive == [False]
    assert [len(f) for f in graph.families] == [16]  # the rules still saw it: a's filters


def test_an_in_place_reshape_of_a_large_activation_is_traced_by_a_registered_rule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its rule reads the input's stand-in at the shape it had and labels a new one at
    the shape it has now; later operations read the new one: the result is exact."""
    registry = importlib.import_module("prunekit.structured.registry")
    shape_rule = importlib.import_module("prunekit.structured.rules_shape").shape
    monkeypatch.setattr(registry, "_FUNCTION_RULES", dict(registry._FUNCTION_RULES))
    pk.structured.register_rule("unsqueeze_", shape_rule)

    class Reshaped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)  # 64 KiB: a stand-in
            y.unsqueeze_(0)
            return self.b(y.squeeze(0).relu())

    torch.manual_seed(0)
    model, x = Reshaped().eval(), torch.randn(1, 3, 32, 32)
    report = pk.shrink(model, x, ratio=0.5)
    assert model.a.out_channels == model.b.in_channels == 8
    assert report.deviation is not None and report.deviation < 1e-4
