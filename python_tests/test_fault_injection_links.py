"""Fault injection, symbolic links: a link planted inside a run folder (a checkpoint_dir, the
compat layer's save_dir, a report's output folder) is refused with a message naming it, and the
file it points to is left exactly as it was. The run folder itself may be a link.

Each case plants a link at the name a run writes, to a "precious" file outside the folder, runs
the writer, and checks the error and that the precious file is unchanged (size and bytes).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dvgs_fast import DVGS, TracIn
from dvgs_fast import _io
from dvgs_fast.result import ValuationResult

PRECIOUS = b"precious bytes that no run may touch\n" * 64


def _data():
    g = torch.Generator().manual_seed(0)
    xs, xt = torch.randn(40, 5, generator=g), torch.randn(12, 5, generator=g)
    w = torch.randn(5, 3, generator=g)
    return xs, (xs @ w).argmax(1), xt, (xt @ w).argmax(1)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _method(name: str, checkpoint_dir: Path):
    kw = dict(checkpoint_dir=checkpoint_dir, keep_snapshots=True, seed=0, progress=False)
    if name == "DVGS":
        return DVGS(_model, epochs=1, target_batch_size=6, **kw)
    return TracIn(_model, epochs=1, n_checkpoints=2, batch_size=20, **kw)


def _precious(tmp_path: Path) -> Path:
    p = tmp_path / "elsewhere" / "precious.bin"
    p.parent.mkdir()
    p.write_bytes(PRECIOUS)
    return p


def _intact(p: Path) -> None:
    assert p.read_bytes() == PRECIOUS, f"{p} was written through a link"


# ----------------------------------------------------------------------------- checkpoint_dir
@pytest.mark.parametrize("method", ["DVGS", "TracIn"])
@pytest.mark.parametrize("stem", [".lock", "_sums.npy", "_snapshots.npy", "_checkpoint.pt"])
@pytest.mark.parametrize("when", ["fresh", "resume"])
def test_link_in_checkpoint_dir_is_refused_and_its_target_untouched(tmp_path, method, stem, when):
    ck = tmp_path / "ck"
    if when == "resume":                          # a completed run's folder: the resume opens every file
        _method(method, ck).fit(*_data())
    name = method.lower() + stem
    target = _precious(tmp_path)
    link = ck / name
    ck.mkdir(exist_ok=True)
    if os.path.lexists(link):
        link.unlink()
    link.symlink_to(target)
    with pytest.raises(ValueError) as info:
        _method(method, ck).fit(*_data())
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("checkpoint_dir: ")
    assert f"{link} is a symbolic link (to {target})" in msg
    _intact(target)


def test_link_planted_after_the_check_is_not_followed(tmp_path):
    """O_NOFOLLOW on the open itself: a link that appears between a check and the open of the
    sums file is refused too (simulated by planting it just before the store opens its files)."""
    from dvgs_fast import runstate
    target = _precious(tmp_path)
    ck = tmp_path / "ck"
    real = runstate.values_store._io.create_npy_memmap

    def plant_then_open(path, *a, **kw):
        if Path(path).name == "dvgs_sums.npy":
            Path(path).symlink_to(target)
        return real(path, *a, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(runstate.values_store._io, "create_npy_memmap", plant_then_open)
    try:
        with pytest.raises(ValueError, match=r"^checkpoint_dir: .*dvgs_sums.npy is a symbolic link"):
            _method("DVGS", ck).fit(*_data())
    finally:
        mp.undo()
    _intact(target)


def test_checkpoint_dir_itself_may_be_a_link(tmp_path):
    real = tmp_path / "real_ck"
    real.mkdir()
    (tmp_path / "ck").symlink_to(real)
    res = _method("DVGS", tmp_path / "ck").fit(*_data())
    assert (real / "dvgs_checkpoint.pt").is_file() and np.isfinite(res.values).all()


# ----------------------------------------------------------------------------- atomic writes, results
def test_atomic_write_refuses_a_link_and_leaves_no_temporary(tmp_path):
    target = _precious(tmp_path)
    (tmp_path / "run").mkdir()
    link = tmp_path / "run" / "values.csv"
    link.symlink_to(target)
    with pytest.raises(_io.SymlinkError, match=f"{link} is a symbolic link"):
        _io.atomic_write_text(link, "x")
    _intact(target)
    assert link.is_symlink() and sorted(p.name for p in (tmp_path / "run").iterdir()) == ["values.csv"]


def test_result_save_onto_a_link_is_refused(tmp_path):
    target = _precious(tmp_path)
    (tmp_path / "res.npz").symlink_to(target)
    res = ValuationResult(values=np.arange(3.0), method="random")
    with pytest.raises(ValueError, match=r"^path: .*res.npz is a symbolic link"):
        res.save(tmp_path / "res.npz")
    _intact(target)


# ----------------------------------------------------------------------------- compat save_dir
@pytest.mark.parametrize("layout", ["files", "memmap"])
def test_compat_snapshot_link_in_save_dir_is_refused(tmp_path, layout):
    """The compat layer's writers of save_dir/<run id>/ (a fresh folder it creates itself, so a
    link there is a race: the writers are called on a folder holding one)."""
    from dvgs_fast.compat import _storage
    target = _precious(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    name = _storage.SNAP_FILE if layout == "memmap" else _storage.file_name(1)
    (run_dir / name).symlink_to(target)
    with pytest.raises(ValueError, match=f"{run_dir / name} is a symbolic link"):
        if layout == "files":
            _storage.FileWriter(run_dir).write(0, np.ones(40, np.float32))
        else:
            _storage.MemmapWriter(run_dir, 40, 3, np.float32)
    _intact(target)


# ----------------------------------------------------------------------------- report folders
def _cli(args):
    from dvgs_fast.cli import main
    return main(["run", "--method", "random", "--n-source", "60", "--n-target", "30", "--no-curves",
                 "--no-progress", "--threads", "1", *args])


@pytest.mark.parametrize("name", ["values.csv", "report.md", "plots"])
def test_link_in_an_overwritten_out_is_refused(tmp_path, capsys, name):
    out = tmp_path / "out"
    assert _cli(["--out", str(out)]) == 0
    target = _precious(tmp_path)
    victim = target if name != "plots" else target.parent
    if name == "plots":                      # a plots folder that links elsewhere: old plots are removed there
        (target.parent / "discovery.png").write_bytes(PRECIOUS)
        target = target.parent / "discovery.png"
    p = out / name
    if p.is_dir():
        import shutil
        shutil.rmtree(p)
    else:
        p.unlink()
    p.symlink_to(victim)
    capsys.readouterr()
    assert _cli(["--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out: ") and f"{p} is a symbolic link" in err and err.count("\n") == 1
    _intact(target)


def test_staging_folder_that_is_a_link_is_refused(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "INCOMPLETE.txt").write_text("looks like ours")
    (elsewhere / "precious.bin").write_bytes(PRECIOUS)
    (tmp_path / "out.incomplete").symlink_to(elsewhere)
    assert _cli(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "out.incomplete is a symbolic link" in err
    _intact(elsewhere / "precious.bin")


def test_out_itself_may_be_a_link(tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "out").symlink_to(real)
    assert _cli(["--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    assert (real / "values.csv").is_file() and (tmp_path / "out").is_symlink()
