"""Atomic saves: a file or a whole directory appears complete or not at all.

Written by hand because no library in our dependencies does both files and directories
with the cleanup rules we need (``safetensors`` writes in place; ``tempfile`` only gives
the temporary names).

- :func:`atomic_write`: the bytes go to a temporary sibling file, are fsynced, and the file
  is moved over the target with ``os.replace`` (atomic on POSIX), then the directory entry
  is fsynced. A crash leaves the old file or the new one, never a mix.
- :func:`atomic_directory`: the files of a multi-file save (weights + layout) are written
  into a temporary sibling directory; only when every one is complete and fsynced does it
  take the target's name. On Linux the two directories are exchanged in one atomic
  ``renameat2(RENAME_EXCHANGE)``, so the target name always holds a whole save; elsewhere
  (or on a file system without it) the old directory is first moved to a sibling name,
  and a crash between the two renames leaves it there, whole. Leftovers of an
  interrupted save (``.<name>.tmp-*``, ``.<name>.old-*``) go with the next successful save.

Every ``OSError`` (disk full, read-only file system, a path that is a file where a
directory is wanted...) becomes a :class:`~prunekit.errors.CheckpointError` naming the
path and the fix, with no partial file left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prunekit.errors import CheckpointError

_TMP, _OLD = ".tmp-", ".old-"


def _fail(path: Path, err: OSError) -> CheckpointError:
    return CheckpointError(
        f"cannot write {str(path)!r}: {err.strerror or err}; Fix: check that the folder "
        "exists, is writable and has free space, and that the path is not taken by a "
        "file or folder of the other kind."
    )


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stale(target: Path) -> list[Path]:
    """Leftovers of interrupted saves of ``target``."""
    prefix = f".{target.name}"
    return [p for p in target.parent.glob(f"{prefix}*")
            if p.name.startswith((prefix + _TMP, prefix + _OLD))]  # fmt: skip


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _mode(path: Path) -> int:
    """The permission bits a new file gets: the old file's, else ``0o666`` under the umask
    (``mkstemp`` alone would leave ``0o600``)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring); temporary files
    that killed writes of ``path`` left behind go with this one's success."""
    path = Path(path)
    tmp = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}{_TMP}", dir=path.parent)
        tmp = Path(name)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _mode(path))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as err:
        raise _fail(path, err) from err
    finally:
        if tmp is not None:
            _remove(tmp)
    for leftover in _stale(path):
        _remove(leftover)


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; when the body returns, it replaces ``target``.

    On an error in the body (or a crash) ``target`` is left exactly as it was and the
    temporary directory is removed (or, after a crash, by the next successful save).
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise CheckpointError(
            f"{str(target)!r} is a file, not a folder; Fix: pass a folder path (it is created)."
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TMP}", dir=target.parent))
    except OSError as err:
        raise _fail(target, err) from err
    try:
        yield tmp
        _commit(tmp, target)
    except OSError as err:
        raise _fail(target, err) from err
    finally:
        if tmp.exists():
            _remove(tmp)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names of ``a`` and ``b`` in one atomic step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``); False where the system or file system cannot."""
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename is None:
        return False
    at_fdcwd, exchange = -100, 2
    if rename(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _commit(tmp: Path, target: Path) -> None:
    """fsync every file of ``tmp``, then give it ``target``'s name: exchanged atomically
    with the old ``target`` where possible, else after moving the old one aside."""
    for folder, _, files in os.walk(tmp, topdown=False):
        for file in files:
            with open(os.path.join(folder, file), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(folder))
    old = None
    if target.exists() and _exchange(tmp, target):
        old = tmp  # now holds the previous save
    else:
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}{_OLD}", dir=target.parent))
            os.rmdir(old)
            os.rename(target, old)
        os.rename(tmp, target)
    _fsync_dir(target.parent)
    for leftover in ([old] if old else []) + _stale(target):
        _remove(leftover)
