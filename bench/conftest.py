"""Benchmarks: `pytest bench -m "not slow"` is the quick subset (~45 min of wall time on the
shared 2-core machine, most of it geomloss's side of the Sinkhorn comparisons); `pytest bench`
runs everything (hours). Every benchmark times itself with bench/_timing.py. Save results with
--benchmark-json=RESULTS.json and turn them into bench/REPORT.md with
`python bench/report.py RESULTS.json`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long benchmark, excluded from the quick subset")
    config.addinivalue_line("markers", "gpu: needs CUDA kernels and a GPU")


def pytest_benchmark_update_machine_info(config, machine_info):
    """What a reader needs to weigh the figures: the vector ISA torch and our kernels use, the
    core count and how loaded the machine was when the session started."""
    import os

    import torch
    machine_info["torch_version"] = torch.__version__
    machine_info["torch_cpu_isa"] = torch.backends.cpu.get_cpu_capability()
    machine_info["logical_cores"] = os.cpu_count()
    try:
        machine_info["load_avg_at_start"] = list(os.getloadavg())
    except OSError:  # pragma: no cover - not Unix
        pass
