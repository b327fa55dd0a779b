"""The unfused, sequential reference oracle (shared/methods.md), independent of the runtime.

``step(model, guidance, sample, timestep, cond=..., uncond=..., step=i, num_steps=n,
generator=gen)`` runs one plain forward of the stock diffusers model per branch (uncond, cond,
one per active perturbation term), applying each perturbation through temporary hooks,
attention processors or forward wrappers that are removed afterwards, and combines the branches
in float64. NAG adds no branch: it acts inside the positive forwards' attention (nag.py).
``branch_predictions`` exposes the individual branches for tests. APG's momentum carries over
the steps of a run in ``step(..., state=d)``: one dict passed to every step of the run. What is
particular to a model family lives in its module under families/.
"""
from .apg import apg_prediction
from .attention import (NAGSetting, blur_grid, gaussian_taps, mean_queries, nag_combine,
                        seg_kernel_size)
from .cfg_zero_star import cfg_zero_star_prediction, zero_init
from .nag import nag_forward, nag_installed, nag_setting
from .oracle import Branch, branch_predictions, combine, draw_tpg_seeds, plan_branches, step
from .perturb import perturbed, tpg_permutation
from .scfg import SCFGRate, SCFGRecording, scfg_rate, scfg_rate_from_maps, scfg_recorded

__all__ = ["step", "branch_predictions", "plan_branches", "combine", "draw_tpg_seeds", "Branch",
           "apg_prediction", "cfg_zero_star_prediction", "zero_init",
           "perturbed", "tpg_permutation", "blur_grid", "gaussian_taps", "mean_queries",
           "seg_kernel_size", "NAGSetting", "nag_combine", "nag_forward", "nag_installed",
           "nag_setting",
           "SCFGRate", "SCFGRecording", "scfg_rate", "scfg_rate_from_maps", "scfg_recorded"]
