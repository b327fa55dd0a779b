"""CFG-Zero* (Fan et al. 2025, "CFG-Zero*: Improved Classifier-Free Guidance for Flow Matching
Models"). Takes CFG's place.

    s* = <c, u> / (|u|^2 + 1e-8)            per sample, over every non-batch axis
    pred = u s* + w (c - u s*)

and the prediction is zero in steps ``step < zero_init_steps`` (no forward runs). As diffusers'
``ClassifierFreeZeroStarGuidance(guidance_scale=w, zero_init_steps=n)`` (its default,
``use_original_formulation=False``; its original formulation ``c + g (c - u s*)`` is this with
w = g + 1): the 1e-8 of the authors' code and diffusers guards |u| = 0 (s* = 0 there), the zero
steps are counted from step 0 (the authors' ``i <= zero_steps`` is zero_init_steps =
zero_steps + 1) and apply whatever the scale and window. Computed in float64 (diffusers: in the
predictions' dtype, s* in float32).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .cfg import CFG

U_NORM_EPS = 1e-8   # added to |u|^2, as the authors' code and diffusers do


@dataclass(frozen=True)
class CFGZeroStar(CFG):
    """CFG-Zero*: CFG on u scaled by the optimal ``s* = <c, u> / |u|^2`` (per sample), and a
    zero prediction in the first ``zero_init_steps`` steps. Takes CFG's place."""

    zero_init_steps: int = 1

    spec_name: ClassVar[str] = "cfgzero"
    linear: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        n = self.zero_init_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"CFGZeroStar.zero_init_steps must be an integer >= 0, got {n!r}")

    def guide(self, u, c, w, *, step: int, state: dict):
        dims = tuple(range(1, c.dim()))
        u64, c64 = u.double(), c.double()
        s = (c64 * u64).sum(dim=dims, keepdim=True) / ((u64 * u64).sum(dim=dims, keepdim=True) + U_NORM_EPS)
        us = u64 * s
        return (us + w * (c64 - us)).to(c.dtype)

    def zero_prediction(self, step: int) -> bool:
        return step < self.zero_init_steps
