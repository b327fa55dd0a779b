"""The guidance formula (methods.md section 1) over the packed rows of one step.

    eps = guide(u, c) + sum_k s_k (c - p_k)          (then CFG's rescale, if any)

`guide` is the formula of the term in CFG's place (methods.cfg.CFG.guide: ``u + w (c - u)``;
S-CFG multiplies w by a per-pixel map; APG and CFG-Zero* have their own); without an uncond row
it is c. The sum runs in the `guidance_combine` op, which fuses a linear `guide` too.
"""
from __future__ import annotations

import torch

from . import ops
from .plan import StepPlan


def rescale(eps: torch.Tensor, cond: torch.Tensor, r: float) -> torch.Tensor:
    """Lin et al. 2023: match eps's std to cond's per sample, blended by r."""
    dims = tuple(range(1, eps.dim()))
    ratio = cond.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True)
    return r * (eps * ratio) + (1 - r) * eps


def renorm_to_cond(eps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """eps rescaled per token to cond's norm over the last dim (QwenImagePipeline's true CFG:
    ``comb * |cond| / |comb|``; Adapter.cfg_renorm), in fp32 at least."""
    acc = torch.promote_types(eps.dtype, torch.float32)
    e, c = eps.to(acc), cond.to(acc)
    return (e * (torch.linalg.vector_norm(c, dim=-1, keepdim=True)
                 / torch.linalg.vector_norm(e, dim=-1, keepdim=True))).to(eps.dtype)


def per_sample(value, like: torch.Tensor):
    """A scale as the formula takes it: a number stays a number; a list (one value per sample)
    becomes a tensor that broadcasts against `like`'s samples."""
    if not isinstance(value, (list, tuple)):
        return value
    return torch.tensor(value, dtype=like.dtype, device=like.device).reshape(-1, *[1] * (like.dim() - 1))


def combine(out: torch.Tensor, plan: StepPlan, cfg, weights: torch.Tensor, w, *, step: int = 0,
            state: dict | None = None, rate=None) -> torch.Tensor:
    """The guided prediction. `cfg`: the term in CFG's place (None: none); `weights`:
    kernels.combine_weights of its weight w and the perturbation branches' scales (plan.branches
    order), on the device, as a step prepares them; `w` itself is read by a non-linear formula
    (a number; a per-sample list is taken from `weights`). `rate` (S-CFG): a function (u, c) ->
    per-pixel map multiplying w. Accumulates in fp32 at least."""
    rescale_by = cfg.rescale if cfg is not None and plan.has_uncond else 0.0
    if cfg is None or cfg.linear or not plan.has_uncond:
        rate_map = None
        if rate is not None and plan.has_uncond:
            rate_map = rate(out[: plan.batch].float(), out[plan.cond_rows].float())
        return ops.guidance_combine(out, weights, plan.batch, plan.has_uncond, rescale_by, rate_map)
    # a non-linear formula: written out here; the perturbation terms still go through the op
    acc = torch.promote_types(out.dtype, torch.float32)
    u, c = out[: plan.batch].to(acc), out[plan.cond_rows].to(acc)
    if isinstance(w, (list, tuple)):   # one weight per sample: column b of weights[0]
        w = weights[0].to(acc).reshape(-1, *[1] * (c.dim() - 1))
    guided = cfg.guide(u, c, w, step=step, state={} if state is None else state)
    eps = ops.guidance_combine(out[plan.batch:], weights, plan.batch, False, 0.0, None).to(acc) + (guided - c)
    if rescale_by > 0:
        eps = rescale(eps, c, rescale_by)
    return eps.to(out.dtype)
