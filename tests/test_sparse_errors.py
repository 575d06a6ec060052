"""pk.sparse.convert refuses what a format cannot hold (not sparse enough, not N:M, blocks that
do not tile, CUDA-only formats), naming the layer and the fix, and leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_unchanged, snapshot
from safetensors.torch import save_file
from test_sparse import Mixed, mixed_model, pruned_linear
from torch import nn

import prunekit as pk
from prunekit import sparse
from prunekit.errors import (
    CheckpointError,
    CudaRequiredError,
    IncompatibleLayerError,
    NotNMError,
    NotSparseEnoughError,
    UnknownChoiceError,
)

GRANULARITY = {"csr": "element", "bsr": "block:4x4", "nm": "2:4"}


def check_error(model, error, match, *args, **kwargs):
    before = snapshot(model)
    with pytest.raises(error, match=match):
        sparse.convert(model, *args, **kwargs)
    assert_unchanged(model, before)


def test_error_not_sparse_enough():
    model = pruned_linear("csr", 16, 32, 0.3, True, 0)
    check_error(
        model,
        NotSparseEnoughError,
        r"layer '0' is 30\.1% sparse: as csr it would take 2,932 bytes, more than dense "
        r"\(2,048\); Fix: prune it further",
        "csr",
    )


def test_error_not_nm():
    model = pruned_linear("csr", 16, 32, 0.4, True, 0)
    check_error(
        model,
        NotNMError,
        r"layer '0' is not 2:4: \d+ group\(s\) of 4 inputs .* Fix: pk\.prune",
        "nm",
    )


def test_error_block_does_not_divide():
    model = pruned_linear("bsr", 16, 32, 0.9, True, 0)
    check_error(
        model,
        IncompatibleLayerError,
        r"layer '0': block size \(3, 3\) does not tile its 16x32 weight; Fix: pass blocksize",
        "bsr",
        blocksize=3,
    )


def test_error_block_not_square_for_mkl_and_not_block_sparse():
    model = pruned_linear("bsr", 16, 32, 0.9, True, 0)
    check_error(
        model,
        IncompatibleLayerError,
        r"block size 4x8 is not square and MKL's BSR product needs square blocks; "
        r"Fix: bsr_kernel='gather'",
        "bsr",
        blocksize=(4, 8),
    )
    model = pruned_linear("csr", 16, 32, 0.9, True, 0)
    check_error(
        model,
        NotSparseEnoughError,
        r"layer '0' is not block-sparse: no square block of \(64, 32, 16, 8, 4, 2\) divides "
        r"its 16x32 weight storing at most 2 values per nonzero; Fix: prune with",
        "bsr",
    )


def test_error_nm_m_does_not_divide():
    model = nn.Sequential(nn.Linear(6, 4))
    check_error(
        model, IncompatibleLayerError, r"reduction axis \(6\) to be a multiple of M=4", "nm"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_error_cuda_format_without_cuda():
    model = pruned_linear("nm", 16, 32, 0.5, True, 0)
    check_error(
        model, CudaRequiredError, r"needs a CUDA GPU of compute capability >= 8\.0", "nm-cuda"
    )


def test_error_unknown_format_and_bad_arguments():
    model = pruned_linear("csr", 16, 32, 0.9, True, 0)
    check_error(
        model, UnknownChoiceError, r"unknown format 'coo'; valid format values are: auto", "coo"
    )
    check_error(model, pk.PruningError, r"batch_size=0 is not an int 1\.\.", batch_size=0)
    check_error(model, pk.PruningError, r"batch_size=9223372036854775808 is not an int 1\.\.",
                batch_size=2**63)  # fmt: skip
    for bad in (True, float("nan"), torch.tensor(2), object(), (2, 0)):
        check_error(model, pk.PruningError, r"blocksize=.* is not an int 1\.\.", "bsr",
                    blocksize=bad)  # fmt: skip
    check_error(model, pk.PruningError, r"margin=1\.5 must be in \(0, 1\]", margin=1.5)
    check_error(model, UnknownChoiceError, r"unknown nm pattern 'row'", nm="row")
    check_error(model, UnknownChoiceError, r"unknown bsr_kernel 'cusparse'", bsr_kernel="cusparse")


def test_error_unsupported_layer_named_explicitly():
    model = mixed_model()
    check_error(
        model,
        IncompatibleLayerError,
        r"layer 'emb': Embedding is not a Linear",
        "csr",
        layers=["emb", "fc3"],
    )


def test_error_in_a_later_layer_leaves_earlier_ones():
    model = mixed_model()  # fc3 fits csr, fc1 (2:4, 50%) does not
    check_error(
        model, NotSparseEnoughError, r"layer 'fc1' is 50\.0% sparse", "csr", layers=["fc3", "fc1"]
    )


def test_cuda_semi_structured_matches_dense():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs CUDA sm80+")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256)).cuda().half()
    pk.prune(model, granularity="2:4")
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    expected = model(x)
    sparse.convert(model, "nm-cuda")
    assert isinstance(model[0], sparse.SemiStructuredLinear)
    torch.testing.assert_close(model(x), expected, atol=1e-2, rtol=1e-2)


def test_save_refuses_cuda_only_modules(tmp_path):
    model = pruned_linear("nm", 16, 32, 0.5, True, 0)
    model[0] = sparse.SemiStructuredLinear.__new__(sparse.SemiStructuredLinear)
    nn.Module.__init__(model[0])  # a stand-in: building a real one needs CUDA
    with pytest.raises(pk.PruningError, match=r"layers \['0'\] are 'nm-cuda' .* Fix: save"):
        sparse.save(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_auto_reports_why_nothing_fits():
    model = pruned_linear("csr", 16, 32, 0.3, True, 0)  # 30%: csr/bsr too dense, not 2:4
    report = sparse.convert(model, "auto", cost=lambda c: pytest.fail("nothing to time"))
    assert report.fallbacks == [
        (
            "0",
            "no sparse format fits (csr: NotSparseEnoughError; bsr: NotSparseEnoughError; "
            "bsr-gather: NotSparseEnoughError; nm: NotNMError)",
        )
    ]
    assert report.layers[0].costs == {}


def test_load_of_a_foreign_file_raises_and_leaves_the_model_unchanged(tmp_path):
    model = mixed_model()
    sparse.convert(model, "csr", layers=["fc3"])
    sparse.save(model, tmp_path / "m.safetensors")
    other = Mixed()
    other.fc2 = nn.Linear(32, 12)  # fc3 (16 -> 4) is replaced before fc2's shape fails
    before = snapshot(other)
    with pytest.raises(CheckpointError, match="does not load into Mixed"):
        sparse.load(other, tmp_path / "m.safetensors")
    assert_unchanged(other, before)
    with pytest.raises(CheckpointError, match="does not load into Sequential"):
        sparse.load(nn.Sequential(nn.Linear(8, 4)), tmp_path / "m.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match=r"no 'prunekit\.sparse' header"):
        sparse.load(other, tmp_path / "plain.safetensors")
