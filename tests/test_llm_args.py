"""pk.llm.prune's plain arguments (issue 13 open case): owl_m, owl_lambda, blocks,
batch_size, progress and keep_masks are fuzzed with the bad-input suite's junk; each value
runs or is refused with a UsageError naming the argument and the value, model untouched."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import assert_unchanged, snapshot
from test_bad_inputs import is_int, is_real, tiny_lm
from test_bad_inputs_api import fuzz, llm_arg

from prunekit import llm
from prunekit.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")

BAD = {
    "owl_m": lambda v: not is_real(v, 0.0, math.inf) or v == 0,
    "owl_lambda": lambda v: not is_real(v, 0.0, 0.5),
    "blocks": lambda v: v is not None and not isinstance(v, str),
    "batch_size": lambda v: not is_int(v, 1, 2**31),
    "progress": lambda v: not isinstance(v, bool),
    "keep_masks": lambda v: not isinstance(v, bool),
}


@pytest.mark.parametrize("arg", BAD)
def test_argument_runs_or_is_refused_cleanly(arg: str) -> None:
    fuzz(f"llm.prune.{arg}", llm_arg(arg, BAD[arg]))


@pytest.mark.parametrize(
    ("arg", "value", "message"),
    [
        ("owl_m", True, r"owl_m=True is not a finite real number > 0; Fix: pass a finite"),
        ("owl_m", torch.tensor(5.0), r"owl_m=tensor\(5\.\) is not a finite real number"),
        ("owl_m", math.inf, r"owl_m=inf is not a finite real number > 0"),
        ("owl_lambda", "0.1", r"owl_lambda='0.1' is not a finite real number >= 0 and < 0.5"),
        ("owl_lambda", math.nan, r"owl_lambda=nan is not"),
        ("blocks", b"layers", r"blocks=b'layers' is a bytes, not the qualified name"),
        ("blocks", torch.zeros(2), r"blocks=tensor.* is a Tensor"),
        ("batch_size", 2**63, r"batch_size=9223372036854775808 is not an int in 1..2,147,483,648"),
        ("batch_size", 0, r"batch_size=0 is not an int in 1"),
        ("keep_masks", "yes", r"keep_masks='yes' is a str, not a bool"),
    ],
)
def test_bad_argument_is_a_usage_error_naming_it(arg: str, value: Any, message: str) -> None:
    model = tiny_lm()
    before = snapshot(model)
    tokens = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(UsageError, match=message):
        llm.prune(model, tokens, **{"progress": False, arg: value})
    assert_unchanged(model, before)


def test_int_settings_are_taken_as_reals() -> None:
    tokens = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    report = llm.prune(
        tiny_lm(), tokens, sparsity=0.5, allocation="owl", owl_m=5, owl_lambda=0, progress=False
    )
    assert report.sparsity == 0.5
