"""One-line errors naming the argument or the file (issue 33, item 5), where torch, numpy or
zipfile used to speak instead: meta-device tensors and models, damaged or foreign result files,
a damaged snapshot file of the compat layer. (NaN models: test_fault_injection_nonfinite.py; a
too long --out: test_fault_injection_outputs.py.)"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from dvgs_fast import DVGS, LossVal
from dvgs_fast.result import ValuationResult


def _data():
    g = torch.Generator().manual_seed(0)
    xs, xt = torch.randn(20, 4, generator=g), torch.randn(8, 4, generator=g)
    return xs, torch.randint(0, 2, (20,), generator=g), xt, torch.randint(0, 2, (8,), generator=g)


# ----------------------------------------------------------------------------- meta tensors
def test_meta_inputs_are_named():
    """DVGS with meta tensors raised `Tensor.item() cannot be called on meta tensors`."""
    meta = [t.to("meta") for t in _data()]
    with pytest.raises(ValueError, match=r"^x_source: is on the meta device \(a shape without data\)"):
        DVGS(lambda: nn.Linear(4, 2), epochs=1, progress=False).fit(*meta)


def test_meta_device_is_refused_in_the_constructor():
    with pytest.raises(ValueError, match=r"^device: 'meta' holds shapes without data"):
        DVGS(lambda: nn.Linear(4, 2), device="meta")


@pytest.mark.parametrize("cls", [DVGS, LossVal])
def test_model_on_the_meta_device_is_named(cls):
    with pytest.raises(ValueError, match=r"^model: weight is on the meta device .*to_empty"):
        cls(lambda: nn.Linear(4, 2, device="meta"), epochs=1, progress=False).fit(*_data())


# ----------------------------------------------------------------------------- result files
@pytest.fixture()
def saved(tmp_path):
    res = ValuationResult(values=np.arange(200.0), method="random", info={"seed": 1})
    return res.save(tmp_path / "r.npz")


def _meta_file(path, meta):
    np.savez(path, values=np.arange(3.0), stderr=np.zeros(3), counts=np.ones(3, np.int64),
             meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    return path


@pytest.mark.parametrize("damage", ["truncated", "bit flipped", "empty", "unknown key", "a list", "no method"])
def test_damaged_or_foreign_result_file_is_one_value_error(saved, tmp_path, damage):
    data = bytearray(saved.read_bytes())
    path = tmp_path / "bad.npz"
    if damage == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "bit flipped":
        data[len(data) // 3] ^= 0x40          # inside a member: a CRC error
        path.write_bytes(bytes(data))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "unknown key":
        _meta_file(path, {"method": "random", "bogus": 1})
    elif damage == "a list":
        _meta_file(path, [1, 2])
    else:
        _meta_file(path, {"status": "completed"})
    with pytest.raises(ValueError) as info:
        ValuationResult.load(path)
    msg = str(info.value)
    assert msg.startswith(f"path: {path} is not a readable ValuationResult file (") and "\n" not in msg
    assert type(info.value) is ValueError


def test_intact_result_file_loads(saved):
    assert ValuationResult.load(saved).values.tolist() == list(np.arange(200.0))


# ----------------------------------------------------------------------------- compat snapshots
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_compat_agg_names_a_damaged_snapshot_file(tmp_path, damage):
    from dvgs_fast.compat import DVGS as CompatDVGS
    xs, ys, xt, yt = _data()
    dv = CompatDVGS(xs, ys.view(-1, 1), xt, yt.view(-1, 1), nn.Linear(4, 2))
    uid = str(dv.run(nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none"), save_dir=str(tmp_path),
                     num_epochs=2, target_batch_size=4, verbose=False, use_cuda=False, seed=0))
    run_dir = tmp_path / uid
    victim = run_dir / "data_value_iter=2.npy"
    victim.write_bytes(victim.read_bytes()[:-10] if damage == "truncated" else b"")
    with pytest.raises(ValueError) as info:
        dv.agg(str(run_dir))
    msg = str(info.value)
    assert msg.startswith(f"path: data_value_iter=2.npy in {run_dir} cannot be read (") and "\n" not in msg
    os.unlink(victim)                          # the way out the message gives
    assert np.isfinite(dv.agg(str(run_dir))).all()
