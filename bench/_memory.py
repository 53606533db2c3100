"""Peak memory of one call, for benchmark extra_info.

CPU: peak resident set size (RSS) above the level before the call, sampled from /proc every
millisecond by a background thread (ru_maxrss is a process-lifetime maximum, useless for
comparing calls made in one process). GPU: torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import os
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:  # not Linux
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory(fn, *args, device: str = "cpu", **kwargs):
    """Run fn once; return (result, peak bytes above the starting level)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base
    base = current_rss()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], current_rss())
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out = fn(*args, **kwargs)
    finally:
        stop.set()
        th.join()
    peak[0] = max(peak[0], current_rss())
    return out, peak[0] - base
