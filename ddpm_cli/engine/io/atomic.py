"""Atomic file output: write beside the target, then publish in one step.

Every file the project writes for a user goes through :func:`atomic_output`: the content is written
to a hidden temporary file in the target's folder, flushed to disk, given the permissions the
user's umask gives an ordinary new file (0644 under umask 022, not the 0600 of ``mkstemp``), then
published:

- ``overwrite=True``: renamed over the target (a reader sees the old or the new file, never half);
- ``overwrite=False``: hard-linked to the target, which fails if anything already has that name,
  even a file created by another process a moment ago, so two runs never replace each other's
  output. Filesystems without hard links fall back to ``rename(2)`` with ``RENAME_NOREPLACE``
  where the kernel offers it, and to a check before the rename elsewhere.

The temporary file is removed on every failure, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from ddpm_cli.engine.errors import InputError, ResourceError

DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_UMASK_LOCK = threading.Lock()


class OutputExistsError(InputError):
    """The target of a write without overwrite exists (exit 2, like every InputError)."""


def file_mode() -> int:
    """The mode the user's umask gives a new ordinary file (0o666 & ~umask)."""
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def exists_message(path: Path) -> str:
    return f"{path}: exists; pass --overwrite to replace it or --skip-existing to keep it"


def _rename_noreplace(source: str, target: str) -> None:
    """rename(2) that fails with EEXIST if ``target`` exists (Linux renameat2), else check-then-rename."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if renameat2(at_fdcwd, source.encode(), at_fdcwd, target.encode(), rename_noreplace) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), target)
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), target)
    os.rename(source, target)


def publish(tmp: str | os.PathLike, path: str | os.PathLike, overwrite: bool) -> None:
    """Move the finished temporary file ``tmp`` to ``path``; without ``overwrite`` never replace a file.

    Raises OutputExistsError when ``path`` exists and ``overwrite`` is False (``tmp`` is left for the
    caller to remove).
    """
    tmp, path = os.fspath(tmp), Path(path)
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError as exc:  # no hard links here (some network and FUSE filesystems)
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            _rename_noreplace(tmp, os.fspath(path))
            return
        os.unlink(tmp)
    except FileExistsError:
        raise OutputExistsError(f"{path}: was created by another process while this run worked (two runs writing "
                                "one folder?); nothing was replaced - pass --overwrite to replace it") from None


def fsync_folder(folder: Path) -> None:
    """Best-effort fsync of a folder so a completed rename survives a crash (POSIX only)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False, what: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, publish it there.

    The block writes the whole file at the yielded path (any writer that takes a path). Parent
    folders are created. Errors: OutputExistsError when ``path`` exists and ``overwrite`` is False
    (checked first, and again atomically when publishing), ResourceError when the disk is full,
    InputError for any other OS error, each naming ``path``. ``what`` prefixes messages ("checkpoint").
    """
    path = Path(path)
    if not overwrite and os.path.lexists(path):
        raise OutputExistsError(exists_message(path))
    label = f"{what} {path}".strip()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        publish(tmp, path, overwrite)
        tmp = None
        fsync_folder(path.parent)
    except OutputExistsError:
        raise
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise ResourceError(f"{label}: disk full or over quota while writing; free space and retry") from exc
        raise InputError(f"{label}: cannot write ({exc.strerror or exc}); check the folder is writable") from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
