"""The guidance formula (methods.md section 1) over the packed rows of one step."""
from __future__ import annotations

import torch

from .attention import kernels_for
from .plan import StepPlan
from .scfg import smooth3x3


def rescale(eps: torch.Tensor, cond: torch.Tensor, r: float) -> torch.Tensor:
    """Lin et al. 2023: match eps's std to cond's per sample, blended by r."""
    dims = tuple(range(1, eps.dim()))
    ratio = cond.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True)
    return r * (eps * ratio) + (1 - r) * eps


def per_sample(value, like: torch.Tensor):
    """A scale as combine() takes it: a number stays a number; a list (one value per sample)
    becomes a tensor that broadcasts against `like`'s samples."""
    if not isinstance(value, (list, tuple)):
        return value
    return torch.tensor(value, dtype=like.dtype, device=like.device).reshape(-1, *[1] * (like.dim() - 1))


def scfg_rate(u: torch.Tensor, c: torch.Tensor, region: torch.Tensor, foreground: torch.Tensor,
              scale, clamp: tuple[float, float], max_product: float) -> torch.Tensor:
    """S-CFG's rate map (B, 1, H, W) (methods.md section 7, step 5): every region's guidance norm
    brought to the foreground's mean norm. `scale`: w, or one w per sample."""
    n = (c - u).norm(dim=1, keepdim=True)
    dims = (2, 3)
    region_norm = (n * region).sum(dims) / (region.sum(dims) + 1e-8)          # (B, T)
    fore_norm = (n * foreground).sum(dims) / (foreground.sum(dims) + 1e-8)    # (B, 1)
    present = (region.sum(dims) > 0).to(n.dtype)
    rate_k = fore_norm * present / (region_norm + 1e-8)
    rate = (rate_k[:, :, None, None] * region).sum(1, keepdim=True)
    rate = rate.clamp(clamp[0], clamp[1])
    if isinstance(scale, (list, tuple)):
        w = per_sample(scale, rate)
        rate = torch.where(w > 0, torch.minimum(rate, max_product / torch.where(w > 0, w, 1.0)), rate)
    elif scale > 0:
        rate = rate.clamp(max=max_product / scale)
    return smooth3x3(rate)


def combine(out: torch.Tensor, plan: StepPlan, cfg_scale, scales: tuple,
            cfg_rescale: float = 0.0, rate=None) -> torch.Tensor:
    """eps = u + w (c - u) + sum_k s_k (c - p_k), or c + sum_k s_k (c - p_k) without an uncond
    row. `scales` follow plan.branches; w and each s_k are numbers or lists with one value per
    sample. `rate` (S-CFG): a per-pixel map multiplying w, or a function (u, c) -> that map.
    Accumulates in fp32 at least."""
    kern = kernels_for(out)
    if kern is not None:   # one pass over the predictions (rescale: one more reduction)
        rate_map = None
        if rate is not None and plan.has_uncond:
            rate_map = rate(out[: plan.batch].float(), out[plan.cond_rows].float())
        weights = kern.combine_weights(cfg_scale, scales, out.device)
        return kern.guidance_combine(out, weights, plan.batch, plan.has_uncond,
                                     cfg_rescale if plan.has_uncond else 0.0, rate_map)
    acc = torch.promote_types(out.dtype, torch.float32)
    c = out[plan.cond_rows].to(acc)
    eps = c.clone()
    if plan.has_uncond:
        u = out[: plan.batch].to(acc)
        weight = per_sample(cfg_scale, c)
        if rate is not None:
            weight = weight * rate(u, c)
        eps = u + weight * (c - u)
    for k, s in enumerate(scales):
        eps = eps + per_sample(s, c) * (c - out[plan.branch_rows(k)].to(acc))
    if plan.has_uncond and cfg_rescale > 0:
        eps = rescale(eps, c, cfg_rescale)
    return eps.to(out.dtype)
