"""A prepared row's first call, before it is timed: its output against the reference (a crash, a
non-finite or a no-op output fails the row, a different one marks it DIFFERS), then its peak
memory and warm-up, so that only implementations that do the job are timed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from .memory import peak_memory
from .rows import _fail, _short
from .targets import Prepared
from .timing import time_calls

if TYPE_CHECKING:
    from .runner import Options


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.double() - b.double()).norm()
    n = b.double().norm()
    return float(d / n) if n > 0 else float(d)


def _tolerance(dtype) -> float:
    return 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2


def _check(row, prepared: Prepared, impl, inputs, ref, ref_base, o: Options, device, warmup,
           tol) -> Callable | None:
    """Run once and compare with the reference (a crash, a non-finite or a no-op result makes the
    row MISSING, a different one DIFFERS), measure peak memory, warm up. Returns the function to
    time, or None."""
    try:
        with prepared.active():
            with torch.no_grad():
                out = prepared.fn(inputs[0])
            if not torch.isfinite(out).all():
                _fail(row, "non-finite output")
                return None
            if isinstance(ref, torch.Tensor):
                rel = _rel(out, ref)
                row["rel_vs_reference"] = rel
                effect = _rel(ref, ref_base) if isinstance(ref_base, torch.Tensor) else None
                if (impl != "reference" and effect is not None and effect > 2 * tol
                        and _rel(out, ref_base) < 0.1 * effect):
                    _fail(row, f"applies nothing: equals the CFG-only prediction (rel "
                               f"{_rel(out, ref_base):.1e}) where the reference moves it by {effect:.1e}")
                    return None
                if rel > tol:
                    row.update(status="differs", reason=f"differs from the reference by {rel:.1e} (relative)")
            elif impl != "reference":
                row["reason"] = f"reference unavailable ({ref})"
            del out
            peak, method = peak_memory(prepared.fn, inputs[0], device)
            row.update(peak_memory_mib=None if peak is None else peak / 2**20, memory_method=method)
            fn = torch.compile(prepared.fn) if o.compile else prepared.fn
            time_calls(fn, inputs, warmup=warmup, repeats=0, device=device)
            return fn
    except Exception as e:
        _fail(row, f"crashed: {_short(e)}")
        return None
