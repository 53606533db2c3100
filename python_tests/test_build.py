"""The package's build facts and import-time checks."""
import subprocess
import sys

import torch

import dvgs_fast


def test_build_info_fields():
    info = dvgs_fast.build_info()
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["with_cuda"], bool)
    if info["with_cuda"]:
        assert info["cuda_version"] and info["cuda_arch_list"]
    else:
        assert info["cuda_version"] is None and info["cuda_arch_list"] == []


def test_ops_registered():
    for name in ("per_sample_grad_stats", "per_sample_cosine", "linear_ghost_stats"):
        assert hasattr(torch.ops.dvgs_fast, name)


def test_extension_does_not_link_libtorch_python():
    so = dvgs_fast._extension._C.__file__
    out = subprocess.run(["ldd", so], capture_output=True, text=True).stdout
    assert "libtorch_python" not in out


def test_torch_version_mismatch_is_explained(tmp_path):
    # Simulate a build made for another torch: the import must fail with a rebuild hint,
    # before the shared library is loaded.
    code = (
        "import sys, types, torch\n"
        "fake = types.ModuleType('dvgs_fast._build_config')\n"
        "fake.TORCH_VERSION = '1.0.0'\n"
        "sys.modules['dvgs_fast._build_config'] = fake\n"
        "try:\n"
        "    import dvgs_fast\n"
        "except ImportError as e:\n"
        "    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert "built against torch 1.0.0" in out and "--no-build-isolation" in out
