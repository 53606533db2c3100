"""CUDA code is never merged unparsed: every torch-free kernel file compiles with the
machine's nvcc (no GPU needed). The torch glue (.cu files that include torch) can only be
compiled where torch has CUDA; that is the device build (DVGS_FAST_CUDA=ON)."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
KERNELS = sorted((ROOT / "csrc" / "cuda" / "kernels").glob("*.cu"))
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


def test_every_cuda_op_has_torch_free_kernels():
    glue = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    assert glue, "no CUDA glue files found"
    for g in glue:
        assert (ROOT / "csrc" / "cuda" / "kernels" / f"{g.stem}_kernel.cu").exists(), g.name
    for k in KERNELS:
        text = k.read_text() + (k.with_suffix(".cuh").read_text() if k.with_suffix(".cuh").exists() else "")
        assert "#include <ATen" not in text and "#include <torch" not in text and "#include <c10" not in text, k.name


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on this machine")
@pytest.mark.parametrize("source", KERNELS, ids=lambda p: p.name)
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernel_compiles_with_nvcc(source, arch, tmp_path):
    cmd = [NVCC, "-std=c++20", "-c", f"-arch={arch}", "-Werror", "all-warnings", "-I", str(ROOT / "csrc"),
           str(source), "-o", str(tmp_path / "k.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"nvcc failed for {source.name}:\n{proc.stderr[-4000:]}"


GLUE = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


@pytest.mark.parametrize("glue", GLUE, ids=lambda p: p.name)
def test_glue_is_host_code(glue):
    # CMakeLists.txt compiles csrc/cuda/*.cu with the C++ compiler (nvcc would parse torch's headers
    # once per architecture); device code belongs in csrc/cuda/kernels/.
    text = glue.read_text()
    for token in ("__global__", "__device__", "__shared__", "<<<"):
        assert token not in text, f"{glue.name} holds device code ({token}): move it to csrc/cuda/kernels/"


@pytest.mark.parametrize("glue", GLUE, ids=lambda p: p.name)
def test_glue_needs_no_cuda_math_library_headers(glue):
    # <ATen/cuda/CUDAContext.h> pulls in cuBLAS/cuSPARSE/cuSOLVER headers, which a plain toolkit
    # lacks (only torch's nvidia-* wheels carry them); c10/cuda/CUDAStream.h gives the stream.
    assert "ATen/cuda/CUDAContext.h" not in glue.read_text()


@pytest.mark.parametrize("glue", GLUE, ids=lambda p: p.name)
def test_glue_validates_before_its_device_guard(glue):
    # The dispatcher picks the CUDA kernel when ANY argument is on a GPU; a CUDAGuard built from
    # a CPU tensor fails with "CUDAGuardImpl initialized with non-CUDA DeviceType" instead of the
    # ValueError that names the misplaced argument. So each kernel calls its check_* first.
    lines = glue.read_text().splitlines()
    guards = [i for i, line in enumerate(lines) if "CUDAGuard guard(" in line]
    for g in guards:
        start = max(i for i in range(g) if re.match(r"[A-Za-z]", lines[i]))  # the function's first line
        body = "\n".join(lines[start:g])
        assert re.search(r"\bcheck_\w+\(", body), f"{glue.name}:{g + 1}: device guard before the input checks"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_linear_ghost_stats_cpu_inputs_with_cuda_weight_is_a_value_error():
    import dvgs_fast  # noqa: F401
    if not dvgs_fast.build_info()["with_cuda"]:
        pytest.skip("dvgs_fast was built without CUDA kernels")
    a, d = torch.randn(4, 3), torch.randn(4, 2)
    w = torch.randn(2, 3, device="cuda")
    with pytest.raises(ValueError, match="target_weight is on cuda"):
        torch.ops.dvgs_fast.linear_ghost_stats(a, d, w, None)
