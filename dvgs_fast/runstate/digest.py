"""Checksums of tensors and arrays, computed block by block (no whole copy of a large input)."""
from __future__ import annotations

import hashlib

import numpy as np
import torch

BLOCK_BYTES = 1 << 24          # 16 MiB per hashed block: bounded memory for a CUDA or strided input


def new_hash():
    return hashlib.blake2b(digest_size=16)


def update_with_tensor(h, t: torch.Tensor, block_bytes: int = BLOCK_BYTES) -> None:
    """Feed shape, dtype and the raw bytes of `t` into hash `h`, a block of rows at a time.

    A contiguous CPU tensor is hashed through views (no copy); a CUDA or strided one is copied
    one block at a time, so hashing never needs a second copy of the whole input."""
    t = t.detach()
    h.update(repr((tuple(t.shape), str(t.dtype))).encode())
    if t.dim() == 0:
        t = t.reshape(1)
    n = int(t.shape[0])
    if t.numel() == 0:
        return
    row_bytes = max(1, (t.numel() // n) * t.element_size())
    step = max(1, block_bytes // row_bytes)
    for a in range(0, n, step):
        block = t[a:a + step].cpu().contiguous().reshape(-1)
        h.update(block.view(torch.uint8).numpy())


def update_with_array(h, a: np.ndarray) -> None:
    """Feed the bytes of a (memory-mapped) array into `h` without copying it whole."""
    a = np.asarray(a)
    flat = a.reshape(-1, order="A") if (a.flags.c_contiguous or a.flags.f_contiguous) else None
    if flat is None:
        for row in a:
            update_with_array(h, np.ascontiguousarray(row))
        return
    step = max(1, BLOCK_BYTES // max(1, flat.itemsize))
    for i in range(0, flat.size, step):
        h.update(flat[i:i + step].view(np.uint8))


def digest_of_array(a: np.ndarray) -> str:
    h = new_hash()
    update_with_array(h, a)
    return h.hexdigest()
