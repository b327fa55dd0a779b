"""The unfused, sequential reference oracle (shared/methods.md), independent of the runtime.

``step(model, guidance, sample, timestep, cond=..., uncond=..., step=i, num_steps=n,
generator=gen)`` runs one plain forward of the stock diffusers model per branch (uncond, cond,
one per active perturbation term), applying each perturbation through temporary hooks,
attention processors or forward wrappers that are removed afterwards, and combines the branches
in float64. ``branch_predictions`` exposes the individual branches for tests.
"""
from .attention import blur_grid, gaussian_taps, mean_queries, seg_kernel_size
from .oracle import Branch, branch_predictions, combine, draw_tpg_seeds, plan_branches, step
from .perturb import perturbed, tpg_permutation

__all__ = ["step", "branch_predictions", "plan_branches", "combine", "draw_tpg_seeds", "Branch",
           "perturbed", "tpg_permutation", "blur_grid", "gaussian_taps", "mean_queries",
           "seg_kernel_size"]
