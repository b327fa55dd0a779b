"""The guidance formula (methods.md section 1) over the packed rows of one step."""
from __future__ import annotations

import torch

from .plan import StepPlan


def rescale(eps: torch.Tensor, cond: torch.Tensor, r: float) -> torch.Tensor:
    """Lin et al. 2023: match eps's std to cond's per sample, blended by r."""
    dims = tuple(range(1, eps.dim()))
    ratio = cond.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True)
    return r * (eps * ratio) + (1 - r) * eps


def combine(out: torch.Tensor, plan: StepPlan, cfg_scale: float, scales: tuple[float, ...],
            cfg_rescale: float = 0.0) -> torch.Tensor:
    """eps = u + w (c - u) + sum_k s_k (c - p_k), or c + sum_k s_k (c - p_k) without an uncond
    row. `scales` follow plan.branches. Accumulates in fp32 at least."""
    acc = torch.promote_types(out.dtype, torch.float32)
    c = out[plan.cond_rows].to(acc)
    eps = c.clone()
    if plan.has_uncond:
        u = out[: plan.batch].to(acc)
        eps = u + cfg_scale * (c - u)
    for k, s in enumerate(scales):
        eps = eps + s * (c - out[plan.branch_rows(k)].to(acc))
    if plan.has_uncond and cfg_rescale > 0:
        eps = rescale(eps, c, cfg_rescale)
    return eps.to(out.dtype)
