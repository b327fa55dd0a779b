"""The unfused, sequential reference oracle (shared/methods.md), independent of the runtime.

``step(model, guidance, sample, timestep, cond=..., uncond=..., step=i, num_steps=n,
generator=gen)`` runs one plain forward of the stock diffusers model per branch (uncond, cond,
one per active perturbation term), applying each perturbation through temporary hooks,
attention processors or forward wrappers that are removed afterwards, and combines the branches
in float64. NAG adds no branch: it acts inside the positive forwards' attention (nag.py).
``branch_predictions`` exposes the individual branches for tests. What is particular to a model
family lives in its module under families/.
"""
from .attention import (NAGSetting, blur_grid, gaussian_taps, mean_queries, nag_combine,
                        seg_kernel_size)
from .oracle import Branch, branch_predictions, combine, draw_tpg_seeds, plan_branches, step
from .nag import nag_forward, nag_installed, nag_setting
from .perturb import perturbed, tpg_permutation
from .scfg import SCFGRate, SCFGRecording, scfg_rate, scfg_rate_from_maps, scfg_recorded

__all__ = ["step", "branch_predictions", "plan_branches", "combine", "draw_tpg_seeds", "Branch",
           "perturbed", "tpg_permutation", "blur_grid", "gaussian_taps", "mean_queries",
           "seg_kernel_size", "NAGSetting", "nag_combine", "nag_forward", "nag_installed",
           "nag_setting",
           "SCFGRate", "SCFGRecording", "scfg_rate", "scfg_rate_from_maps", "scfg_recorded"]
