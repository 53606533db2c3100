"""How many CPU threads a valuation uses: one rule, chosen from the work, used by every method's
``fit`` (``num_threads=None``) and by the command line (no ``--threads``).

Why a rule at all: torch's default is one intra-op thread per core. The work of data valuation
is mostly small matrix products (an MLP on a batch of a few hundred rows, a few hundred refits of
a logistic regression), hundreds of kernels per step, and a second thread adds a synchronisation
to every kernel. Measured on this project's 2-core machine (``bench/bench_threads.py``,
``bench/THREADS.md``): a training step with 2 threads took 1.06x to 84x the wall time of 1
thread at every size from 1e6 to 4.3e9 multiply-adds per product, with or without added load, and
``dvgs-fast run --dataset adult`` took 560 s instead of 87 s (131 s instead of 23 s of CPU).

The rule (``choose``):

* an explicit count (``num_threads=N``, ``--threads N``) is used as given;
* work whose largest matrix product is below ``PARALLEL_MIN_MACS`` multiply-adds runs on one
  thread: 2 threads lost at every such size measured, whatever the load;
* larger work, or work of unknown size, gets the cores that are idle: the available cores minus
  the 1-minute load average (at least 1). Only there can a second thread pay; on a machine whose
  cores are busy (as the one the measurements ran on) it is still one thread.

Every choice carries its reason, stored with the result (``result.info["threads"]`` and
``["threads_reason"]``) and in the command line's report. Values do not depend on the thread
count for MLPs of Linear/dropout/activation layers; see README, "Checkpoints, resume and
reproducibility", for the models whose rounding does.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

#: Below this many multiply-adds in the largest matrix product of a step, one thread.
#: bench/THREADS.md: 2 threads were slower at every size measured up to 4.3e9 on 2 shared cores
#: (a gain appeared only at 8.6e9); the line sits at 2^29 (5.4e8), above every default of the
#: library except the LINCS autoencoder at full scale (4096-row chunks x 978 x 256 = 1.0e9), so
#: that large work can use cores that are idle -- on a busy machine the load average leaves it one.
PARALLEL_MIN_MACS = 2 ** 29


@dataclass(frozen=True)
class ThreadChoice:
    n: int
    reason: str

    def as_info(self) -> dict[str, Any]:
        return {"threads": self.n, "threads_reason": self.reason}


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def idle_cores(cores: int | None = None) -> tuple[int, float | None]:
    """(available cores minus the 1-minute load average, rounded, at least 1; the load average)."""
    cores = available_cores() if cores is None else cores
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not Unix
        return cores, None
    return max(1, min(cores, int(round(cores - load)))), load


def choose(requested: int | None = None, work_macs: int | None = None, *, what: str = "") -> ThreadChoice:
    """The thread count for work whose largest matrix product has ``work_macs`` multiply-adds."""
    if requested is not None:
        return ThreadChoice(int(requested), "set explicitly")
    label = f"{what}: " if what else ""
    if work_macs is not None and work_macs < PARALLEL_MIN_MACS:
        return ThreadChoice(1, f"{label}largest matrix product {work_macs:.2g} multiply-adds < "
                               f"{PARALLEL_MIN_MACS:.2g}: one thread is fastest for work this small "
                               f"(bench/THREADS.md)")
    n, load = idle_cores()
    size = "of unknown size" if work_macs is None else f"with products of {work_macs:.2g} multiply-adds"
    if load is None:
        return ThreadChoice(n, f"{label}work {size}: all {n} available cores")
    return ThreadChoice(n, f"{label}work {size}: the {n} idle core{'s' if n > 1 else ''} of "
                           f"{available_cores()} (load average {load:.1f})")


@contextlib.contextmanager
def using(n: int) -> Iterator[None]:
    """torch's intra-op threads and the BLAS/OpenMP pools of numpy/scipy/scikit-learn limited to
    ``n`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
            yield
            return
        with threadpool_limits(limits=int(n)):
            yield
    finally:
        torch.set_num_threads(before)


def largest_layer_macs(model: Any, sample_shape: tuple[int, ...], rows: int,
                       dtype: torch.dtype = torch.float32) -> int | None:
    """Multiply-adds of the largest single layer of ``model`` on ``rows`` samples of
    ``sample_shape`` (counted by torch's FlopCounterMode on one forward pass of 2 samples on the
    meta device, so nothing is computed and the model is not touched); None when the model is not
    a module or a factory of one, or its forward cannot run on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode
    try:
        if isinstance(model, nn.Module):
            import copy
            net = copy.deepcopy(model).to("meta")
        elif callable(model):
            with torch.device("meta"):
                net = model()
            if not isinstance(net, nn.Module):
                return None
        else:
            return None
        net.eval()
        leaves = {n for n, m in net.named_modules() if not list(m.children())}
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(torch.zeros((2, *sample_shape), dtype=dtype, device="meta"))
        root = type(net).__name__
        per_module = counter.get_flop_counts()
        best = 0
        for name, ops in per_module.items():
            local = name[len(root) + 1:] if name.startswith(root + ".") else None
            if local in leaves or (local is None and not leaves - {""}):
                best = max(best, sum(ops.values()))
        if best == 0:
            best = sum(per_module.get("Global", {}).values())
    except Exception:  # noqa: BLE001 - an estimate: any failure means "unknown"
        return None
    return int(best // 2 // 2 * rows)       # flops -> multiply-adds; 2 probe samples -> per sample


def _rows(x: Any) -> int | None:
    try:
        return int(x.shape[0]) if hasattr(x, "shape") else len(x)
    except TypeError:              # an iterator factory: its length is unknown
        return None


def n_classes(y: Any) -> int:
    """Distinct integer labels in y (1 for None, float targets or anything unreadable)."""
    import numpy as np
    try:
        a = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
    except Exception:  # noqa: BLE001 - an estimate
        return 1
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        return 1
    return max(1, int(np.unique(a).size))


def model_work(model: Any, x_source: Any, y_source: Any, x_target: Any, batch_sizes: list[int | None],
               hidden: int = 100) -> int | None:
    """The work estimate of a method that trains ``model`` on batches of the largest of
    ``batch_sizes`` rows (all rows when none is set): an nn.Module or a factory (the largest layer,
    ``largest_layer_macs``), or the refit models 'logistic' (one Linear d -> classes) and 'mlp'
    (d -> hidden -> classes). None when the model or the sample shape is unknown."""
    shape = tuple(int(s) for s in getattr(x_target, "shape", ())[1:])
    if not hasattr(x_target, "shape"):
        return None
    n = _rows(x_source)
    sizes = [int(b) for b in batch_sizes if b]
    rows = max(sizes) if sizes else n
    if rows is None:
        return None
    if n is not None:
        rows = min(rows, n)
    if isinstance(model, str):
        d = 1
        for s in shape:
            d *= s
        if model == "logistic":
            return rows * d * n_classes(y_source)
        return rows * max(d, hidden) * hidden
    integer = (x_target.dtype.is_floating_point is False if isinstance(x_target, torch.Tensor)
               else getattr(x_target, "dtype", None) is not None and x_target.dtype.kind in "iu")
    return largest_layer_macs(model, shape, rows, torch.long if integer else torch.float32)    # token ids


__all__ = ["PARALLEL_MIN_MACS", "ThreadChoice", "available_cores", "choose", "idle_cores", "largest_layer_macs",
           "model_work", "n_classes", "using"]
