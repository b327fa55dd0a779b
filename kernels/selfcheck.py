"""Kernels check themselves: the first time an op's Triton kernels would run on a device, they
are compared with the op's PyTorch implementation first.

Each op file registers a check case with `@case(op)`: a function of (dtype, device) returning
one or more argument tuples of the op (small random inputs of odd sizes, a tile or two of the
kernels on that device; CPU tensors). The check calls the op on device copies with its kernels
forced on (outputs and scratch poisoned with NaN first), and the op's `guidance_rt::<op>_torch`
on the CPU originals, in float32 and bfloat16 (float16 on GPUs without native bf16). It passes
when every output is finite and within ULPS[dtype] units of the dtype's epsilon of the largest
reference magnitude.

`use_triton(t, op)` (kernels/_common.py) asks `kernel_ok(op, t)` once its device rule allows the
kernels. The verdict is kept per (op, device) for the process and on disk, keyed by op, device
name ("cpu-interpreter" for Triton's interpreter), torch and Triton versions and a hash of the
sources the kernels are built from, so a changed kernel is checked again. A failed check sends
the op to its PyTorch implementation on that device for the process, with one
KernelSelfCheckWarning.

The check runs only on plain eager tensors: under torch.compile (fake and functional tensors),
a dispatch mode or CUDA graph capture, the op takes the verdict already made in this process or
on disk, and otherwise its kernels (not remembered, so a later eager call still checks). Call
`verify(device)` before compiling or capturing to decide for every op eagerly.

GUIDANCE_RT_KERNEL_SELFCHECK=0 skips the check: the kernels run (it is read where an op has no
verdict yet). The disk cache is $GUIDANCE_RT_CACHE/kernel_selfcheck.json, by default in
~/.cache/guidance_rt.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import pathlib
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._common import INTERPRET, poisoned_outputs, triton, triton_on_cpu

SKIP_ENV = "GUIDANCE_RT_KERNEL_SELFCHECK"
CACHE_ENV = "GUIDANCE_RT_CACHE"
# Allowed max |kernel - PyTorch| in units of the dtype's epsilon at the largest |reference|.
# fp32: the two sides differ in accumulation order and exp2 vs exp (a few ulps in the
# interpreter); a wrong kernel is off by far more than 256 ulps (3e-5). 16-bit: both round to
# the dtype, at different points (P before P @ V, NAG's Zp and Zn before a blend that amplifies
# by 2 phi - 1); under 1 ulp in the interpreter.
ULPS = {torch.float32: 256, torch.bfloat16: 16, torch.float16: 16}
# Besides its own file, every kernel is built from these; the check itself is part of the verdict.
SHARED_SOURCES = ("_common.py", "_flash.py", "selfcheck.py")


class KernelSelfCheckWarning(RuntimeWarning):
    """An op's Triton kernels failed their self-check on a device: the op runs PyTorch there."""


@dataclass(frozen=True)
class Case:
    op: str
    inputs: Callable[[torch.dtype, torch.device], list]
    source: str                     # the op's file: part of the cache key


@dataclass(frozen=True)
class Verdict:
    ok: bool
    detail: str = ""                # what failed, for the warning
    cached: bool = True             # written to disk: not for exceptions, which may be transient


CASES: dict[str, Case] = {}


def case(op: str):
    """Register `fn(dtype, device) -> [args, ...]` as op's check case: argument tuples of
    `torch.ops.guidance_rt.<op>` as CPU tensors, sized for the kernels' tiles on `device`."""

    def register(fn):
        CASES[op] = Case(op, fn, sys.modules[fn.__module__].__file__)
        return fn

    return register


def head_dim(dtype: torch.dtype) -> int:
    """The attention cases' head dim: 64 in 16 bits (the tiles SDXL and SD3 run), 40 in fp32 (not
    a power of two: the masked loads SD 1.5's heads take). Both, at no extra compile."""
    return 40 if dtype == torch.float32 else 64


def heads(g: torch.Generator, rows: int, n: int, n_heads: int, d: int, dtype) -> torch.Tensor:
    """Random (rows, heads, n, d) as the runtime passes them: a view of (rows, n, heads, d)."""
    return torch.randn(rows, n, n_heads, d, generator=g).to(dtype).transpose(1, 2)


# ---------------------------------------------------------------- verdicts

_lock = threading.Lock()            # one check at a time; other threads wait for its verdict
_local = threading.local()          # the op whose check is running in this thread
_by_key: dict[str, Verdict] = {}    # every verdict this process made or read, by cache key
_by_device: dict[tuple, bool] = {}  # (op, torch.device) -> ok: the per-call lookup


def kernel_ok(op: str, t: torch.Tensor) -> bool:
    """Whether op's kernels may serve tensor t, whose device the kernels support."""
    ok = _by_device.get((op, t.device))
    if ok is None:
        ok = getattr(_local, "op", None) == op or _decide(op, t)
    return ok


def forget() -> None:
    """Drop this process's verdicts (the disk cache stays): each op decides again on next use."""
    with _lock:
        _by_key.clear()
        _by_device.clear()


