"""DVGS checkpoints: what a folder holds, who may use it, and whether it belongs to this run.

A ``checkpoint_dir`` holds (``.rank<r>`` before the suffix in a distributed run, one set per
rank):

* ``dvgs_checkpoint.pt``: the state after the last completed snapshot or epoch (model,
  optimizer, RNG states, counters), written atomically (temporary file + rename). It starts with
  a header (magic, format, payload size, payload checksum), so an empty, truncated or
  overwritten file is recognised before torch reads it.
* ``dvgs_sums.npy`` (and ``dvgs_snapshots.npy`` with ``keep_snapshots``): memory-mapped arrays
  written in place as snapshots are computed (_values_store.py). The state records the checksum
  of the valid sums slot and of every completed snapshot column at the moment it is saved;
  resuming verifies the files' sizes and these checksums.
* ``dvgs.lock``: held (``flock``) by the process using the folder and naming its pid; a second
  process is refused, a lock left by a dead process is taken over (the kernel releases the lock
  of a killed process).

Other methods that checkpoint through this module name the files after themselves (TracIn:
``tracin_checkpoint.pt``, ``tracin_sums.npy``, ``tracin.lock``; ``CheckpointFiles.method``).

The run's *fingerprint* (settings, seed, the data, the model's structure and initial weights,
the loss) is stored in the state; resuming with anything different is refused with a message
saying what differs. Every problem is one ``ValueError`` line naming ``checkpoint_dir`` and the
way out (delete the folder or use another one).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import io
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dvgs_fast._io import atomic_write_bytes
from dvgs_fast.methods.dvgs._digest import new_hash, update_with_tensor
from dvgs_fast.methods.dvgs._values_store import StoreFileError, ValuesStore

FORMAT = 2                      # 1: the plain torch.save file of earlier versions (no header)
_MAGIC = b"DVGSCKPT"
_HEADER = struct.Struct("<8sIQ32s")     # magic, format, payload bytes, blake2b-256 of the payload

# Settings that do not enter the fingerprint: a resume may change them.
_RESUMABLE = ("max_time", "checkpoint_dir", "distributed", "device")


class CheckpointError(ValueError):
    """The checkpoint folder cannot be used by this run (one line: the folder, what, the way out)."""


def checkpoint_error(directory: Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint_dir: {directory}: {what}; delete that folder (or pass another "
                           f"checkpoint_dir) to start over")


@dataclass(frozen=True)
class CheckpointFiles:
    """The paths one process uses in ``directory`` (``rank`` None: a single-process run).

    ``method`` names the files (``dvgs_checkpoint.pt``, ``tracin_checkpoint.pt``, ...) and the
    errors: each method that checkpoints through this module has its own files and lock, so a
    DVGS and a TracIn run sharing a folder neither block nor misread each other."""

    directory: Path
    rank: int | None = None
    method: str = "DVGS"

    def _name(self, stem: str, suffix: str) -> Path:
        return self.directory / (f"{self.method.lower()}{stem}{'' if self.rank is None else f'.rank{self.rank}'}"
                                 f"{suffix}")

    @property
    def state(self) -> Path:
        return self._name("_checkpoint", ".pt")

    @property
    def sums(self) -> Path:
        return self._name("_sums", ".npy")

    @property
    def snapshots(self) -> Path:
        return self._name("_snapshots", ".npy")

    @property
    def lock_path(self) -> Path:
        return self._name("", ".lock")

    def error(self, what: str) -> CheckpointError:
        return checkpoint_error(self.directory, what)

    def remove_temporaries(self) -> None:
        """Temporary state files of a process killed mid-write (atomic_write_bytes names them
        `.<name>.<random>.tmp`); only call while holding the lock, when nobody else writes."""
        for tmp in self.directory.glob(f".{self.state.name}.*.tmp"):
            try:
                tmp.unlink()
            except OSError:
                pass


# ============================================================================== the lock
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


# ============================================================================== the state file
def write_state(path: Path, state: dict) -> None:
    """Header + torch payload, written atomically (a crash leaves the previous state intact)."""
    buf = io.BytesIO()
    buf.write(b"\0" * _HEADER.size)
    torch.save(state, buf)
    view = buf.getbuffer()
    payload = view[_HEADER.size:]
    digest = new_hash_256(payload)
    view[:_HEADER.size] = _HEADER.pack(_MAGIC, FORMAT, len(payload), digest)
    del payload
    atomic_write_bytes(path, view)


def new_hash_256(data) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


def read_state(files: CheckpointFiles) -> dict | None:
    """The saved state, or None when the folder has none; CheckpointError when it is unusable."""
    path = files.state
    if not path.exists():
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise files.error(f"{path.name} is unreadable ({exc})") from None
    if len(data) < _HEADER.size:
        raise files.error(f"{path.name} is {'empty' if not data else f'truncated ({len(data)} bytes)'}")
    magic, fmt, size, digest = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise files.error(f"{path.name} is not a {files.method} checkpoint of this version (an older format, or "
                          f"overwritten)")
    if fmt != FORMAT:
        raise files.error(f"{path.name} has checkpoint format {fmt}, this version reads {FORMAT}")
    payload = memoryview(data)[_HEADER.size:]
    if len(payload) != size:
        raise files.error(f"{path.name} has {len(payload)} payload bytes, {size} were written (truncated)")
    if new_hash_256(payload) != digest:
        raise files.error(f"{path.name} does not match its checksum (overwritten or corrupted)")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to decode means the same thing here
        raise files.error(f"{path.name} cannot be read ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise files.error(f"{path.name} holds no {files.method} state")
    return state


def open_store(files: CheckpointFiles | None, n: int, *, state: dict | None, n_snapshots: int,
               keep_snapshots: bool, snapshot_dtype) -> ValuesStore:
    """The sums (and snapshot) memmaps; on resume, their sizes and checksums are verified."""
    resume = state is not None
    try:
        store = ValuesStore(n, None if files is None else files.directory, resume=resume,
                            n_snapshots=n_snapshots, keep_snapshots=keep_snapshots,
                            snapshot_dtype=snapshot_dtype,
                            sums_name=(files.sums.name if files else "dvgs_sums.npy"),      # no folder: names unused
                            snap_name=(files.snapshots.name if files else "dvgs_snapshots.npy"))
    except StoreFileError as exc:
        raise files.error(str(exc)) from None
    if resume:
        k = int(state["k"])
        if store.slot_digest(k) != state["sums_digest"]:
            raise files.error(f"{files.sums.name} does not match the saved state (checksum of the sums "
                              f"after {k} snapshots): it was overwritten or corrupted")
        if keep_snapshots:
            digests = state["snap_digests"]
            bad = [j for j in range(k) if j >= len(digests) or store.column_digest(j) != digests[j]]
            if bad:
                raise files.error(f"{files.snapshots.name} does not match the saved state (checksum of "
                                  f"snapshot {bad[0]}): it was overwritten or corrupted")
    return store


# ============================================================================== fingerprint
def fingerprint(settings: dict[str, Any], seed: int, world_size: int, model: nn.Module, loss: Any,
                data_identity: bytes) -> dict[str, Any]:
    """What determines the values, in parts, so that a mismatch can say what changed.

    settings: the method's settings (those a resume may change are dropped); model: its
    structure (module types, their hyper-parameters, class source for user classes, parameter
    and buffer names/shapes/dtypes) and its initial weights; loss: a callable's identity;
    data: the source's identity and the target's bytes."""
    s = {k: v for k, v in settings.items() if k not in _RESUMABLE}
    s["seed"] = int(seed)
    if world_size > 1:                  # a rank's rows depend on the number of ranks
        s["world_size"] = int(world_size)
    return {"settings": s, "model structure": model_structure(model), "initial weights": model_weights(model),
            "loss": callable_identity(loss), "data": new_hash_hex(data_identity)}


def new_hash_hex(b: bytes) -> str:
    h = new_hash()
    h.update(b)
    return h.hexdigest()


def compare(saved: dict, now: dict, files: CheckpointFiles) -> None:
    """Raise naming the first part of the fingerprint that differs."""
    if saved == now:
        return
    s0, s1 = saved.get("settings", {}), now["settings"]
    what = []
    changed = [f"{k}: {s0.get(k)!r} -> {s1.get(k)!r}" for k in sorted(set(s0) | set(s1)) if s0.get(k) != s1.get(k)]
    if changed:
        what.append("settings differ (" + "; ".join(changed[:4]) + ("; ..." if len(changed) > 4 else "") + ")")
    parts = [k for k in now if k != "settings" and saved.get(k) != now[k]]
    if parts:
        what.append("the " + " and the ".join(parts) + (" differs" if len(parts) == 1 else " differ"))
    what = " and ".join(what) or "the fingerprint differs"
    raise files.error(f"holds a checkpoint of another run: {what}")


_PLAIN = (bool, int, float, str, type(None))


def _plain(v: Any) -> bool:
    if isinstance(v, _PLAIN):
        return True
    if isinstance(v, (tuple, list)) and len(v) <= 64:
        return all(_plain(x) for x in v)
    return False


def _class_source(cls: type) -> str:
    """The source of a user-defined module class (its forward decides the function: ReLU vs
    Tanh inside a custom forward shows nowhere else); torch's own classes are named only."""
    if (cls.__module__ or "").startswith("torch."):
        return ""
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):     # defined interactively: its name is what we have
        return ""


