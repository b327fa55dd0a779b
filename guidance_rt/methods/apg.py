"""APG: adaptive projected guidance (Sadat et al. 2024, "Eliminating Oversaturation and Artifacts
of High Guidance Scales in Diffusion Models"). Takes CFG's place.

With ``d = c - u``, in this order (norms and inner products over every non-batch axis, per sample):

1. momentum: ``avg = d + momentum * avg_prev`` (a running average over the steps of one run, 0
   before its first guided step), and d becomes avg;
2. clip: ``d = d * min(1, norm_threshold / |d|)`` (``norm_threshold`` 0: no clip);
3. projection on c: ``d_par = (<d, c> / <c, c>) c`` (0 where c = 0), ``d_orth = d - d_par``;
4. ``update = d_orth + eta * d_par``, then by ``formulation``:

   - ``"paper"`` (default, the paper's Algorithm 1): ``c + (w - 1) update``; diffusers'
     ``AdaptiveProjectedGuidance(guidance_scale=w - 1, use_original_formulation=True)``.
   - ``"diffusers"``: ``u + w update``; diffusers' ``AdaptiveProjectedGuidance(guidance_scale=w)``
     (its default, ``use_original_formulation=False``). The two agree only when update = d.

``scale`` 1 is off in both (no uncond row; diffusers' guider returns c there too). Steps 1-3 run
in float64 (diffusers projects in float64 and keeps d in the predictions' dtype).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import check_number
from .cfg import CFG

FORMULATIONS = ("paper", "diffusers")


@dataclass(frozen=True)
class APG(CFG):
    """Adaptive projected guidance: CFG's difference ``c - u`` averaged over steps with
    ``momentum`` (the paper uses negative values such as -0.5), clipped to L2 norm
    ``norm_threshold`` (0 = no clip) and split into its parts parallel and orthogonal to c, the
    parallel part weighted by ``eta``. ``formulation``: "paper" (``c + (w - 1) update``) or
    "diffusers" (``u + w update``). Takes CFG's place."""

    eta: float = 0.0
    norm_threshold: float = 15.0
    momentum: float = 0.0
    formulation: str = "paper"

    linear: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "eta", check_number("APG", "eta", self.eta))
        object.__setattr__(self, "norm_threshold", check_number("APG", "norm_threshold", self.norm_threshold, 0.0))
        # |momentum| > 1 makes the running average grow without bound
        object.__setattr__(self, "momentum", check_number("APG", "momentum", self.momentum, -1.0, 1.0))
        if self.formulation not in FORMULATIONS:
            raise ValueError(f"APG.formulation must be 'paper' or 'diffusers', got {self.formulation!r}")

    def guide(self, u, c, w, *, step: int, state: dict):
        import torch

        dims = tuple(range(1, c.dim()))
        # per-sample guidances: a sample whose w is 1 this step is off (its average stays, its
        # prediction is c), as it would be run alone
        on = torch.as_tensor(w != 1, device=c.device)
        c64 = c.double()
        d = c64 - u.double()
        previous = state.get("apg_average", 0.0)
        d = torch.where(on, d + self.momentum * previous, previous)
        state["apg_average"] = d
        if self.norm_threshold > 0:
            norm = torch.linalg.vector_norm(d, dim=dims, keepdim=True)
            d = d * torch.clamp(self.norm_threshold / norm, max=1.0)   # |d| = 0: inf -> 1
        cc = (c64 * c64).sum(dim=dims, keepdim=True)
        coefficient = (d * c64).sum(dim=dims, keepdim=True) / cc
        d_par = torch.where(cc > 0, coefficient, 0.0) * c64
        update = d - (1.0 - self.eta) * d_par
        if self.formulation == "paper":
            pred = c64 + (w - 1) * update
        else:
            pred = u.double() + w * update
        return torch.where(on, pred, c64).to(c.dtype)
