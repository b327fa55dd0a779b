"""What a result was measured with, written beside it: package versions, the commit (marked dirty
when the work tree differs from it), the threads, and the device, with clocks, power and memory
from nvidia-ml-py on CUDA when it is installed.
"""
from __future__ import annotations

import contextlib
import os
import platform
from typing import Any

import torch

from .rows import _short


def environment(device: str | torch.device | None = None) -> dict:
    """Versions, the commit measured, and the device (nvidia-ml-py data on CUDA when installed)."""
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env: dict[str, Any] = {
        "guidance_rt": version("guidance-rt"), "torch": torch.__version__,
        "diffusers": version("diffusers"), "transformers": version("transformers"),
        "triton": version("triton"), "python": platform.python_version(),
        "commit": _git_commit(), "threads": torch.get_num_threads(), "device_type": dev.type,
        "platform": platform.platform(),
    }
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        env["device"] = {"name": props.name, "memory_total_mib": props.total_memory / 2**20,
                         "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
        env["device"].update(nvml_info(idx))
    else:
        env["device"] = {"name": _cpu_name(), "cores": os.cpu_count()}
    return env


def nvml_info(index: int = 0) -> dict:
    """Clocks, power and memory from nvidia-ml-py (pynvml); {} when it is not installed."""
    try:
        import pynvml
    except ImportError:
        return {"nvml": "nvidia-ml-py not installed"}
    out: dict[str, Any] = {}
    try:
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)

        def get(key, f, *args, scale=1.0):
            try:
                v = f(h, *args)
                out[key] = v / scale if isinstance(v, (int, float)) else (v.decode() if isinstance(v, bytes) else v)
            except Exception:
                pass

        get("nvml_name", pynvml.nvmlDeviceGetName)
        get("driver", lambda _h: pynvml.nvmlSystemGetDriverVersion())
        get("sm_clock_mhz", pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_SM)
        get("sm_clock_max_mhz", pynvml.nvmlDeviceGetMaxClockInfo, pynvml.NVML_CLOCK_SM)
        get("mem_clock_mhz", pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_MEM)
        get("mem_clock_max_mhz", pynvml.nvmlDeviceGetMaxClockInfo, pynvml.NVML_CLOCK_MEM)
        get("power_w", pynvml.nvmlDeviceGetPowerUsage, scale=1000.0)
        get("power_limit_w", pynvml.nvmlDeviceGetEnforcedPowerLimit, scale=1000.0)
        get("temperature_c", pynvml.nvmlDeviceGetTemperature, pynvml.NVML_TEMPERATURE_GPU)
        try:
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.update(memory_used_mib=mem.used / 2**20, memory_total_mib_nvml=mem.total / 2**20)
        except Exception:
            pass
    except Exception as e:
        out["nvml"] = f"unavailable: {_short(e)}"
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return out


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "") if sha else None
    except Exception:
        return None
