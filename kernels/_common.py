"""What every op of guidance_rt.kernels shares: whether Triton runs, and how kernels are built.

Each op is a `torch.library.triton_op` whose body picks one of two implementations:

- the Triton kernels, on CUDA tensors (and on CPU tensors inside `triton_on_cpu()`, where the
  kernels run in Triton's interpreter; that is how the CPU-only tests exercise the GPU code);
- a plain PyTorch composition, registered as its own opaque op `guidance_rt::<name>_torch`,
  everywhere else (CPU, or any device when Triton is not installed).

Because the body is traced by torch.compile (that is what `triton_op` buys: Inductor sees the
Triton kernels), the choice must depend only on things known while tracing: the device and the
flag, never tensor values. The PyTorch side is therefore its own opaque op: it may look at
values (row modes, say) and torch.compile still sees one node, not a graph break.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

try:
    import triton
    import triton.language as tl  # noqa: F401  (re-exported for the kernel files)

    HAS_TRITON = True
except ImportError:  # the package works without Triton: every op falls back to PyTorch
    triton = None
    tl = None
    HAS_TRITON = False

# A JIT kernel can never run on a machine without CUDA, so there the kernels are built for the
# interpreter whatever TRITON_INTERPRET says; with CUDA they follow TRITON_INTERPRET as usual.
# GUIDANCE_RT_TRITON_JIT=1 builds JIT kernels even without CUDA: they cannot be launched then,
# only compiled ahead of time for a GPU target (tests/test_kernels_aot.py checks they compile).
INTERPRET = HAS_TRITON and (triton.knobs.runtime.interpret or (
    not torch.cuda.is_available() and os.environ.get("GUIDANCE_RT_TRITON_JIT", "0") != "1"))


def define_op(name: str, *, mutates_args=()):
    """`torch.library.triton_op` (torch.compile sees the kernels it launches); without Triton, a
    plain custom op with the same schema, whose body then always calls the PyTorch op."""

    def decorate(fn):
        if HAS_TRITON:
            return torch.library.triton_op(name, fn, mutates_args=mutates_args)
        op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        op.register_fake(fn)      # as triton_op does: the body calls only ops with fake kernels
        return op

    return decorate


def jit(fn):
    """`triton.jit`, built for the interpreter where no CUDA device exists (see INTERPRET)."""
    if INTERPRET and not triton.knobs.runtime.interpret:
        with triton.knobs.runtime.scope():
            triton.knobs.runtime.interpret = True
            return triton.jit(fn)
    return triton.jit(fn)


_state = threading.local()


@contextlib.contextmanager
def triton_on_cpu(enabled: bool = True):
    """Run the Triton kernels on CPU tensors (in Triton's interpreter) inside this block.

    Off by default: on CPU every op runs its PyTorch implementation. The environment variable
    GUIDANCE_RT_TRITON_CPU=1 turns it on for a whole process."""
    if enabled and not HAS_TRITON:
        raise RuntimeError("Triton is not installed: the ops run their PyTorch implementation")
    if enabled and not INTERPRET:
        raise RuntimeError("Triton kernels can run on CPU tensors only in Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before guidance_rt.kernels is imported")
    previous = getattr(_state, "cpu", None)
    _state.cpu = enabled
    try:
        yield
    finally:
        _state.cpu = previous


# read once: op calls are the hot path, and the variable is meant for a whole process
_ENV_CPU = INTERPRET and os.environ.get("GUIDANCE_RT_TRITON_CPU", "0") == "1"


def _cpu_flag() -> bool:
    flag = getattr(_state, "cpu", None)
    return _ENV_CPU if flag is None else flag


def use_triton(t: torch.Tensor) -> bool:
    """Whether the op body launches Triton kernels for tensor `t`.

    CUDA tensors (real or fake, so torch.compile traces the kernels): yes. CPU tensors: only
    plain eager tensors inside `triton_on_cpu()`; fake and functional CPU tensors (opcheck,
    torch.compile) take the PyTorch op, as the interpreter cannot run on them."""
    if not HAS_TRITON:
        return False
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and type(t) is torch.Tensor and _cpu_flag()


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def interp_bf16(dtype: torch.dtype) -> bool:
    """The kernels' INTERP_BF16 flag: bf16 under Triton 3.9's interpreter, which gets two things
    wrong that a GPU gets right. (1) tl.dot of bf16 operands returns garbage: the kernels cast
    them to fp32 first (products of bf16 values are exact in fp32, as on the tensor cores).
    (2) fp32 -> bf16 casts truncate instead of rounding to nearest even: the kernels round with
    `rne_bf16` first. Never set on a GPU, where the plain code path runs."""
    return INTERPRET and dtype == torch.bfloat16


# The kernels call only Triton builtins and the two reductions below, never triton.language's
# own @jit helpers (tl.sum, tl.max, tl.zeros, tl.cdiv, ...). Those are built once, when Triton is
# imported, as JIT or as interpreted functions; the rest of the process (diffusers, torch._dynamo)
# imports Triton long before this package, usually without TRITON_INTERPRET, and an interpreted
# kernel cannot call a JIT helper. tl.reduce with the standard combine functions is exactly what
# tl.sum / tl.max compile to on a GPU, and the interpreter recognises them (numpy fast path).
if HAS_TRITON:

    @jit
    def fsum(x, axis: tl.constexpr):
        return tl.reduce(x, axis, tl.standard._sum_combine)

    @jit
    def fmax(x, axis: tl.constexpr):
        return tl.reduce(x, axis, tl.standard._elementwise_max)

    @jit
    def rne_bf16(x):
        """fp32 x rounded to the nearest bf16 value (ties to even), still as fp32."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @jit
    def to_out(x, DTYPE: tl.constexpr, INTERP_BF16: tl.constexpr):
        """fp32 x cast to the output dtype (see interp_bf16 for INTERP_BF16)."""
        if INTERP_BF16:
            x = rne_bf16(x)
        return x.to(DTYPE)


# Tests poison what the Triton launchers allocate (outputs and scratch), so an element a kernel
# forgot to write, or a scratch slot it read before writing, shows up as NaN.
_poison = threading.local()


@contextlib.contextmanager
def poisoned_outputs():
    previous = getattr(_poison, "on", False)
    _poison.on = True
    try:
        yield
    finally:
        _poison.on = previous


def poison_(t: torch.Tensor) -> torch.Tensor:
    if getattr(_poison, "on", False) and type(t) is torch.Tensor:
        t.fill_(float("nan") if t.is_floating_point() else -(2 ** 30))
    return t
