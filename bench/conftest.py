"""Benchmarks: `pytest bench -m "not slow"` is the quick subset (< 10 min on 2 cores);
`pytest bench` runs everything. Save results with --benchmark-json=RESULTS.json and turn them
into bench/REPORT.md with `python bench/report.py RESULTS.json`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long benchmark, excluded from the quick subset")
    config.addinivalue_line("markers", "gpu: needs CUDA kernels and a GPU")
