"""Shared set-up of the pytest-benchmark suites (README: Benchmarks).

Environment: GRT_BENCH_PRESETS (comma-separated presets, default tiny-sdxl,tiny-sd3),
GRT_BENCH_DEVICE (default cuda when available), GRT_BENCH_DTYPE (float32 / bfloat16 / float16;
default float32 on the CPU, bfloat16 on CUDA), GRT_BENCH_BATCH (default 1).
"""
import pytest
import torch

from _common import BATCH, DEVICE, DTYPE


def benchmarks_enabled(config) -> bool:
    return not (config.getoption("benchmark_disable", False) and not config.getoption("benchmark_enable", False))


def pytest_configure(config):
    if not benchmarks_enabled(config):
        torch.set_num_threads(1)   # smoke runs in CI: one intra-op thread, as tests/conftest.py


@pytest.fixture(scope="session")
def bench_target():
    """Models and rotating inputs of the presets, built once per session."""
    from guidance_rt import bench, presets

    cache = {}

    def get(name):
        if name not in cache:
            target = bench.load_target(name, dtype=DTYPE, device=DEVICE)
            inputs = [presets.example_inputs(name, batch=BATCH, dtype=DTYPE, device=DEVICE, seed=k)
                      for k in range(3)]
            cache[name] = (target, inputs)
        return cache[name]

    return get
