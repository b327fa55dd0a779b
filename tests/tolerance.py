"""Tolerances derived from the dtype and the size of what is compared, never a bare 1e-5.

Two computations of the same value that differ only in rounding (op order, batch shapes, another
CPU's SIMD width) differ by some units of the dtype's machine epsilon at the scale of the values
involved. Whole-model outputs pass through dozens of blocks, so their differences grow to
hundreds of units; one formula evaluated in float32 against float64 stays within a few.

A tolerance is only useful if a wrong result fails it: with `effect` (the change the tested
computation makes, e.g. a perturbed prediction minus the plain one), the tolerance must also be
under EFFECT_FRACTION of that change, so a perturbation wrong by 1% of its effect cannot pass.
"""
from __future__ import annotations

import torch

# units of eps at the compared scale
FORMULA_ULPS = 64        # a few arithmetic ops (the guidance formula, one attention)
MODEL_ULPS = 512         # whole tiny-model forwards (tens of blocks), fp32 op orders differ
EFFECT_FRACTION = 1e-2
F32_EPS = torch.finfo(torch.float32).eps
# a cosine or other quantity of size 1 computed from whole-model fp32 outputs two ways
MODEL_UNIT_TOL = MODEL_ULPS * F32_EPS


def eps(*tensors: torch.Tensor) -> float:
    """Machine epsilon of the least precise of the tensors' dtypes."""
    return max(torch.finfo(t.dtype).eps for t in tensors)


def tolerance(actual: torch.Tensor, expected: torch.Tensor, ulps: int, scale: float | None = None) -> float:
    """Absolute tolerance: `ulps` units of eps at `scale` (default: the largest |expected|)."""
    if scale is None:
        scale = expected.detach().double().abs().max().item()
    return ulps * eps(actual, expected) * max(scale, torch.finfo(torch.float32).tiny)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, ulps: int = FORMULA_ULPS,
                 scale: float | None = None, effect: torch.Tensor | float | None = None, what: str = ""):
    """max |actual - expected| within `ulps` units of eps at the compared scale; with `effect`, that
    tolerance is also checked to be under EFFECT_FRACTION of max |effect|, and the shapes match."""
    assert actual.shape == expected.shape, (what, tuple(actual.shape), tuple(expected.shape))
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    tol = tolerance(actual, expected, ulps, scale)
    err = (actual.detach().double() - expected.detach().double()).abs().max().item()
    assert err <= tol, f"{what}: max |difference| {err:.3g} > {tol:.3g} ({ulps} eps at the compared scale)"
    if effect is not None:
        size = effect.detach().double().abs().max().item() if isinstance(effect, torch.Tensor) else abs(effect)
        assert tol <= EFFECT_FRACTION * size, (
            f"{what}: tolerance {tol:.3g} is not under {EFFECT_FRACTION:g} of the effect {size:.3g}: "
            "the comparison could not tell a wrong result from a right one")
