"""Atomic saves: files and whole directories appear complete or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prunekit import fsio
from prunekit.errors import CheckpointError
from prunekit.fsio import atomic_directory, atomic_write


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_atomic_write_into_a_missing_folder_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope"):
        atomic_write(tmp_path / "nope" / "a.bin", b"x")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_a_checkpoint_error(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match="writable"):
            atomic_write(tmp_path / "a.bin", b"x")
    finally:
        tmp_path.chmod(0o700)


def test_directory_swaps_in_whole_and_keeps_the_old_on_error(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with atomic_directory(target) as d:
        (d / "w").write_bytes(b"A")
        (d / "layout").write_bytes(b"a")
    with pytest.raises(RuntimeError), atomic_directory(target) as d:
        (d / "w").write_bytes(b"B")
        raise RuntimeError("killed halfway")
    assert (target / "w").read_bytes() == b"A" and (target / "layout").read_bytes() == b"a"
    with atomic_directory(target) as d:
        (d / "w").write_bytes(b"C")
    assert sorted(p.name for p in target.iterdir()) == ["w"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_leftovers_of_a_crash_go_with_the_next_save(tmp_path: Path) -> None:
    (tmp_path / ".model.tmp-crashed").mkdir()
    (tmp_path / ".model.old-crashed").mkdir()
    with atomic_directory(tmp_path / "model") as d:
        (d / "w").write_bytes(b"A")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_file_where_a_folder_is_wanted(tmp_path: Path) -> None:
    (tmp_path / "model").write_bytes(b"not a folder")
    with pytest.raises(CheckpointError, match="is a file"), atomic_directory(tmp_path / "model"):
        pass
    assert (tmp_path / "model").read_bytes() == b"not a folder"


def test_directories_are_exchanged_in_one_step_on_linux(tmp_path: Path, monkeypatch) -> None:
    """With renameat2(RENAME_EXCHANGE) the target name is never free: no os.rename runs."""
    target = tmp_path / "model"
    with atomic_directory(target) as d:
        (d / "w").write_bytes(b"A")
    renames = []
    monkeypatch.setattr(os, "rename", lambda *a: renames.append(a))
    with atomic_directory(target) as d:
        (d / "w").write_bytes(b"B")
    assert (target / "w").read_bytes() == b"B"
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    if not fsio._exchange(tmp_path / "x", tmp_path / "y"):
        pytest.skip("this system has no atomic directory exchange")
    assert renames == []


def test_new_files_get_the_usual_mode_and_old_ones_keep_theirs(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "new.bin", b"x")
        assert (tmp_path / "new.bin").stat().st_mode & 0o777 == 0o644
        (tmp_path / "old.bin").write_bytes(b"x")
        (tmp_path / "old.bin").chmod(0o640)
        atomic_write(tmp_path / "old.bin", b"y")
        assert (tmp_path / "old.bin").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)


def test_a_killed_write_leaves_a_temp_file_the_next_write_removes(tmp_path: Path) -> None:
    (tmp_path / ".a.bin.tmp-killed").write_bytes(b"half")
    atomic_write(tmp_path / "a.bin", b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_directories_with_subfolders_are_saved_whole(tmp_path: Path) -> None:
    with atomic_directory(tmp_path / "model") as d:
        (d / "sub").mkdir()
        (d / "sub" / "w").write_bytes(b"A")
    assert (tmp_path / "model" / "sub" / "w").read_bytes() == b"A"
