"""DVGS on 2 gloo processes (source chunks sharded across ranks) equals the single-process run.

One spawn runs every case (starting a process that imports torch takes seconds); the parent
computes the single-process references with the same case functions (_dist_workers.py).
"""
from __future__ import annotations

import numpy as np
import pytest

from _dist_workers import dvgs_case, spawn

# name -> kwargs of dvgs_case
CASES = {
    # dropout on, 7 chunks of 8 rows: rank 0 rows [0, 32), rank 1 rows [32, 50)
    "dropout": {},
    # uneven: 5 chunks of 10 rows (3 + 2), no dropout, reference backend, two restarts
    "uneven": {"n": 45, "source_batch_size": 10, "dropout": 0.0, "backend": "reference", "restarts": 2,
               "epochs": 2},
    # one chunk only: rank 1 has nothing to score (warned), values still complete
    "one_chunk": {"n": 20, "source_batch_size": 64},
    "similarity": {"similarity": "projection", "compute_every": 2},
}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    ck = tmp_path_factory.mktemp("dvgs_dist_ckpt")
    cases = [(name, "dvgs", kw) for name, kw in CASES.items()]
    # checkpoints: per-rank files in one shared folder; the second run resumes from them
    cases += [("ckpt", "dvgs", {"checkpoint_dir": ck}), ("resume", "dvgs", {"checkpoint_dir": ck})]
    return spawn(cases, world=2)


@pytest.fixture(scope="module")
def single(monkeypatch_module):
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)                        # as the workers: same float32 reduction order
    try:
        return {name: dvgs_case(**kw) for name, kw in CASES.items()}
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    mp.delenv("WORLD_SIZE", raising=False)          # the parent is a plain single-process run
    yield mp
    mp.undo()


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_single_process(ranks, single, name):
    ref = single[name]
    assert np.std(ref["values"]) > 1e-4
    for r, out in enumerate(ranks):
        got = out[name]
        assert got["k"] == ref["k"]
        np.testing.assert_allclose(got["values"], ref["values"], rtol=1e-9, atol=1e-12)
        assert got["info"]["world_size"] == 2 and got["info"]["rank"] == r
    # the two ranks scored complementary, chunk-aligned row ranges
    (a0, b0), (a1, b1) = ranks[0][name]["info"]["shard"], ranks[1][name]["info"]["shard"]
    n = len(ref["values"])
    assert a0 == 0 and b0 == a1 and b1 == n


def test_dropout_case_splits_rows_by_whole_chunks(ranks):
    assert ranks[0]["dropout"]["info"]["shard"] == [0, 32]
    assert ranks[1]["one_chunk"]["info"]["shard"] == [20, 20]


def test_per_rank_checkpoints_and_resume(ranks, single):
    for r, out in enumerate(ranks):
        assert {"dvgs_checkpoint.rank0.pt", "dvgs_checkpoint.rank1.pt"} <= set(out["ckpt"]["files"])
        assert "dvgs_checkpoint.pt" not in out["ckpt"]["files"]
        np.testing.assert_allclose(out["ckpt"]["values"], single["dropout"]["values"], rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(out["resume"]["values"], out["ckpt"]["values"])


def test_distributed_true_needs_a_process_group(monkeypatch):
    from dvgs_fast import DVGS
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="distributed: True needs a process group"):
        DVGS(lambda: None, distributed=True, progress=False).fit(*_tiny())
    with pytest.raises(ValueError, match="distributed"):
        DVGS(lambda: None, distributed="yes")


def _tiny():
    import torch
    return torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.randn(4, 3), torch.tensor([0, 1, 0, 1])


def test_cli_under_torchrun_equals_single_process(tmp_path, monkeypatch):
    """`torchrun --nproc_per_node=2 -m dvgs_fast.cli run ...` writes (rank 0 only) the same
    values.csv as the single-process command."""
    import os
    import subprocess
    import sys

    from dvgs_fast.cli import main
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = tmp_path / "c.toml"
    cfg.write_text("[method]\nsource_batch_size = 50\n")     # 4 chunks: both ranks score
    common = ["run", "--dataset", "digits", "--n-source", "200", "--n-target", "100", "--epochs", "2",
              "--no-curves", "--threads", "1", "--config", str(cfg), "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "single")]) == 0
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "dvgs_fast.cli", *common, "--out", str(tmp_path / "multi")],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("report:") == 1                   # only rank 0 printed the summary
    single = (tmp_path / "single" / "values.csv").read_text()
    assert (tmp_path / "multi" / "values.csv").read_text() == single
    import json
    info = json.loads((tmp_path / "multi" / "metrics.json").read_text())
    assert '"world_size": 2' in json.dumps(info)


def test_a_failing_rank_stops_the_other_promptly():
    """Issue 33: without torchrun, a rank whose rows hit an error left the others waiting in the
    final all-reduce until the group's timeout (120 s in these workers) when the failed process
    stays alive (a caller that catches the error). Rank 1's row 40 overflows at snapshot 0 and
    rank 1 lingers; rank 0 must stop at the next sync point, naming rank 1 and its error."""
    import queue
    import time

    import torch.multiprocessing as mp
    from _dist_workers import free_port, run_cases
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    cases = [("bad", "dvgs", {"overflow_row": 40, "epochs": 20})]
    procs = [ctx.Process(target=run_cases, args=(r, 2, port, cases, q, 600.0 if r == 1 else 0.0)) for r in range(2)]
    for p in procs:
        p.start()
    errors = {}
    try:
        t0 = time.perf_counter()
        while len(errors) < 2:
            try:
                rank, _, err = q.get(timeout=max(1.0, 100 - (time.perf_counter() - t0)))
            except queue.Empty:
                raise AssertionError(f"rank 0 did not stop within 100 s (got {sorted(errors)})") from None
            errors[rank] = err or ""
    finally:
        for p in procs:
            p.kill()
            p.join(timeout=30)
    assert "ValueError: x_source: the similarity of source row 40 is not finite at snapshot 0" in errors[1]
    assert ("PeerFailed: distributed: rank 1 of 2 failed, so rank 0 stops too: ValueError: x_source: the "
            "similarity of source row 40") in errors[0], errors[0]
