"""guidance_rt.kernels: what every op shares (dispatch flags, interpreter rules), and the helpers
the per-op kernel tests import (device choice, poisoned runs, error checks).

The Triton kernels run here on CPU tensors in Triton's interpreter (`triton_on_cpu()`); on a
machine with CUDA the same tests run them on the GPU.
"""
from __future__ import annotations

import contextlib
import pathlib
import re

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed: the kernel tests need it "
                                              "(pip install triton; CPU runs use its interpreter)")

import guidance_rt.kernels as K  # noqa: E402
from guidance_rt.kernels import _common  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@contextlib.contextmanager
def triton_run():
    """Run the ops' Triton kernels (interpreted on CPU) with poisoned outputs and scratch."""
    ctx = contextlib.nullcontext() if CUDA else K.triton_on_cpu()
    with ctx, _common.poisoned_outputs():
        yield


def rel_err(out: torch.Tensor, ref: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Relative error per slice along `dim` (norm of the difference over the norm of ref)."""
    out, ref = out.double().movedim(dim, 0).flatten(1), ref.double().movedim(dim, 0).flatten(1)
    return (out - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-300)


def check(out: torch.Tensor, ref: torch.Tensor, lowp: torch.Tensor | None = None, dim: int = 0,
          fp32_tol: float = 1e-5, what: str = ""):
    """NaN and unwritten (poisoned) elements fail; fp32 must be far under 1e-3; fp16/bf16 at most
    twice the error of the same float64 reference computed in that precision (`lowp`), and
    never above 1e-2."""
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    assert torch.isfinite(out).all(), f"{what}: NaN/inf (unwritten or poisoned element read)"
    err = rel_err(out, ref, dim)
    if out.dtype in (torch.float32, torch.float64):
        assert (err < fp32_tol).all(), f"{what}: fp32 error {err.tolist()}"
    else:
        assert lowp is not None
        bound = (2 * rel_err(lowp, ref, dim)).clamp_min(2e-3)
        assert (err <= bound).all() and (err < 1e-2).all(), \
            f"{what}: {out.dtype} error {err.tolist()} > bound {bound.tolist()}"


def test_default_cpu_path_is_pytorch():
    """On CPU the ops run PyTorch unless asked; fake/functional tensors never take Triton."""
    x = torch.zeros(2)
    assert not _common.use_triton(x)
    if _common.INTERPRET:
        with K.triton_on_cpu():
            assert _common.use_triton(x)
            from torch._subclasses.fake_tensor import FakeTensorMode
            with FakeTensorMode() as mode:
                assert not _common.use_triton(mode.from_tensor(x))
        assert not _common.use_triton(x)


def test_kernels_use_no_triton_stdlib_jit_helpers():
    """The kernels must not call triton.language's own @jit helpers (tl.sum, tl.max, tl.zeros,
    tl.cdiv, ...): they are built JIT when Triton was imported before TRITON_INTERPRET was set,
    and an interpreted kernel cannot call them. Use _common.fsum / fmax and tl.full instead."""
    from triton.runtime.jit import JITFunction
    import triton.language as tl
    banned = sorted(n for n in dir(tl) if isinstance(getattr(tl, n), JITFunction))
    pattern = re.compile(r"\btl\.(%s)\(" % "|".join(banned))
    root = pathlib.Path(K.__file__).parent
    hits = [f"{p.name}:{i + 1}: {line.strip()}" for p in sorted(root.glob("*.py"))
            for i, line in enumerate(p.read_text().splitlines())
            if pattern.search(line) and not line.lstrip().startswith("#")]
    assert not hits, "\n".join(hits)


def test_top_level_kernels_import_does_not_redefine_the_ops():
    """From the repository root, `kernels/` is also importable as a top-level `kernels`, a name
    that belongs to the Hugging Face `kernels` package (transformers >= 5.25 depends on it and
    imports it). Imported so, it must be that package when it is installed, else a re-export of
    guidance_rt.kernels; either way it must not run the op definitions a second time:
    re-registering would free the operators that existing op handles point to, and later op calls
    crashed at random."""
    import importlib.metadata
    import subprocess
    import sys

    try:
        importlib.metadata.version("kernels")   # only the Hugging Face package has a distribution
        hub = True
    except importlib.metadata.PackageNotFoundError:
        hub = False
    root = pathlib.Path(__file__).resolve().parents[1]
    code = ("import sys, importlib, torch._library.custom_ops as c\n"
            "import guidance_rt.kernels as k\n"
            "before = dict(c.OPDEFS)\n"
            "top = importlib.import_module('kernels')\n"
            + ("assert hasattr(top, 'CUDAProperties') and not hasattr(top, 'gather_rows'), top.__file__\n" if hub else
               "assert top.gather_rows is k.gather_rows\n"
               "assert not [m for m in sys.modules if m.startswith('kernels.')], 'kernel modules imported twice'\n")
            + "assert all(c.OPDEFS[n] is before[n] for n in before if n.startswith('guidance_rt::')), 'ops redefined'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_interpreter_rejects_out_of_bounds_accesses():
    """The bounds checks conftest.py installs: a store one element past its tensor raises."""
    if CUDA:
        pytest.skip("the checks guard Triton's interpreter (CPU runs)")

    tl = _common.tl

    @_common.jit
    def store_n(x, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x + offs, 1.0, mask=offs < n)

    x = torch.zeros(6)
    store_n[(1,)](x, 6, BLOCK=8)
    assert torch.equal(x, torch.ones(6))
    with pytest.raises(Exception, match="out-of-bounds store in kernel store_n"):
        store_n[(1,)](x, 7, BLOCK=8)

