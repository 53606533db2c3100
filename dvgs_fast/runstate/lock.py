"""One process per checkpoint folder: an ``flock`` held for the life of a fit()."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from dvgs_fast.runstate.files import CheckpointError, CheckpointFiles


class DirLock:
    """An exclusive lock on a checkpoint folder for the life of one fit().

    ``flock`` on ``dvgs.lock``: released by the kernel when its holder exits, however it exits
    (kill -9 included), so a lock file left behind by a dead process is simply taken over. The
    file names the holder's pid and host, for the error a second process gets."""

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
            import fcntl
        except ImportError:                # pragma: no cover - not POSIX: an exclusive-create lock file
            return self._acquire_exclusive(path)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_holder(fd)
                os.close(fd)
                raise CheckpointError(f"checkpoint_dir: {path.parent} is in use by another {self.files.method} "
                                      f"run ({holder}); wait for it to finish or pass another checkpoint_dir") from None
            try:                            # the file we locked must still be the one at `path`
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        self.fd = fd
        return self

    def _acquire_exclusive(self, path: Path) -> "DirLock":   # pragma: no cover - Windows
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
        try:
            os.ftruncate(fd, 0)             # an idle folder names no holder
        except OSError:
            pass
        os.close(fd)                         # closing the descriptor releases the flock
        if getattr(self, "_unlink", None) is not None:   # pragma: no cover - Windows
            os.unlink(self._unlink)

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 200).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "holder's pid unknown"
