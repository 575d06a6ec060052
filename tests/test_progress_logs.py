"""Long work reports through ``logging`` (logger "prunekit"): periodic plain lines with
step, elapsed and ETA; printed instead of a bar when stdout is not a terminal and nothing
handles the logger; a resumed run says where it resumes."""

from __future__ import annotations

import logging

import torch
from torch import nn

import prunekit as pk
from prunekit import tables


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g))] * 3


def test_training_logs_step_elapsed_and_eta(monkeypatch, caplog):
    monkeypatch.setattr(tables, "LOG_INTERVAL", 0.0)
    caplog.set_level(logging.INFO, logger="prunekit")
    pk.training.fit(nn.Linear(4, 2), data(), epochs=2, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "prunekit"]
    assert len(lines) == 6  # one per step at LOG_INTERVAL 0, the last one not repeated
    assert lines[0].startswith("epoch 1/2 loss ") and " - 1/6 (17%), elapsed 0:00:0" in lines[0]
    assert all(", ETA 0:00:0" in line for line in lines)
    assert " - 6/6 (100%)" in lines[-1]


def test_lines_are_throttled_to_one_every_interval_plus_the_last(monkeypatch, caplog):
    monkeypatch.setattr(tables, "LOG_INTERVAL", 3600.0)
    caplog.set_level(logging.INFO, logger="prunekit")
    pk.training.fit(nn.Linear(4, 2), data(), epochs=2, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "prunekit"]
    assert len(lines) == 1 and " - 6/6 (100%)" in lines[0]


def test_progress_off_logs_at_debug_only(caplog):
    caplog.set_level(logging.INFO, logger="prunekit")
    pk.training.fit(nn.Linear(4, 2), data(), epochs=2, progress=False)
    assert not [r for r in caplog.records if r.name == "prunekit"]
    caplog.set_level(logging.DEBUG, logger="prunekit")
    pk.training.fit(nn.Linear(4, 2), data(), epochs=2, progress=False)
    lines = [r for r in caplog.records if r.name == "prunekit"]
    assert lines and all(r.levelno == logging.DEBUG for r in lines)


def test_plain_lines_are_printed_when_nothing_handles_the_logger(monkeypatch, capsys):
    monkeypatch.setattr(tables, "LOG_INTERVAL", 0.0)
    monkeypatch.setattr(tables.logger, "propagate", False)  # no handler anywhere above
    monkeypatch.setattr(tables.logger, "handlers", [])
    pk.training.fit(nn.Linear(4, 2), data(), epochs=1, progress=True)
    out = capsys.readouterr().out.splitlines()  # captured stdout is not a terminal
    assert len(out) == 3 and out[-1].startswith("epoch 1/1 loss ") and "3/3 (100%)" in out[-1]
    pk.training.fit(nn.Linear(4, 2), data(), epochs=1, progress=False)
    assert capsys.readouterr().out == ""  # progress=False prints nothing


def test_a_resumed_run_says_from_which_round(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="prunekit")
    batches = data()

    def run() -> None:
        pk.training.iterative_pruning(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
                                      batches, target=0.5, rounds=2, epochs=1, progress=False,
                                      evaluate=lambda m: 0.5, checkpoint_dir=tmp_path)  # fmt: skip

    run()
    rounds = [r.getMessage() for r in caplog.records if "round" in r.getMessage()]
    assert rounds[0].startswith("iterative pruning round 1 of 2: sparsity ")
    caplog.clear()
    run()
    assert f"iterative_pruning: all 2 rounds done in checkpoint {tmp_path}" in caplog.messages


def test_cli_v_and_q_set_the_prunekit_logger_level(monkeypatch, capsys):
    from prunekit import cli

    monkeypatch.setattr(tables.logger, "handlers", [])
    monkeypatch.setattr(tables.logger, "level", logging.NOTSET)
    seen = []
    monkeypatch.setitem(cli.COMMANDS, "demo", lambda args, console: seen.append(args.log_level))
    for flags, level in (([], logging.INFO), (["-v"], logging.DEBUG), (["-q"], logging.WARNING)):
        assert cli.main([*flags, "demo"]) == 0
        assert tables.logger.level == level == seen[-1]
        assert len(tables.logger.handlers) == 1  # replaced, not stacked
    tables.logger.warning("shown")
    tables.logger.info("hidden")
    assert capsys.readouterr().err.endswith(" shown\n")
    assert cli.main(["-v", "-q", "demo"]) == 2  # one or the other
