"""The torch-free CUDA kernels of per_sample_grad_stats, linear_ghost_stats and sinkhorn, run on the
CPU: g++ compiles each kernel file with the CUDA keywords emulated (python_tests/_stats_cuda_emu.cpp,
python_tests/_sinkhorn_cuda_emu.cpp), one std::thread per CUDA thread, and the results are compared
with float64 references computed here. This checks the device code's logic -- grid and block index
math, block-partial and warp-shuffle reductions, the alignment-dependent float4 path, the pass
offsets -- not its speed. The large cases address inputs at the GPU targets' full sizes (N = 720,000
rows; 4096 x 1M elements) but materialise and run only the blocks of a few rows."""
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(GXX is None, reason="g++ not found: cannot build the CUDA kernel emulators")

F32, F64, F16, BF16 = 0, 1, 2, 3
TORCH_DTYPE = {F32: torch.float32, F64: torch.float64, F16: torch.float16, BF16: torch.bfloat16}
SENTINEL = -7.0  # what the emulator puts in partial columns the kernel must not touch
PARTIAL_BUDGET = 64 << 20  # kGradStatsPartialBudget, bytes per partial buffer


def _build(tmp_dir: Path, source: str, out: str, *defines: str) -> Path:
    exe = tmp_dir / out
    cmd = [GXX, "-std=c++20", "-O1", "-pthread", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unknown-pragmas", "-Werror",
           "-I", str(tmp_dir), "-I", str(ROOT / "csrc"), *defines, str(ROOT / "python_tests" / source), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


@pytest.fixture(scope="module")
def emulators(tmp_path_factory):
    work = tmp_path_factory.mktemp("cuda_emu")
    for header in ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h"):  # the emulators define what they need
        (work / header).write_text("#pragma once\n")
    return {
        "grad": _build(work, "_stats_cuda_emu.cpp", "grad_emu", "-DEMU_GRAD_STATS"),
        "ghost": _build(work, "_stats_cuda_emu.cpp", "ghost_emu", "-DEMU_GHOST_STATS"),
        "sinkhorn": _build(work, "_sinkhorn_cuda_emu.cpp", "sinkhorn_emu"),
    }


def _run(exe: Path, tmp_path: Path, payload: bytes) -> bytes:
    inp, outp = tmp_path / "in.bin", tmp_path / "out.bin"
    inp.write_bytes(payload)
    proc = subprocess.run([str(exe), str(inp), str(outp)], capture_output=True, text=True, timeout=600)
    if proc.returncode == 7:
        pytest.skip(f"this machine refuses large MAP_NORESERVE mappings: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"emulator exit {proc.returncode}: {proc.stderr}"
    return outp.read_bytes()


# ------------------------------------------------------------------------------ per_sample_grad_stats
def _grad_stats(exe, tmp_path, *, dtype, n_rows, row_stride, sizes, strides, chunk, picks, row_begin=0,
                row_count=None, col_offset=0, extra_cols=0, data_shift=0, target_shift=0, seed=0):
    """Run one tensor through launch_grad_stats_partials + launch_reduce_partials for the picked
    rows; returns the emulator's results and the float64 truth for each picked row."""
    row_count = n_rows - row_begin if row_count is None else row_count
    g = torch.Generator().manual_seed(seed)
    numel = int(np.prod(sizes)) if sizes else 1
    extent = 1 + sum((s - 1) * st for s, st in zip(sizes, strides))
    acc = torch.float64 if dtype == F64 else torch.float32
    target = torch.randn(numel, generator=g, dtype=torch.float64).to(acc)
    rows = []  # logical values of each picked row, through a real strided view of its storage
    for _ in picks:
        storage = torch.randn(extent, generator=g, dtype=torch.float64).to(TORCH_DTYPE[dtype])
        rows.append(torch.as_strided(storage, sizes, strides).reshape(-1).contiguous() if sizes else storage[:1])
    head = [dtype, n_rows, row_stride, len(sizes)] + list(sizes) + [0] * (8 - len(sizes))
    head += list(strides) + [0] * (8 - len(strides))
    head += [chunk, row_begin, row_count, col_offset, extra_cols, data_shift, target_shift, len(picks)]
    payload = struct.pack(f"<{len(head)}q", *head) + struct.pack(f"<{len(picks)}q", *picks)
    payload += target.numpy().tobytes()
    for r in rows:
        raw = r.view(torch.int16) if dtype in (F16, BF16) else r
        payload += raw.numpy().tobytes()
    out = _run(exe, tmp_path, payload)
    n_cols, vec4_loads, blocks_run, rows_per_pass, rc = struct.unpack_from("<5q", out, 0)
    res = np.frombuffer(out[40:], dtype=np.float64).reshape(len(picks), 2 + 2 * n_cols) if rc == 0 else None
    chunks = -(-numel // chunk)
    truth = []
    for r in rows:
        x, t = r.double(), target.double()
        cut = [(c * chunk, min(numel, (c + 1) * chunk)) for c in range(chunks)]
        truth.append({
            "dot": float(x @ t), "sq": float(x @ x),
            "pdot": np.array([float(x[a:b] @ t[a:b]) for a, b in cut]),
            "psq": np.array([float(x[a:b] @ x[a:b]) for a, b in cut]),
            "scale_dot": float((x * t).abs().sum()), "scale_sq": float((x * x).sum()),
        })
    return {"rc": rc, "n_cols": n_cols, "vec4_loads": vec4_loads, "blocks_run": blocks_run,
            "rows_per_pass": rows_per_pass, "res": res, "truth": truth, "chunks": chunks}


def _check_grad_stats(r, *, dtype, col_offset=0):
    assert r["rc"] == 0
    rel = 1e-12 if dtype == F64 else 2e-6
    n_cols, chunks = r["n_cols"], r["chunks"]
    for row, t in zip(r["res"], r["truth"]):
        dot, sq, pdot, psq = row[0], row[1], row[2:2 + n_cols], row[2 + n_cols:]
        # block-partial reductions: one column per chunk, in the tensor's column range only
        own = slice(col_offset, col_offset + chunks)
        np.testing.assert_allclose(pdot[own], t["pdot"], rtol=0, atol=rel * t["scale_dot"] + 1e-30)
        np.testing.assert_allclose(psq[own], t["psq"], rtol=0, atol=rel * t["scale_sq"] + 1e-30)
        others = np.concatenate([pdot[:col_offset], pdot[col_offset + chunks:], psq[:col_offset],
                                 psq[col_offset + chunks:]])
        assert (others == SENTINEL).all(), "the kernel wrote outside its columns"
        assert abs(dot - t["dot"]) <= rel * t["scale_dot"] + 1e-30
        assert abs(sq - t["sq"]) <= rel * t["scale_sq"] + 1e-30


@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16])
def test_grad_stats_dense_rows_and_partials(emulators, tmp_path, dtype):
    # 26 chunks per row among 68 partial columns (the other tensors' columns around them): the
    # per-sample reduction strides its 32 lanes over the columns three times. 1001 is no multiple
    # of 4 (the float4 path has a scalar tail); the rows are padded to 1004.
    r = _grad_stats(emulators["grad"], tmp_path, dtype=dtype, n_rows=5, row_stride=1004, sizes=[1001],
                    strides=[1], chunk=40, picks=list(range(5)), col_offset=30, extra_cols=12)
    _check_grad_stats(r, dtype=dtype, col_offset=30)
    assert r["n_cols"] == 30 + 26 + 12
    assert (r["vec4_loads"] > 0) == (dtype == F32), "float rows that are 16-byte aligned take the float4 path"


@pytest.mark.parametrize("case", ["data_shift", "target_shift", "row_stride", "chunk"])
def test_grad_stats_misaligned_takes_scalar_path(emulators, tmp_path, case):
    kw = dict(n_rows=6, row_stride=520, sizes=[517], strides=[1], chunk=64, picks=list(range(6)))
    if case == "data_shift":
        kw["data_shift"] = 1          # the tensor starts 4 bytes past a 16-byte boundary
    elif case == "target_shift":
        kw["target_shift"] = 3
    elif case == "row_stride":
        kw["row_stride"] = 521        # every other row start is misaligned
    else:
        kw["chunk"] = 66              # chunk starts not on a float4 boundary
    r = _grad_stats(emulators["grad"], tmp_path, dtype=F32, **kw)
    _check_grad_stats(r, dtype=F32)
    assert r["vec4_loads"] == 0


@pytest.mark.parametrize("dtype", [F32, BF16, F64])
@pytest.mark.parametrize("sizes,strides,row_stride", [
    ([13, 7], [1, 13], 91),            # a transposed weight gradient
    ([4, 5, 6], [60, 1, 5], 240),      # partly permuted: two runs after collapsing
    ([3, 8], [0, 2], 17),              # expanded (stride 0) and every other element
    ([], [], 1),                       # a scalar per sample
])
def test_grad_stats_strided_layouts(emulators, tmp_path, dtype, sizes, strides, row_stride):
    r = _grad_stats(emulators["grad"], tmp_path, dtype=dtype, n_rows=9, row_stride=row_stride, sizes=sizes,
                    strides=strides, chunk=16, picks=list(range(9)), col_offset=1)
    _check_grad_stats(r, dtype=dtype, col_offset=1)
    if sizes and strides[-1] != 1:
        assert r["vec4_loads"] == 0


def test_grad_stats_4096_by_1m_elements(emulators, tmp_path):
    # The per_sample_grad_stats target: 4096 samples x 2^20 float parameters (17 GB addressed;
    # sample 4095 starts 4.3e9 elements in). Only that last sample is materialised.
    n, p = 4096, 1 << 20
    r = _grad_stats(emulators["grad"], tmp_path, dtype=F32, n_rows=n, row_stride=p, sizes=[p], strides=[1],
                    chunk=8192, picks=[n - 1], seed=1)
    _check_grad_stats(r, dtype=F32)
    assert r["vec4_loads"] == 2 * (p // 4)  # a float4 of the row and one of the target, per 4 elements
    assert r["blocks_run"] == p // 8192 + 1  # the row's partial blocks + its reduce block
    # one pass holds all 4096 rows within the partial budget
    assert r["rows_per_pass"] >= n and r["rows_per_pass"] * r["n_cols"] * 8 <= PARTIAL_BUDGET


@pytest.mark.parametrize("row_begin,row_count", [(0, 720_000), (720_000 - 37_000, 37_000)])
def test_grad_stats_720k_rows_strided_pass(emulators, tmp_path, row_begin, row_count):
    # N = 720,000 samples of a strided 978-wide gradient (every third element of 4099-wide rows):
    # the last sample starts at 2.95e9 elements, past 32-bit indexing; the second case is the last
    # pass of a multi-pass call (partials row 0 = sample 683,000).
    n = 720_000
    picks = [row_begin, row_begin + 1, n - 1]
    r = _grad_stats(emulators["grad"], tmp_path, dtype=F32, n_rows=n, row_stride=4099, sizes=[978], strides=[3],
                    chunk=8192, picks=picks, row_begin=row_begin, row_count=row_count, seed=2)
    _check_grad_stats(r, dtype=F32)


def test_grad_stats_rows_per_pass_bounds_partials(emulators, tmp_path):
    # 1M parameters in 8192-element chunks = 123 columns; at N = 720k the partials would be 0.7 GB
    # per buffer without passes. (One gradient expanded over the samples: row stride 0.)
    p = 1_000_000
    r = _grad_stats(emulators["grad"], tmp_path, dtype=F32, n_rows=720_000, row_stride=0, sizes=[p], strides=[1],
                    chunk=8192, picks=[719_999], row_begin=700_000, row_count=20_000, seed=3)
    _check_grad_stats(r, dtype=F32)
    assert r["n_cols"] == 123
    assert 1 <= r["rows_per_pass"] < 720_000
    assert r["rows_per_pass"] * 123 * 8 <= PARTIAL_BUDGET < (r["rows_per_pass"] + 1) * 123 * 8


def test_grad_stats_cpu_op_bounds_partials_the_same_way():
    # The CPU kernel bounds its partials with the same 64 MB budget: 50 per-sample scalars give 50
    # partial columns, so 180,000 samples take two passes (167,772 + 12,228 rows); the second
    # pass's sample offset must land every result in its place.
    import dvgs_fast  # noqa: F401  (registers torch.ops.dvgs_fast)
    n, k = 180_000, 50
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(n, generator=g, dtype=torch.float64) for _ in range(k)]
    target = [torch.randn((), generator=g, dtype=torch.float64) for _ in range(k)]
    assert n > PARTIAL_BUDGET // (k * 8)
    dot, sq = torch.ops.dvgs_fast.per_sample_grad_stats(grads, target)
    G, T = torch.stack(grads, 1), torch.stack(target)
    torch.testing.assert_close(dot, G @ T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sq, (G * G).sum(1), rtol=1e-12, atol=1e-12)


def test_grad_stats_rejects_rows_outside_layout(emulators, tmp_path):
    r = _grad_stats(emulators["grad"], tmp_path, dtype=F32, n_rows=10, row_stride=8, sizes=[8], strides=[1],
                    chunk=8, picks=[9], row_begin=5, row_count=6)
    assert r["rc"] == 1  # cudaErrorInvalidValue: rows 5..10 of a 10-row tensor


# ------------------------------------------------------------------------------ linear_ghost_stats
def _ghost(exe, tmp_path, *, dtype, rows, w, d_in, d_out, bias, picks, seed=0):
    g = torch.Generator().manual_seed(seed)
    tdt = torch.float64 if dtype == F64 else torch.float32
    data = [[torch.randn(k, generator=g, dtype=torch.float64).to(tdt) for k in (w, w, d_in, d_out)] for _ in picks]
    gb = torch.randn(d_out, generator=g, dtype=torch.float64).to(tdt) if bias else None
    payload = struct.pack("<7q", dtype, rows, w, d_in, d_out, int(bias), len(picks))
    payload += struct.pack(f"<{len(picks)}q", *picks)
    for row in data:
        payload += b"".join(t.numpy().tobytes() for t in row)
    if bias:
        payload += gb.numpy().tobytes()
    out = _run(exe, tmp_path, payload)
    blocks_run, rc = struct.unpack_from("<2q", out, 0)
    res = np.frombuffer(out[16:], dtype=np.float64 if dtype == F64 else np.float32).reshape(len(picks), 3)
    rel = 1e-12 if dtype == F64 else 2e-6
    for (P, Q, A, D), (pq, a2, d2) in zip(data, res):
        P, Q, A, D = P.double(), Q.double(), A.double(), D.double()
        want_pq = float(P @ Q) + (float(D @ gb.double()) if bias else 0.0)
        scale = float((P * Q).abs().sum()) + (float((D * gb.double()).abs().sum()) if bias else 0.0)
        assert abs(pq - want_pq) <= rel * scale + 1e-30
        assert abs(a2 - float(A @ A)) <= rel * float(A @ A) + 1e-30
        assert abs(d2 - float(D @ D)) <= rel * float(D @ D) + 1e-30
    return rc, blocks_run


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows,w,d_in,d_out", [(37, 45, 70, 33), (8, 1, 1, 1), (3, 300, 17, 96)])
def test_ghost_row_reduce_all_rows(emulators, tmp_path, dtype, bias, rows, w, d_in, d_out):
    # 37 rows: the last block has 5 live warps and 3 that leave at once; widths that are no
    # multiple of 32 leave lanes idle in the strided loops.
    rc, blocks = _ghost(emulators["ghost"], tmp_path, dtype=dtype, rows=rows, w=w, d_in=d_in, d_out=d_out,
                        bias=bias, picks=list(range(rows)))
    assert rc == 0 and blocks == -(-rows // 8)


def test_ghost_row_reduce_720k_rows(emulators, tmp_path):
    # LINCS scale, N = 720,000 rows, with a 4096-wide input: A spans 2.95e9 elements (11.8 GB
    # addressed), so row offsets overflow 32 bits; only the picked rows' blocks run.
    rc, blocks = _ghost(emulators["ghost"], tmp_path, dtype=F32, rows=720_000, w=256, d_in=4096, d_out=978,
                        bias=True, picks=[0, 7, 8, 524_287, 719_999], seed=4)
    assert rc == 0 and blocks == 4  # rows 0 and 7 share block 0


# ------------------------------------------------------------------------------ sinkhorn residual
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sinkhorn_residual_ignores_negative_zero_and_nan(emulators, tmp_path, dtype):
    # Row 0 sits on the only column: its new value is -eps * 0 = -0.0 and its previous one +0.0, a
    # residual of -0.0 whose bits are the largest of all; row 1's previous value is NaN. The CPU's
    # std::max keeps 0.25 (row 2); so must the GPU's atomicMax on the bits.
    rows = np.array([[0.0], [1.0], [2.0]], dtype=dtype)
    cols = np.array([[0.0]], dtype=dtype)
    logw = np.zeros(1, dtype=dtype)
    prev = np.array([0.0, np.nan, 1.75], dtype=dtype)
    header = np.array([0 if dtype == np.float32 else 1, 3, 1, 1, 2, 0, 1, 0], dtype=np.int64)
    payload = header.tobytes() + np.array([1.0]).tobytes() + rows.tobytes() + cols.tobytes() + logw.tobytes()
    payload += prev.tobytes()
    out = _run(emulators["sinkhorn"], tmp_path, payload)
    sz = np.dtype(dtype).itemsize
    new = np.frombuffer(out[:3 * sz], dtype=dtype)
    residual = np.frombuffer(out[3 * sz + 24:3 * sz + 32], dtype=np.float64)[0]
    assert new[0] == 0.0 and np.isnan(new[1]) and new[2] == np.float64(0.5 * (1.75 + 2.0)).astype(dtype)
    assert residual == 0.25 and not np.signbit(residual)