def verify(device) -> dict[str, bool]:
    """Check every op's kernels on `device` now, eagerly (results: op -> kernels used). Call it
    before torch.compile or CUDA graph capture, which only read verdicts already made."""
    device = torch.device(device)
    with triton_on_cpu() if device.type == "cpu" else contextlib.nullcontext():
        probe = torch.empty(0, device=device)
        return {op: kernel_ok(op, probe) for op in CASES}


def cache_path() -> pathlib.Path:
    root = os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "guidance_rt"
    return pathlib.Path(root) / "kernel_selfcheck.json"


def _decide(op: str, t: torch.Tensor) -> bool:
    if op not in CASES:
        raise LookupError(f"guidance_rt::{op} has no self-check case: register one with "
                          f"kernels.selfcheck.case({op!r}) in its op file")
    if os.environ.get(SKIP_ENV, "1") == "0":
        return True     # not remembered: read again until a verdict exists
    if t.device.type == "cuda" and not torch.cuda.is_available():
        return True     # fake CUDA tensors traced ahead of time (_aot.py): no device to check
    key = cache_key(op, t.device)
    with _lock:
        if key not in _by_key:
            verdict = _read(key)
            if verdict is None:
                if not _eager(t):
                    return True
                verdict = _check(CASES[op], t.device)
                if verdict.cached:
                    _write(key, verdict)
            _by_key[key] = verdict
            if not verdict.ok:
                warnings.warn(_message(op, t.device, verdict), KernelSelfCheckWarning)
        ok = _by_device[(op, t.device)] = _by_key[key].ok
    return ok


def _eager(t: torch.Tensor) -> bool:
    """A plain tensor outside tracing, dispatch modes and graph capture: the check may run."""
    return (type(t) is torch.Tensor and _get_current_dispatch_mode() is None
            and not (t.is_cuda and torch.cuda.is_current_stream_capturing()))


def _device_name(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu-interpreter"
    name = torch.cuda.get_device_name(device)
    return f"{name} (interpreter)" if INTERPRET else name


@functools.cache
def _source_hash(path: str) -> str:
    h = hashlib.sha256()
    for p in (pathlib.Path(path), *(pathlib.Path(__file__).with_name(s) for s in SHARED_SOURCES)):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def cache_key(op: str, device: torch.device) -> str:
    return (f"{op} | {_device_name(device)} | torch {torch.__version__} | "
            f"triton {triton.__version__} | {_source_hash(CASES[op].source)}")


def _message(op: str, device: torch.device, verdict: Verdict) -> str:
    where = (f" The result is cached in {cache_path()} (delete it to check again)."
             if verdict.cached else "")
    return (f"guidance_rt::{op}: its Triton kernels failed their self-check against its PyTorch "
            f"implementation on {_device_name(device)} ({verdict.detail}), so {op} runs PyTorch "
            f"on this device for the rest of this process.{where} Please report this to the "
            f"guidance-rt maintainers with this message (torch {torch.__version__}, Triton "
            f"{triton.__version__}). {SKIP_ENV}=0 skips the check and runs the kernels.")


# ---------------------------------------------------------------- the check


@contextlib.contextmanager
def _forced(op: str):
    """The op's own calls inside its check run its kernels."""
    _local.op = op
    try:
        yield
    finally:
        _local.op = None


def _check(c: Case, device: torch.device) -> Verdict:
    kernels = getattr(torch.ops.guidance_rt, c.op)
    reference = getattr(torch.ops.guidance_rt, c.op + "_torch")
    try:
        # poisoned: an element the kernels forget to write is NaN, never a lucky leftover
        with _forced(c.op), poisoned_outputs(), torch.no_grad():
            for dtype in _dtypes(device):
                for args in c.inputs(dtype, device):
                    moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
                    err, tol = _error(kernels(*moved).cpu(), reference(*args), dtype)
                    if not err <= tol:      # NaN fails too
                        return Verdict(False, f"{dtype}: max |error| {err:.3g} > tolerance {tol:.3g}")
    except Exception as e:      # a kernel that fails to build or launch on this device
        return Verdict(False, f"{type(e).__name__}: {e}", cached=False)
    return Verdict(True)


def _dtypes(device: torch.device) -> tuple:
    """fp32 and the device's native 16-bit float: bf16, or fp16 before sm_80 (where a bf16
    kernel may not even build, which must not cost the op its fp16 kernels)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return torch.float32, torch.float16
    return torch.float32, torch.bfloat16


def _error(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """(max |out - ref|, the tolerance at ref's largest magnitude)."""
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return math.inf, 0.0
    err = (out.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    return err, ULPS[dtype] * torch.finfo(dtype).eps * max(scale, torch.finfo(torch.float32).tiny)


# ---------------------------------------------------------------- disk cache


def _load() -> dict:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):       # missing, unreadable or corrupt: nothing cached
        return {}
    return data if isinstance(data, dict) else {}


def _read(key: str) -> Verdict | None:
    entry = _load().get(key)
    if isinstance(entry, dict) and isinstance(entry.get("ok"), bool):
        return Verdict(entry["ok"], str(entry.get("detail", "")))
    return None


def _write(key: str, verdict: Verdict) -> None:
    """Merge the verdict into the cache file through an atomic rename (a reader never sees half a
    file). Any failure leaves the verdict in memory only: the next process checks again."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _load()
        entries[key] = {"ok": verdict.ok, "detail": verdict.detail}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    except OSError:
        pass
