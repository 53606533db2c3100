"""Fault injection, concurrent report folders: two ``dvgs-fast run`` processes never mix their
files. A second run on the same ``--out`` while the first is writing it is refused (exit 2,
naming the holder); two runs that pick the same default name get two folders; a staging folder
whose run was killed is stale and is replaced.

The runs are real subprocesses running this file as a script (``python THIS worker ...``): the
worker runs ``dvgs-fast run --method random`` and, with a gate file, stops right after its values
are written (its staging folder live and locked) until the test creates the gate.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
SAME_DEFAULT = "runs/same-random-digits"


def _spawn(cwd: Path, n_source: int, out: str, gate: Path | None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.Popen([sys.executable, str(HERE), "worker", str(n_source), out, str(gate or "-")],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_staged(proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        line = proc.stdout.readline()
        if line.strip() == "staged":
            return
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"worker never staged: rc={proc.wait()} stderr={proc.stderr.read()[-3000:]}")


def _finish(proc: subprocess.Popen, timeout: float = 120.0) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, out, err


def _rows_and_size(out: Path) -> tuple[int, int]:
    """(rows of values.csv, n_source of metrics.json): equal when both come from one run."""
    with open(out / "values.csv", newline="") as fh:
        rows = len(list(csv.DictReader(fh)))
    return rows, json.loads((out / "metrics.json").read_text())["n_source"]


def test_live_out_is_refused_and_a_killed_runs_folder_is_replaced(tmp_path):
    """Started while the first run writes X.incomplete, a second run on X used to take that live
    folder for stale and delete it (values.csv from one run, the report from the other). It is
    refused (exit 2, naming the holder) and the first run's folder is untouched; once the first
    run is killed (-9), its folder is stale and a third run replaces it."""
    gate = tmp_path / "gate"
    first = _spawn(tmp_path, 60, "X", gate)
    try:
        _wait_staged(first)                       # X.incomplete is live: values written, report not yet
        before = (tmp_path / "X.incomplete" / "values.csv").read_bytes()
        rc, _, err = _finish(_spawn(tmp_path, 70, "X", None))
        assert rc == 2, err
        assert err.startswith("error: --out: ") and err.count("\n") == 1, err
        assert f"X.incomplete is being written by another dvgs-fast run (pid {first.pid} " in err, err
        assert (tmp_path / "X.incomplete" / "values.csv").read_bytes() == before
        assert first.poll() is None                # still running, still holding its folder
    finally:
        first.send_signal(signal.SIGKILL)         # its lock dies with it; X.incomplete stays
        first.wait()
    assert (tmp_path / "X.incomplete" / "values.csv").read_bytes() == before
    rc, _, err = _finish(_spawn(tmp_path, 70, "X", None))
    assert rc == 0, err
    assert _rows_and_size(tmp_path / "X") == (70, 70) and not (tmp_path / "X.incomplete").exists()


def test_two_runs_with_the_same_default_name_get_two_folders(tmp_path):
    """Two runs without --out in the same second used to pick the same runs/<timestamp>-... and
    mix their files; the name is reserved under a lock, the second moves on to `-2`."""
    gate = tmp_path / "gate"
    a = _spawn(tmp_path, 60, "default", gate)
    b = None
    try:
        _wait_staged(a)
        b = _spawn(tmp_path, 70, "default", gate)
        _wait_staged(b)
    finally:
        gate.touch()
    results = [_finish(p) for p in (a, b)]
    assert [r[0] for r in results] == [0, 0], results
    one, two = tmp_path / SAME_DEFAULT, tmp_path / (SAME_DEFAULT + "-2")
    assert _rows_and_size(one) == (60, 60) and _rows_and_size(two) == (70, 70)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [one.name, two.name]
    assert f"report: {SAME_DEFAULT}-2/report.html" in results[1][1]        # says where it went


def test_out_name_too_long_is_a_user_error(tmp_path, capsys):
    """Issue 33: a 300-character --out exited 1 with "unexpected OSError: File name too long"."""
    from dvgs_fast.cli import main
    rc = main(["run", "--method", "random", "--no-progress", "--out", str(tmp_path / ("v" * 300))])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: --out: the folder name vvvv") and "300 bytes long" in err and err.count("\n") == 1


def _worker(n_source: str, out: str, gate: str) -> None:
    from dvgs_fast import report
    from dvgs_fast.cli import _plan, main
    real = report.write_values_early

    def values_then_wait(rep, out_dir):
        path = real(rep, out_dir)
        print("staged", flush=True)
        while gate != "-" and not os.path.exists(gate):
            time.sleep(0.02)
        return path

    report.write_values_early = values_then_wait
    args = ["run", "--method", "random", "--n-source", n_source, "--n-target", "30", "--no-curves",
            "--no-progress", "--threads", "1"]
    if out == "default":
        _plan.default_out = lambda method, dataset: Path(SAME_DEFAULT)     # the same second, for sure
    else:
        args += ["--out", out]
    sys.exit(main(args))


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "worker":
    _worker(*sys.argv[2:])
