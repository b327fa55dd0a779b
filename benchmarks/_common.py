"""Settings shared by the benchmark suites, from the environment (see conftest.py)."""
import os

import torch

DEVICE = torch.device(os.environ.get("GRT_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
DTYPE = getattr(torch, os.environ.get("GRT_BENCH_DTYPE") or ("bfloat16" if DEVICE.type == "cuda" else "float32"))
PRESETS = [p.strip() for p in os.environ.get("GRT_BENCH_PRESETS", "tiny-sdxl,tiny-sd3").split(",") if p.strip()]
BATCH = int(os.environ.get("GRT_BENCH_BATCH", "1"))


def synced(fn):
    """fn with a CUDA synchronize after it, so pytest-benchmark's wall clock sees the kernels."""
    if DEVICE.type != "cuda":
        return fn

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize(DEVICE)
        return out

    return run
