"""Atomic outputs: a stage's output appears complete or not at all, never half-written, and the
previous output stays in place until the new one is complete.

A folder is swapped in with one `renameat2(RENAME_EXCHANGE)` where the file system has it (Linux:
ext4, xfs, btrfs, tmpfs), so at every instant the destination holds either the old folder or the new
one; elsewhere the old folder is first renamed aside and only deleted after the new one is in place.
Ctrl-C or SIGTERM arriving during the swap is held back until the swap is done (`signals_deferred`),
and every temporary is removed when writing fails or is interrupted. Two runs never write one output
at once (`exclusive`: a lock file beside it), and an output that could not be replaced is found before
any work (`check_writable`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from offline_opd.errors import UserError

DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold back SIGINT/SIGTERM/SIGHUP for the duration of a few renames, then deliver them.

    Python runs signal handlers between bytecodes of the main thread, so a Ctrl-C can otherwise land
    between two renames that must happen together. Outside the main thread (where handlers cannot
    be changed) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in DEFERRED_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: Path, dest: Path) -> None:
    """Put the complete folder `tmp` in the place of `dest` (a folder, a file, or nothing), atomically."""
    with signals_deferred():
        if dest.is_dir() and not dest.is_symlink() and _exchange(tmp, dest):
            old = tmp                         # the exchange left the previous output under tmp's name
        elif dest.exists() or dest.is_symlink():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            try:
                os.replace(tmp, dest)
            except BaseException:
                os.replace(old, dest)
                raise
        else:
            os.replace(tmp, dest)
            return
    shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


@contextmanager
def atomic_dir(dest: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `dest` (`replace_dir`), on error or
    interruption it is removed and `dest` is left as it was."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: Path | str, text: str) -> None:
    """Write a text file through a temporary file and a rename (the temporary is removed on failure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None:  # a write or close that fails (a full disk) names no file: this one
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path | str, obj: Any) -> None:
    """Write JSON through a temporary file and a rename."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class OutputBusyError(UserError):
    """Another process holds an output's lock: two runs would interleave their writes."""


@contextmanager
def exclusive(path: Path | str, owner: str, suffix: str = "") -> Iterator[None]:
    """Hold the lock `.<name><suffix>.lock` beside `path` while writing it; refuse if another process holds it.

    An flock, so a killed holder releases it with its last file descriptor (no stale locks). The
    file is removed on release; a process that opened it just before that sees its inode gone
    and starts over, so two holders can never each believe they hold it.
    """
    path = Path(path)
    lock = path.with_name(f".{path.name}{suffix}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = None
    try:
        with signals_deferred():   # a Ctrl-C in between would leave the lock file (harmless, but clutter)
            fd = _acquire(lock, path, owner)
        yield                      # (a signal held back above is delivered here, inside the try)
    finally:
        if fd is not None:
            _release(lock, fd)


def _release(lock: Path, fd: int) -> None:
    """Remove and close the lock, even when a signal lands before the deferring handlers are in place."""
    done: list[bool] = []

    def release() -> None:
        if not done:
            done.append(True)
            try:
                lock.unlink()
            except OSError:
                pass
            os.close(fd)
    try:
        with signals_deferred():
            release()
    except BaseException:   # a Ctrl-C that beat signals_deferred's handlers: release, then let it go on
        release()
        raise


def _acquire(lock: Path, path: Path, owner: str) -> int:
    """Open and flock `lock` (retrying if a releasing holder removed it meanwhile), record the owner."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(lock.parent)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip()
            os.close(fd)
            raise OutputBusyError(f"{path}: another run is writing it ({holder or 'a running process'}, lock "
                                  f"{lock}); wait for that run to finish or stop it, then rerun") from None
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{owner}, pid {os.getpid()}".encode(), 0)
    except OSError as exc:   # a full disk: name the folder the output would go to
        os.close(fd)
        lock.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(lock.parent)) from None
    return fd


def check_writable(path: Path | str) -> None:
    """Raise now the OSError that replacing the output `path` (a file or a folder, written through a
    temporary beside it, or filled in place) would raise later, naming the path: the folder it is
    written in, and the output and (for a folder) the files directly in it, must accept a change.

    Asked with access(2), which answers for read-only mounts (EROFS) and immutable files (even for
    root) without writing anything, so a kill at any moment leaves no probe file in an output.
    """
    path = Path(path)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    for target in [folder, path, *(sorted(path.iterdir()) if path.is_dir() else [])]:
        if (target.exists() or target == folder) and not os.access(target, os.W_OK):
            if os.statvfs(target).f_flag & os.ST_RDONLY:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(target))
            raise PermissionError(errno.EACCES, f"{os.strerror(errno.EACCES)} (read-only or immutable)", str(target))
