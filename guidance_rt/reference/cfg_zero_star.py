"""CFG-Zero* for the reference oracle, written from Fan et al. 2025, "CFG-Zero*: Improved
Classifier-Free Guidance for Flow Matching Models" (optimized scale, eq. 9-10; zero-init, 4.2) and
the authors' code (the 1e-8 in the scale's denominator). Nothing here is shared with the packed
runtime; float64, each sample's prediction flattened to one vector.

    s* = <v_c, v_u> / (|v_u|^2 + 1e-8)            per sample
    v = s* v_u + w (v_c - s* v_u)
    v = 0 in the first zero_init_steps steps (steps 0 .. zero_init_steps - 1)
"""
from __future__ import annotations

import torch


def cfg_zero_star_prediction(term, u: torch.Tensor, c: torch.Tensor, w: float, state: dict) -> torch.Tensor:
    """CFG-Zero*'s prediction for one guided step (no memory across steps: `state` is unused)."""
    cv, uv = c.double().flatten(1), u.double().flatten(1)
    s = (cv * uv).sum(dim=1, keepdim=True) / ((uv * uv).sum(dim=1, keepdim=True) + 1e-8)
    return (s * uv + w * (cv - s * uv)).reshape(c.shape)


def zero_init(term, step: int) -> bool:
    """Whether CFG-Zero* zeroes this step's prediction (counted from step 0)."""
    return step < term.zero_init_steps
