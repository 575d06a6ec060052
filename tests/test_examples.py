"""The reproduction scripts' own logic (examples/): options, tables, section writing, the
per-layer ``q`` rounds, mask transplanting and the lottery verdict. The training runs
themselves are the scripts' ``--quick`` mode, too slow for this suite."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import prunekit as pk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import _results
import lottery_ticket


def test_parser_reads_comma_separated_seeds_and_quick_keeps_one() -> None:
    args = _results.parser("doc").parse_args(["--seeds", "3,1,2", "--quick"])
    assert args.seeds == [3, 1, 2]
    threads = torch.get_num_threads()
    try:
        _results.setup(args)
        assert args.seeds == [3] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


@given(st.lists(st.floats(0, 1), min_size=2, max_size=6))
def test_mean_std_is_mean_and_sample_std_in_points(values: list[float]) -> None:
    t = torch.tensor(values, dtype=torch.float64)
    assert _results.mean_std(values) == f"{100 * t.mean():.2f} +- {100 * t.std():.2f}"


def test_mean_std_of_one_value_has_zero_spread() -> None:
    assert _results.mean_std([0.9512]) == "95.12 +- 0.00"
    assert _results.mean_std([1.5], scale=1.0, digits=3) == "1.500 +- 0.000"


def test_markdown_aligns_columns() -> None:
    assert _results.markdown(["a", "b"], [["x", "1"]], "lc") == [
        "| a | b |",
        "|---|:---:|",
        "| x | 1 |",
    ]
    assert _results.markdown(["a", "b", "c"], [])[1] == "|---|---:|---:|"


def test_write_replaces_only_its_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "results.md"
    out.write_text("# head\n\nkept text\n")
    monkeypatch.setattr(_results, "RESULTS", out)
    args = _results.parser("doc").parse_args(["--write"])
    _results.write("a", ["old"], args)
    _results.write("b", ["bee"], args)
    _results.write("a", ["new"], args)
    text = out.read_text()
    assert text.startswith("# head\n\nkept text\n")
    assert "<!-- a:start -->\nnew\n<!-- a:end -->" in text and "old" not in text
    assert text.index("<!-- a:start") < text.index("<!-- b:start")
    quick = _results.parser("doc").parse_args(["--write", "--quick"])
    _results.write("a", ["quick"], quick)
    assert out.read_text() == text  # --quick never writes


def test_lottery_table_marks_rounds_that_match_or_beat_dense() -> None:
    runs = {
        "theta_0": {0: [0.90, 0.92], 1: [0.91, 0.93], 2: [0.80, 0.82]},
        "theta_25": {0: [0.90, 0.92], 1: [0.88, 0.90], 2: [0.95, 0.95]},
        "random re-init": {1: [0.85, 0.85], 2: [0.70, 0.70]},
    }
    header, rows, verdict = lottery_ticket._table(runs, {0: 1.0, 1: 0.8, 2: 0.64})
    assert header[-2:] == ["theta_0 >= dense", "theta_25 >= dense"]
    assert [r[-2:] for r in rows] == [["", ""], ["yes", ""], ["", "yes"]]
    assert rows[1][:4] == ["80.0%", "92.00 +- 1.41", "89.00 +- 1.41", "85.00 +- 0.00"]
    assert verdict == (
        "theta_0 tickets match or beat dense (91.00 +- 1.41%) from 80.0% down to 80.0% of "
        "the weights; theta_25 tickets match or beat dense (91.00 +- 1.41%) from 64.0% down "
        "to 64.0% of the weights."
    )


# The examples on architectures outside the zoo, each in its --quick mode (a few seconds).


def test_hf_vision_example_shrinks_a_transformers_resnet_and_reloads_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hf_vision_shrink

    monkeypatch.chdir(tmp_path)
    result = hf_vision_shrink.main(["--quick"])
    assert result["reloaded_same"] is True
    assert result["params"] < 0.6 and result["macs"] < 0.8
    assert (tmp_path / "runs" / "hf-resnet-shrunk").is_dir()
    assert all(0 <= result[k] <= 1 for k in ("dense", "shrunk", "finetuned"))


def test_llm_example_prunes_a_llama_to_two_four_with_wanda() -> None:
    import llm_wanda_24

    model = llm_wanda_24.build(16, 1)
    assert llm_wanda_24.is_two_four(model) is False     # the check sees a dense model
    result = llm_wanda_24.main(["--quick"])              # asserts 2:4 for both methods
    assert set(result) == {"dense", "wanda", "magnitude"}
    assert all(1 < v < 300 for v in result.values())


def test_lottery_example_runs_on_a_users_dataloader(tmp_path: Path) -> None:
    import lottery_dataloader

    report = lottery_dataloader.main(["--quick", "--checkpoint-dir", str(tmp_path / "ck")])
    every = pk.sparsity(report.model, include_output=True).layers
    counts = {layer.name: layer.zeros / layer.numel for layer in every}
    assert counts == pytest.approx({"hidden.0": 0.2, "hidden.2": 0.2, "out": 0.1}, abs=1e-3)
    assert (tmp_path / "ck").is_dir()
