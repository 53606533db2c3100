"""The package's build facts and import-time checks.

With CUDA kernels, the architectures that build_info() reports are checked against the device code
really in the binary: the fatbin sections of _C are read back here (no CUDA tools needed; cuobjdump,
when on PATH, is asked as well). DVGS_FAST_EXPECT_CUDA_ARCHS="8.0;9.0" (set by .ci/cuda-build)
additionally demands a CUDA build of exactly those architectures."""
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest
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


# ------------------------------------------------------------------------------ device code read back
_FATBIN_MAGIC = 0xBA55ED50
_KIND_PTX, _KIND_ELF = 1, 2
_FLAG_ARCH_SPECIFIC, _FLAG_FAMILY_SPECIFIC = 0x100000, 0x1000000  # sm_90a, sm_100f


def _elf_sections(data: bytes) -> dict:
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not a little-endian ELF64 file"
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    heads = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = heads[shstrndx][4]
    out = {}
    for name_off, _type, _flags, _addr, offset, size, *_ in heads:
        start = names_at + name_off
        out[data[start:data.index(b"\0", start)].decode()] = (offset, size)
    return out


def _arch_name(sm: int, flags: int) -> str:
    suffix = "a" if flags & _FLAG_ARCH_SPECIFIC else "f" if flags & _FLAG_FAMILY_SPECIFIC else ""
    return f"{sm // 10}.{sm % 10}{suffix}"


def fatbin_arch_lists(so_path: str) -> list[list[str]]:
    """One sorted list per fatbin container of the shared library (one container per .cu file
    with device code), in TORCH_CUDA_ARCH_LIST notation: "9.0" for sm_90 machine code, "9.0+PTX"
    when PTX for compute_90 is embedded too."""
    data = open(so_path, "rb").read()
    sec = _elf_sections(data).get(".nv_fatbin")
    if sec is None:
        return []
    pos, end = sec[0], sec[0] + sec[1]
    lists = []
    while pos + 16 <= end:
        magic, _version, head_size, body_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != _FATBIN_MAGIC:  # containers are 8-byte aligned; skip padding
            pos += 8
            continue
        elf, ptx = set(), set()
        entry, stop = pos + head_size, pos + head_size + body_size
        while entry < stop:
            kind, _v, entry_head, payload = struct.unpack_from("<HHIQ", data, entry)
            sm = struct.unpack_from("<I", data, entry + 28)[0]
            flags = struct.unpack_from("<Q", data, entry + 40)[0]
            (elf if kind == _KIND_ELF else ptx).add(_arch_name(sm, flags))
            assert kind in (_KIND_ELF, _KIND_PTX), f"unknown fatbin entry kind {kind}"
            entry += entry_head + payload
        assert ptx <= elf, f"PTX without machine code for {sorted(ptx - elf)}"
        lists.append(sorted(a + "+PTX" if a in ptx else a for a in elf))
        pos = stop
    return lists


def _normalise(arch_list: str) -> list[str]:
    items = [a for a in re.split(r"[;\s]+", arch_list) if a]
    return sorted(a for a in items if a + "+PTX" not in items)


def test_reported_cuda_architectures_are_in_the_binary():
    info = dvgs_fast.build_info()
    expected = os.environ.get("DVGS_FAST_EXPECT_CUDA_ARCHS")
    if expected:
        assert info["with_cuda"], "DVGS_FAST_EXPECT_CUDA_ARCHS is set but dvgs_fast was built without CUDA"
        assert sorted(info["cuda_arch_list"]) == _normalise(expected)
    lists = fatbin_arch_lists(dvgs_fast._extension._C.__file__)
    if not info["with_cuda"]:
        assert lists == [], "a CPU-only build carries device code"
        return
    assert lists, "built with CUDA but _C holds no device code"
    for archs in lists:  # every kernel file, for exactly the reported architectures
        assert archs == sorted(info["cuda_arch_list"])


@pytest.mark.skipif(shutil.which("cuobjdump") is None, reason="cuobjdump not on PATH (the fatbin test reads it)")
def test_cuobjdump_agrees_with_the_fatbin_reader():
    so = dvgs_fast._extension._C.__file__
    info = dvgs_fast.build_info()
    found = set()
    for flag, kind in (("--list-elf", "sm"), ("--list-ptx", "compute")):
        out = subprocess.run(["cuobjdump", flag, so], capture_output=True, text=True).stdout
        found |= {(kind, m) for m in re.findall(r"\.(?:sm|compute)_(\d+[af]?)\.(?:cubin|ptx)", out)}
    want = set()
    for a in info["cuda_arch_list"]:
        base = a.removesuffix("+PTX").replace(".", "")
        want.add(("sm", base))
        if a.endswith("+PTX"):
            want.add(("compute", base))
    assert found == want


def test_every_op_with_a_cpu_kernel_has_a_cuda_kernel():
    if not dvgs_fast.build_info()["with_cuda"]:
        pytest.skip("dvgs_fast was built without CUDA kernels")
    ops = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("dvgs_fast::")]
    with_cpu = [n for n in ops if torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU")]
    assert with_cpu, "no dvgs_fast op has a CPU kernel"
    missing = [n for n in with_cpu if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
    assert not missing, f"ops without a CUDA kernel: {missing}"
