"""Device parametrisation shared by the op tests: CUDA cases skip cleanly without a GPU."""
import pytest
import torch

import dvgs_fast

_CUDA_OK = torch.cuda.is_available() and dvgs_fast.build_info()["with_cuda"]

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not _CUDA_OK, reason="needs a GPU and dvgs_fast built with CUDA kernels (DVGS_FAST_CUDA=ON)")]),
]

# Tolerances against float64 references, by input dtype (accumulation is fp32 for low precision;
# inputs are rounded to their dtype *before* the reference sees them, so only accumulation differs).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}