def model_structure(model: nn.Module) -> str:
    """Digest of the architecture: for every submodule its path, class, extra_repr (Linear sizes,
    Dropout p, norm eps/momentum, activation settings), plain public attributes, the source of
    user-defined classes, and the names, shapes, dtypes and requires_grad of its own parameters
    and buffers."""
    h = new_hash()
    for name, m in model.named_modules():
        cls = type(m)
        attrs = sorted((k, v) for k, v in vars(m).items()
                       if not k.startswith("_") and k != "training" and _plain(v))
        h.update(repr((name, f"{cls.__module__}.{cls.__qualname__}", m.extra_repr(), attrs)).encode())
        h.update(_class_source(cls).encode())
        for pn, p in m.named_parameters(recurse=False):
            h.update(repr(("param", pn, tuple(p.shape), str(p.dtype), p.requires_grad)).encode())
        for bn, b in m.named_buffers(recurse=False):
            h.update(repr(("buffer", bn, tuple(b.shape), str(b.dtype))).encode())
    return h.hexdigest()


def model_weights(model: nn.Module) -> str:
    h = new_hash()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        if isinstance(v, torch.Tensor):
            update_with_tensor(h, v)
        else:
            h.update(repr(v).encode())
    return h.hexdigest()


def _code_identity(code) -> str:
    """The compiled body of a function (bytecode, constants, names), nested code included: unlike
    its source text, it does not change with what else stands on a lambda's line."""
    consts = [_code_identity(c) if inspect.iscode(c) else repr(c) for c in code.co_consts]
    return repr((code.co_code, consts, code.co_names, code.co_varnames))


def callable_identity(fn: Any) -> str:
    """What a custom loss computes, as far as can be told without running it."""
    if isinstance(fn, str):
        return fn
    if isinstance(fn, nn.Module):
        return model_structure(fn)
    if isinstance(fn, functools.partial):
        return "partial:" + callable_identity(fn.func) + repr([a for a in fn.args if _plain(a)]) + \
            repr(sorted((k, v) for k, v in fn.keywords.items() if _plain(v)))
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    code = getattr(fn, "__code__", None)
    if code is not None:
        defaults = [d for d in (getattr(fn, "__defaults__", None) or ()) if _plain(d)]
        return name + _code_identity(code) + repr(defaults)
    return name + _class_source(type(fn))        # a callable object: its class


__all__ = ["CheckpointFiles", "CheckpointError", "DirLock", "write_state", "read_state", "open_store",
           "fingerprint", "compare", "model_structure", "FORMAT"]
