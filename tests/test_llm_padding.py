"""Padding and packing (issue 15, item 4): statistics skip the positions an
``attention_mask`` marks as padding, left or right, so padded and unpadded calibration
give identical masks; ragged id lists, texts and packed windows are accepted."""

from __future__ import annotations

import copy

import pytest
import torch
from test_llm_engine import VOCAB, tiny
from torch import nn

from prunekit import llm
from prunekit.errors import CalibrationError
from prunekit.inputs import Calibration, pad
from prunekit.llm.calibration import calibration_batches
from prunekit.masks import get_mask

pytestmark = pytest.mark.usefixtures("one_thread")

_g = torch.Generator().manual_seed(1)
ROWS = [torch.randint(0, VOCAB, (n,), generator=_g).tolist() for n in (12, 7, 9, 4)]


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: get_mask(m) for n, m in model.named_modules() if get_mask(m) is not None}


def pruned(model: nn.Module, calibration: object, method: str) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model)
    llm.prune(model, calibration, method=method, progress=False, keep_masks=True)
    return masks(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # rotary / absolute positions
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_padded_and_unpadded_calibration_give_identical_masks(arch: str, method: str) -> None:
    model = tiny(arch)
    unpadded = pruned(model, [torch.tensor([row]) for row in ROWS], method)  # a batch each
    for side in ("right", "left"):
        padded = pruned(model, [pad(ROWS, side)], method)
        assert padded.keys() == unpadded.keys() and len(padded) > 0
        for name, keep in padded.items():
            assert torch.equal(keep, unpadded[name]), (side, name)


def test_without_the_mask_padding_would_change_wanda() -> None:
    model = tiny("llama")
    unpadded = pruned(model, [torch.tensor([row]) for row in ROWS], "wanda")
    polluted = pruned(model, [pad(ROWS)["input_ids"]], "wanda")  # pads counted as tokens
    assert any(not torch.equal(polluted[n], unpadded[n]) for n in unpadded)


def test_ragged_lists_and_texts_are_padded_with_a_mask() -> None:
    model = tiny("llama")
    batches = calibration_batches(ROWS, model, batch_size=3)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(3, 12), (1, 4)]
    assert batches[0]["attention_mask"].sum(1).tolist() == [12, 7, 9]
    report = llm.prune(copy.deepcopy(model), ROWS, method="wanda", progress=False)
    assert report.tokens == sum(map(len, ROWS)) and report.samples == 4
    unpadded = pruned(model, [torch.tensor([row]) for row in ROWS], "wanda")
    assert all(torch.equal(keep, unpadded[n]) for n, keep in pruned(model, ROWS, "wanda").items())
    tokenizer = lambda text: {"input_ids": [ord(c) % VOCAB for c in text]}  # noqa: E731
    cal = Calibration.ragged(["abc", "hello"], side="left", tokenizer=tokenizer)
    (batch,) = cal.inputs()
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert batch["input_ids"][0, 2:].tolist() == [ord(c) % VOCAB for c in "abc"]


def test_left_padding_adds_positions_counted_along_the_mask() -> None:
    (batch,) = calibration_batches([pad([[1, 2, 3], [4]], "left")], tiny("gpt2"))
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    (right,) = calibration_batches([pad([[1, 2, 3], [4]])], tiny("gpt2"))
    assert "position_ids" not in right  # right padding leaves positions as they are


def test_packed_windows_keep_every_token() -> None:
    cal = Calibration.packed(ROWS, seq_len=10, batch_size=2, separator=0)
    batches = list(cal.inputs())
    stream = [t for i, row in enumerate(ROWS) for t in ([0] if i else []) + row]
    ids = torch.cat([b["input_ids"][b["attention_mask"] == 1] for b in batches])
    assert ids.tolist() == stream  # 35 tokens: windows of 10, the last one padded
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 10), (2, 10)]
    assert batches[-1]["attention_mask"][1].sum().item() == len(stream) - 30
    report = llm.prune(tiny("llama"), cal, method="wanda", progress=False)
    assert report.tokens == len(stream)


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        (["some text"], r"sequence 0 is text; Fix: pass tokenizer="),
        ([[1, 2], [3, -1]], r"sequence 1 \(list\) is not a non-empty list of token"),
        ([[1, 2], []], r"sequence 1 \(list\) is not a non-empty list of"),
        ([{"input_ids": torch.ones(2, 3).long(), "attention_mask": torch.ones(2, 4)}],
         r"\(input_ids: \(2, 3\), attention_mask: \(2, 4\)\): the mask does not match"),
        ([{"input_ids": torch.ones(2, 3).long(), "attention_mask": torch.full((2, 3), 2)}],
         r"values other than 0 and 1, or no real token"),
        ([{"input_ids": torch.ones(2, 3).long(), "attention_mask": torch.zeros(2, 3)}],
         r"values other than 0 and 1, or no real token"),
    ],
)  # fmt: skip
def test_bad_padded_calibration_is_refused(calibration: object, message: str) -> None:
    with pytest.raises(CalibrationError, match=message):
        calibration_batches(calibration, tiny("llama"))


def test_bad_packing_settings_are_refused() -> None:
    with pytest.raises(CalibrationError, match=r"seq_len=0 is not an int in 1..2\*\*31"):
        Calibration.packed(ROWS, 0)
    with pytest.raises(CalibrationError, match=r"side='top' is not 'left' or 'right'"):
        Calibration.ragged(ROWS, side="top")
