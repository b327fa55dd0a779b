"""APG (adaptive projected guidance) for the reference oracle, written from Sadat et al. 2024,
"Eliminating Oversaturation and Artifacts of High Guidance Scales in Diffusion Models" (Algorithm 1,
and diffusers' ``normalized_guidance`` for the "diffusers" formulation). Nothing here is shared
with the packed runtime; float64, each sample's prediction flattened to one vector.

    D = c - u                                     the CFG update
    D = D + momentum * D_prev                     running average over the run's guided steps
    D = D * min(1, norm_threshold / |D|)          (norm_threshold 0: no clip)
    D_par = <D, c^> c^,  c^ = c / |c| (0 if c = 0);  D_orth = D - D_par
    update = D_orth + eta * D_par
    pred = c + (w - 1) update                     formulation "paper"
    pred = u + w update                           formulation "diffusers"
"""
from __future__ import annotations

import torch


def apg_prediction(term, u: torch.Tensor, c: torch.Tensor, w: float, state: dict) -> torch.Tensor:
    """APG's prediction for one guided step; ``state["apg_average"]`` carries the running average
    of D from one step of the run to the next."""
    shape = c.shape
    cv, uv = c.double().flatten(1), u.double().flatten(1)
    diff = cv - uv
    diff = diff + term.momentum * state.get("apg_average", torch.zeros_like(diff))
    state["apg_average"] = diff
    if term.norm_threshold > 0:
        length = diff.norm(dim=1, keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(length), term.norm_threshold / length)
    c_length = cv.norm(dim=1, keepdim=True)
    c_unit = torch.where(c_length > 0, cv / c_length, torch.zeros_like(cv))
    parallel = (diff * c_unit).sum(dim=1, keepdim=True) * c_unit
    orthogonal = diff - parallel
    update = orthogonal + term.eta * parallel
    if term.formulation == "paper":
        pred = cv + (w - 1) * update
    else:
        pred = uv + w * update
    return pred.reshape(shape)
