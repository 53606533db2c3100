"""DistContext with 2 real gloo processes: sharding, gathering and reductions."""
import os
import socket

import numpy as np
import pytest
import torch.multiprocessing as mp

from dvgs_fast.distributed import DistContext


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, sizes, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    ctx = DistContext.from_env()
    try:
        out = []
        for n in sizes:
            a, b = ctx.shard(n)
            local = np.arange(a, b, dtype=np.float64)[:, None] * np.array([[1.0, -1.0]])
            full = ctx.gather_shards(local, n)
            total = ctx.all_reduce_sum(np.array([b - a], dtype=np.float64))
            out.append((full.tolist(), float(total[0])))
        obj = ctx.broadcast_object({"seed": 123} if ctx.is_main else None)
        q.put((rank, out, obj))
    finally:
        ctx.close()


def test_single_process_context_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = DistContext.from_env()
    assert not ctx.enabled and ctx.shard(10) == (0, 10)
    x = np.arange(4.0)
    assert np.array_equal(ctx.gather_shards(x, 4), x)


@pytest.mark.parametrize("world,n", [(3, 10), (4, 3)])
def test_shards_cover_everything_once(world, n):
    spans = [DistContext(rank=r, world_size=world).shard(n) for r in range(world)]
    covered = [i for a, b in spans for i in range(a, b)]
    assert covered == list(range(n))


def test_gloo_two_processes_gather_and_reduce():
    sizes = [7, 1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, sizes, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, out, obj in results:
        for n, (full, total) in zip(sizes, out):
            assert full == (np.arange(n, dtype=np.float64)[:, None] * np.array([[1.0, -1.0]])).tolist()
            assert total == n
        assert obj == {"seed": 123}
