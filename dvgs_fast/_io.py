"""File writes a run can trust: atomic (a crash mid-write never leaves a truncated result behind),
never through a symbolic link, and folder locks held for the life of a run.

Links: a run folder (a ``checkpoint_dir``, a report's ``<out>.incomplete``) is the user's choice
and may itself be a link; a *file or folder inside it* that is a link is refused, never followed:
a ``dvgs.lock`` or ``dvgs_sums.npy`` planted as a link to a file elsewhere would otherwise be
truncated or overwritten. Files opened in place are opened with ``O_NOFOLLOW`` (a link planted
between a check and the open is refused too); atomic writes create a fresh temporary file
(``O_EXCL``) and rename it over the name, and refuse a name that is a link.
"""
from __future__ import annotations

import errno
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class SymlinkError(ValueError):
    """A file a run writes is a symbolic link; the message names the link and where it points."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        super().__init__(f"{self.path} is a symbolic link (to {target}); dvgs_fast does not write through or "
                         f"over links in its run folders and result files: remove the link or choose another path")


def refuse_link(path: str | os.PathLike) -> None:
    """SymlinkError when `path` is a symbolic link (dangling ones included)."""
    if os.path.islink(path):
        raise SymlinkError(path)


def open_nofollow(path: str | os.PathLike, flags: int, mode: int = 0o666) -> int:
    """os.open that refuses a symbolic link at `path` (O_NOFOLLOW: checked by the open itself)."""
    if not _NOFOLLOW:                      # pragma: no cover - not POSIX: check, then open
        refuse_link(path)
    try:
        return os.open(path, flags | _NOFOLLOW | _CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno in (errno.EEXIST, errno.ENOENT) and os.path.islink(path)):
            raise SymlinkError(path) from None
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    refuse_link(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)   # O_EXCL: a new file
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            # mkstemp creates 0600 files; give the result the permissions a plain open() would
            # (on the descriptor: the name could have been swapped for a link meanwhile).
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fh.fileno(), 0o666 & ~umask)
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows; replaces a name, never follows it
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """np.save, refusing a link at `path` (np.save would write through it)."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "wb") as fh:
        np.save(fh, np.asarray(array))


def create_npy_memmap(path: str | os.PathLike, dtype, shape: tuple[int, ...],
                      fortran_order: bool = False) -> np.memmap:
    """np.lib.format.open_memmap(path, "w+", ...) without following a link at `path`."""
    dtype = np.dtype(dtype)
    fd = open_nofollow(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "r+b") as fh:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": bool(fortran_order),
                  "shape": tuple(int(s) for s in shape)}
        np.lib.format.write_array_header_1_0(fh, header)
        offset = fh.tell()
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        fh.truncate(offset + nbytes)          # zero-filled, as open_memmap leaves a new file
        return np.memmap(fh, dtype=dtype, mode="r+", shape=tuple(shape), order="F" if fortran_order else "C",
                         offset=offset)


def open_npy_memmap(path: str | os.PathLike) -> tuple[np.memmap | None, tuple, np.dtype, bool, int, int]:
    """An existing .npy file opened for update without following a link.

    Returns (memmap or None, shape, dtype, fortran_order, data offset, file size); the memmap is
    None when the file is smaller than its header says (np.memmap would zero-extend it)."""
    fd = open_nofollow(path, os.O_RDWR)
    with os.fdopen(fd, "r+b") as fh:
        version = np.lib.format.read_magic(fh)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(fh)
        offset = fh.tell()
        size = os.fstat(fh.fileno()).st_size
        expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if size != expected:
            return None, tuple(shape), dtype, bool(fortran), offset, size
        mm = np.memmap(fh, dtype=dtype, mode="r+", shape=tuple(shape), order="F" if fortran else "C",
                       offset=offset)
        return mm, tuple(shape), dtype, bool(fortran), offset, size


# ---------------------------------------------------------------------------------------------
# locks: one live holder per folder
# ---------------------------------------------------------------------------------------------
class LockBusy(Exception):
    """The lock is held by a live process; ``holder`` says which ("pid 123 on host since ...")."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def hold_lock(path: str | os.PathLike) -> int:
    """Take an exclusive ``flock`` on the file `path` (created if missing, never through a link)
    and write the holder's pid, host and start time into it; returns the descriptor, which holds
    the lock until :func:`release_lock` or the process exits, however it exits (kill -9 included:
    a lock file left by a dead process is simply taken over). LockBusy when a live process holds
    it; SymlinkError when `path` is a link."""
    import fcntl
    path = Path(path)
    while True:
        fd = open_nofollow(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockBusy(holder) from None
        try:                            # the file we locked must still be the one at `path`
            same = os.lstat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
             .encode())
    return fd


def release_lock(fd: int, *, clear: bool = True) -> None:
    """Release a lock taken by :func:`hold_lock`; `clear` empties the file first (an idle folder
    names no holder)."""
    if clear:
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
    os.close(fd)                         # closing the descriptor releases the flock


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 200).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "holder's pid unknown"
