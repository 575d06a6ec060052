"""Sparse execution: every format computes the masked dense layer's outputs; convert's
report, errors, save/load, inference mode, and the auto choice (with a fake cost model)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit as pk
from prunekit import sparse
from prunekit.sparse.cost import Candidate, choose

GRANULARITY = {"csr": "element", "bsr": "block:4x4", "nm": "2:4"}


def pruned_linear(fmt: str, out: int, inp: int, sparsity: float, bias: bool, seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(inp, out, bias=bias))
    pk.prune(model, None if fmt == "nm" else sparsity, granularity=GRANULARITY[fmt])
    return model


@settings(max_examples=40, deadline=None)
@given(
    fmt=st.sampled_from(["csr", "bsr", "nm"]),
    kernel=st.sampled_from(["mkl", "gather"]),
    out=st.sampled_from([4, 8, 12, 32]),
    inp=st.sampled_from([8, 16, 24, 64]),
    sparsity=st.floats(0.7, 0.99),
    batch=st.integers(1, 9),
    bias=st.booleans(),
    baked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_formats_match_masked_dense(
    fmt, kernel, out, inp, sparsity, batch, bias, baked, seed
):
    model = pruned_linear(fmt, out, inp, sparsity, bias, seed)
    if baked:
        pk.bake(model)
    x = torch.randn(batch, 3, inp)  # leading dims are kept
    expected = model(x)
    report = sparse.convert(model, fmt, bsr_kernel=kernel)
    assert report.formats == {"0": fmt}
    assert (
        type(model[0]).__name__ == {"csr": "CSRLinear", "bsr": "BSRLinear", "nm": "NMLinear"}[fmt]
    )
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


@settings(max_examples=30, deadline=None)
@given(
    fmt=st.sampled_from(["csr", "bsr", "nm"]),
    kernel=st.sampled_from([1, 3]),
    stride=st.sampled_from([1, 2]),
    padding=st.sampled_from([0, 1]),
    dilation=st.sampled_from([1, 2]),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_conv_formats_match_masked_dense(fmt, kernel, stride, padding, dilation, batch, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(8, 16, kernel, stride, padding, dilation))
    gran = "block:4x8" if fmt == "bsr" else GRANULARITY[fmt]  # non-square blocks work too
    pk.prune(model, None if fmt == "nm" else 0.9, granularity=gran)
    x = torch.randn(batch, 8, 9, 7)
    expected = model(x)
    sparse.convert(model, fmt, blocksize=(4, 8) if fmt == "bsr" else None, bsr_kernel="gather")
    assert isinstance(model[0], sparse.SparseConv2d)
    assert model[0].format == fmt
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_no_grad_and_inference_mode():
    model = pruned_linear("csr", 32, 64, 0.9, True, 0)
    x = torch.randn(4, 64)
    expected = model(x).detach()
    sparse.convert(model, "csr")
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
    other = pruned_linear("bsr", 32, 64, 0.9, True, 1)
    with torch.inference_mode():  # built and run inside inference mode
        reference = other(x)
        sparse.convert(other, "bsr")
        torch.testing.assert_close(other(x), reference, atol=1e-5, rtol=0)


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.emb = nn.Embedding(10, 8)
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 16)
        self.fc3 = nn.Linear(16, 4)

    def forward(self, x, tokens):
        h = self.conv(x).mean((2, 3)) + self.emb(tokens)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


def mixed_model() -> Mixed:
    torch.manual_seed(0)
    model = Mixed()
    pk.prune(model, granularity="2:4", layers=["conv", "fc1"])
    pk.prune(model, 0.9, granularity="block:4x4", layers=["fc2"])
    pk.prune(model, 0.95, layers=["fc3", "emb"], include_output=True, include_embeddings=True)
    return model


def test_save_load_safetensors_and_state_dict(tmp_path):
    model = mixed_model()
    x, tokens = torch.randn(3, 4, 6, 6), torch.tensor([1, 2, 3])
    expected = model(x, tokens)
    report = sparse.convert(model, "auto", cost=lambda c: {"dense": 1.0}.get(c.format, 0.5))
    # 2:4 layers (50%) fit only nm; on a tie the first of csr, bsr, nm wins.
    assert report.formats == {"conv": "nm", "emb": "dense", "fc1": "nm", "fc2": "csr", "fc3": "csr"}
    assert report.fallbacks == [("emb", "Embedding is not a Linear or an im2col-able Conv2d")]
    torch.testing.assert_close(model(x, tokens), expected, atol=1e-5, rtol=0)
    sparse.convert(model := mixed_model(), "nm", layers=["conv", "fc1"])
    sparse.convert(model, "bsr", layers=["fc2"], blocksize=4)
    sparse.convert(model, "csr", layers=["fc3"])
    torch.testing.assert_close(model(x, tokens), expected, atol=1e-5, rtol=0)
    sparse.save(model, tmp_path / "m.safetensors")
    fresh = sparse.load(Mixed(), tmp_path / "m.safetensors")
    assert [type(m).__name__ for m in (fresh.conv, fresh.fc1, fresh.fc2, fresh.fc3)] == [
        "SparseConv2d",
        "NMLinear",
        "BSRLinear",
        "CSRLinear",
    ]
    assert pk.masks.get_mask(fresh.emb) is not None  # the unconverted masked layer
    torch.testing.assert_close(fresh(x, tokens), expected, atol=1e-5, rtol=0)
    # Plain state dicts load into converted modules of another sparsity (buffers resize).
    other = pruned_linear("csr", 16, 32, 0.6, True, 3)
    sparse.convert(other, "csr")
    target = pruned_linear("csr", 16, 32, 0.8, True, 4)
    sparse.convert(target, "csr")
    target.load_state_dict(other.state_dict())
    torch.testing.assert_close(target[0].to_dense(), other[0].to_dense(), atol=0, rtol=0)


def test_repr_and_report_bytes():
    model = pruned_linear("csr", 8, 16, 0.75, True, 0)
    report = sparse.convert(model, "csr")
    nnz = 32
    assert report.layers[0].bytes == nnz * 4 + nnz * 4 + 9 * 4 + 8 * 4
    assert report.layers[0].dense_bytes == (8 * 16 + 8) * 4
    assert repr(model[0]) == (
        "CSRLinear(in_features=16, out_features=8, bias=True, nnz=32 (75.0% sparse), "
        "bytes=324 (0.596x dense))"
    )
    assert report.fallbacks == []
    assert "csr" in str(report)


def test_bsr_bytes_at_90_percent_block_sparsity():
    model = pruned_linear("bsr", 64, 64, 0.9, False, 0)
    report = sparse.convert(model, "bsr", blocksize=4)
    # pk.prune zeroes the whole number of 16-weight blocks nearest round(0.9 * 4096) = 3686
    # weights: 230 blocks (3680), not 231 (3696)
    kept = 26
    assert model[0].values.shape == (kept, 4, 4)
    assert report.layers[0].bytes == kept * 16 * 4 + kept * 4 + 17 * 4
    assert report.bytes / report.dense_bytes < 0.2


def test_fake_cost_model_auto_choice():
    calls = []

    def fake(candidate: Candidate) -> float:
        calls.append((candidate.layer, candidate.format, candidate.batch_size))
        return {"dense": 1.0, "csr": 1.5, "bsr": 0.95, "bsr-gather": 0.97, "nm": 0.3}[
            candidate.format
        ]

    model = pruned_linear("bsr", 32, 64, 0.9, True, 0)
    report = sparse.convert(model, "auto", batch_size=8, cost=fake, margin=0.9)
    # bsr (0.95x) is not <= 0.9x, csr is slower: dense, with the reason reported.
    assert report.formats == {"0": "dense"}
    reason = (
        "dense is fastest (bsr 0.95x, bsr-gather 0.97x, csr 1.50x of dense time; needs <= 0.9x)"
    )
    assert report.fallbacks == [("0", reason)]
    assert sorted(calls) == [("0", f, 8) for f in ("bsr", "bsr-gather", "csr", "dense")]
    assert isinstance(model[0], nn.Linear) and pk.masks.get_mask(model[0]) is None

    model = pruned_linear("nm", 32, 64, 0.5, True, 0)
    report = sparse.convert(model, "auto", cost=fake)
    assert report.formats == {"0": "nm"}  # 2:4 weight: nm is offered and cheapest
    assert report.layers[0].costs == {"dense": 1.0, "nm": 0.3}  # csr / bsr do not fit at 50%
    # An unstructured 95% weight is not block-sparse: bsr is not even offered.
    calls.clear()
    sparse.convert(pruned_linear("csr", 32, 64, 0.95, True, 0), "auto", cost=fake)
    assert sorted(f for _, f, _ in calls) == ["csr", "dense"]


@given(costs=st.dictionaries(st.sampled_from(["csr", "bsr", "nm"]), st.floats(1e-6, 10)))
def test_choose_never_slower_than_dense(costs):
    fmt, _ = choose({"dense": 1.0, **costs}, margin=0.9)
    assert fmt == "dense" or costs[fmt] <= 0.9
    if fmt == "dense":
        assert all(c > 0.9 for c in costs.values())


def test_measured_cost_caches_per_key():
    runs = []
    cost = sparse.MeasuredCost(min_run_time=0.001)
    weight = torch.randn(8, 16)

    def run(x):
        runs.append(x.shape)
        return x @ weight.T

    candidate = Candidate("a", "csr", (8, 16), 0.9012, 4, "", run)
    first = cost(candidate)
    count = len(runs)
    assert count >= 2 and runs[0] == (4, 16)
    same_key = Candidate("b", "csr", (8, 16), 0.9049, 4, "", run)
    assert cost(same_key) == first and len(runs) == count
    assert list(cost.cache) == [("csr", (8, 16), 0.9, 4, "", torch.float32, torch.device("cpu"))]


def test_auto_measures_a_layer_in_its_own_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8)).double()
    pk.prune(model, 0.9)
    x = torch.randn(3, 16, dtype=torch.float64)
    expected = model(x)
    cost = sparse.MeasuredCost(min_run_time=0.001)
    sparse.convert(model, "auto", cost=cost)
    assert {key[-2:] for key in cost.cache} == {(torch.float64, torch.device("cpu"))}
    torch.testing.assert_close(model(x), expected)


# ---- bad input: the right error, a message naming layer / value / fix, model unchanged ----
