"""The saved state of a run: a torch payload behind a header (magic, format, payload size,
blake2b-256 of the payload), written atomically, so an empty, truncated, overwritten or foreign
file is recognised before torch reads it."""
from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path

import torch

from dvgs_fast._io import atomic_write_bytes
from dvgs_fast.runstate.files import CheckpointFiles

FORMAT = 2                      # 1: the plain torch.save file of earlier versions (no header)
_MAGIC = b"DVGSCKPT"
_HEADER = struct.Struct("<8sIQ32s")     # magic, format, payload bytes, blake2b-256 of the payload


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
