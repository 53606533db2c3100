"""One process per checkpoint folder: an ``flock`` held for the life of a fit()."""
from __future__ import annotations

import os
import socket

from dvgs_fast import _io
from dvgs_fast.runstate.files import CheckpointError, CheckpointFiles


class DirLock:
    """An exclusive lock on a checkpoint folder for the life of one fit().

    ``flock`` on ``dvgs.lock`` (``dvgs_fast._io.hold_lock``): released by the kernel when its
    holder exits, however it exits (kill -9 included), so a lock file left behind by a dead
    process is simply taken over. The file names the holder's pid and host, for the error a
    second process gets. The folder may itself be a link; the lock file and the run's other
    files in it may not (they are refused, never written through)."""

    def __init__(self, files: CheckpointFiles):
        self.files = files
        self.fd: int | None = None

    def acquire(self) -> "DirLock":
        path = self.files.lock_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"checkpoint_dir: {path.parent} cannot be created ({exc})") from None
        try:
            import fcntl  # noqa: F401
        except ImportError:                # pragma: no cover - not POSIX: an exclusive-create lock file
            return self._acquire_exclusive(path)
        try:
            self.fd = _io.hold_lock(path)
        except _io.SymlinkError as exc:
            raise CheckpointError(f"checkpoint_dir: {exc}") from None
        except _io.LockBusy as busy:
            raise CheckpointError(f"checkpoint_dir: {path.parent} is in use by another {self.files.method} "
                                  f"run ({busy.holder}); wait for it to finish or pass another checkpoint_dir") from None
        try:                               # every file this run writes here: refused before any work
            for p in (self.files.state, self.files.sums, self.files.snapshots):
                _io.refuse_link(p)
        except _io.SymlinkError as exc:
            self.release()
            raise CheckpointError(f"checkpoint_dir: {exc}") from None
        return self

    def _acquire_exclusive(self, path) -> "DirLock":   # pragma: no cover - Windows
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            raise CheckpointError(f"checkpoint_dir: {path.parent} is in use by another {self.files.method} run "
                                  f"({path.read_text().strip() or 'unknown pid'}); if no such process runs, "
                                  f"delete {path}") from None
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd, self._unlink = fd, path
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        _io.release_lock(fd)
        if getattr(self, "_unlink", None) is not None:   # pragma: no cover - Windows
            os.unlink(self._unlink)

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
