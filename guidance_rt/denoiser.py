"""GuidedDenoiser: one packed forward per step for every branch the guidance needs."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .adapters import adapter_for
from .combine import combine, scfg_rate
from .layers import model_family, resolve_layers
from .plan import StepPlan, build_plan
from .scfg import SemanticMaps
from .terms import SCFG, SLG, Guidance, PerturbationTerm, TPG


@dataclass(frozen=True)
class NagStep:
    """NAG's parameters in one step (methods.md section 5)."""

    phi: float
    tau: float
    alpha: float
    norm: int

# forward arguments that are not batched per sample (shared by every row)
UNBATCHED = {"flux": ("txt_ids", "img_ids")}


def _check_batch(value, batch: int, unbatched: tuple[str, ...], where: str, name: str = ""):
    """Every batched tensor argument must have the sample's batch size."""
    if isinstance(value, torch.Tensor):
        if name in unbatched or value.dim() == 0:
            return
        if value.shape[0] != batch:
            raise ValueError(f"{where} has batch {value.shape[0]} but sample has batch {batch}")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_batch(v, batch, unbatched, f"{where}[{k!r}]", k)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_batch(v, batch, unbatched, f"{where}[{i}]", name)


def _merge(u, c, name: str, unbatched: tuple[str, ...]):
    """Stack the uncond and cond branches' forward arguments along the batch."""
    if isinstance(c, torch.Tensor):
        if name in unbatched or c.dim() == 0:
            if not isinstance(u, torch.Tensor) or u.shape != c.shape:
                raise ValueError(f"uncond[{name!r}] and cond[{name!r}] must have the same shape to be packed")
            return c
        if not isinstance(u, torch.Tensor) or u.shape[1:] != c.shape[1:]:
            raise ValueError(f"uncond[{name!r}] shape {getattr(u, 'shape', None)} does not match "
                             f"cond[{name!r}] shape {tuple(c.shape)}; both are packed into one batch")
        return torch.cat([u, c.to(u.dtype)])
    if isinstance(c, dict):
        if not isinstance(u, dict) or set(u) != set(c):
            raise ValueError(f"uncond and cond must give the same arguments (in {name!r})")
        return {k: _merge(u[k], c[k], k, unbatched) for k in c}
    if isinstance(c, (list, tuple)):
        return type(c)(_merge(a, b, name, unbatched) for a, b in zip(u, c))
    return c


class GuidedDenoiser:
    """Wraps a diffusers UNet2DConditionModel, SD3Transformer2DModel or FluxTransformer2DModel.

    ``den(sample, timestep, cond=..., uncond=..., step=i, num_steps=n, generator=g)`` runs the
    uncond, cond and every active perturbed row of step i in one forward and returns the guided
    prediction (methods.md section 1). The model is never modified.
    """

    def __init__(self, model: nn.Module, guidance: Guidance, *, check_inputs: bool = True):
        if not isinstance(guidance, Guidance):
            raise TypeError(f"guidance must be a grt.Guidance, got {type(guidance).__name__}")
        self.family = model_family(model)
        self.model = model
        self.guidance = guidance
        self.check_inputs = check_inputs
        if isinstance(guidance.cfg, SCFG) and self.family != "unet":
            raise NotImplementedError(f"SCFG (semantic-aware CFG) is supported on UNet models (SD1.5, SDXL) "
                                      f"only, not on {type(model).__name__}; use CFG")
        self.adapter = adapter_for(model)
        # weighted multi-skip pairs weights with layers in the order the user named them
        self.layers_of = {i: resolve_layers(model, t.layers, type(t).__name__,
                                            keep_order=isinstance(t, SLG) and t.weights is not None)
                          for i, t in enumerate(guidance.terms) if isinstance(t, PerturbationTerm)}
        for i, t in enumerate(guidance.terms):
            if isinstance(t, SLG) and t.weights is not None and len(t.weights) != len(self.layers_of[i]):
                raise ValueError(f"SLG.weights has {len(t.weights)} entries but its layers resolve to "
                                 f"{len(self.layers_of[i])} blocks ({', '.join(l.name for l in self.layers_of[i])})")
        self._plans: dict[tuple, StepPlan] = {}
        self.last_rate: torch.Tensor | None = None   # S-CFG's rate map of the last step

    # ---------------------------------------------------------------- per step

    def branch_scales(self, step: int, num_steps: int, timestep) -> tuple[float, list[tuple[int, PerturbationTerm, float]]]:
        """CFG weight (1.0: no uncond row) and the active perturbation terms with their scales."""
        g = self.guidance
        w = g.cfg.step_scale(step, num_steps) if g.cfg is not None else 1.0
        t_value = None
        if any(getattr(t, "adaptive_scale", 0) for t in g.perturbations):
            t_value = float(torch.as_tensor(timestep).flatten()[0])
        active = []
        for i, t in enumerate(g.terms):
            if isinstance(t, PerturbationTerm):
                s = t.step_scale(step, num_steps, t_value)
                if isinstance(t, SLG):
                    s = t.coefficient(s)
                if s != 0:
                    active.append((i, t, s))
        return w, active

    def plan(self, batch: int, has_uncond: bool, active, nag: bool = False) -> StepPlan:
        key = (batch, has_uncond, tuple(i for i, _, _ in active), nag)
        if key not in self._plans:
            self._plans[key] = build_plan(self.layers_of, tuple((i, t) for i, t, _ in active), batch,
                                          has_uncond, nag)
        return self._plans[key]

    def __call__(self, sample: torch.Tensor, timestep, *, cond: dict, uncond: dict | None = None,
                 negative: dict | None = None, step: int, num_steps: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        if not isinstance(num_steps, int) or num_steps < 1 or not isinstance(step, int) or not 0 <= step < num_steps:
            raise ValueError(f"need 0 <= step < num_steps, got step={step!r}, num_steps={num_steps!r}")
        if not isinstance(cond, dict):
            raise TypeError("cond must be a dict of the model's forward keyword arguments")
        batch = sample.shape[0]
        unbatched = UNBATCHED.get(self.family, ())
        w, active = self.branch_scales(step, num_steps, timestep)
        has_uncond = w != 1.0
        g = self.guidance
        nag = None
        if g.nag is not None and g.nag.step_scale(step, num_steps) != 1.0:
            nag = NagStep(g.nag.scale, g.nag.tau, g.nag.alpha_for(self.family), g.nag.norm)
            if nag.alpha == 0.0:
                nag = None
        if nag is not None and negative is None:
            raise ValueError("NAG is active but negative is None: pass the NAG negative prompt's "
                             "forward arguments as negative=...")
        if self.check_inputs:
            if not torch.isfinite(sample).all():
                raise ValueError("sample contains NaN or Inf values")
            _check_batch(cond, batch, unbatched, "cond")
            if has_uncond:
                if uncond is None:
                    raise ValueError(f"CFG(scale={w}) is active at step {step} but uncond is None; pass the "
                                     "unconditional (negative prompt) forward arguments")
                _check_batch(uncond, batch, unbatched, "uncond")
            if nag is not None:
                _check_batch(negative, batch, unbatched, "negative")
        plan = self.plan(batch, has_uncond, active, nag is not None)
        base = _merge(uncond, cond, "uncond/cond", unbatched) if has_uncond else cond
        groups = plan.base_rows // batch
        t = torch.as_tensor(timestep, device=sample.device)
        if t.numel() == 1:
            t = t.reshape(1).expand(plan.base_rows)
        elif t.numel() == batch:
            t = t.reshape(batch).repeat(groups)
        else:
            raise ValueError(f"timestep must be a scalar or have one value per sample ({batch}), got shape {tuple(t.shape)}")
        perms = self._permutations(plan, generator, sample.device)
        cfg = g.cfg
        extra = {}
        if isinstance(cfg, SCFG) and has_uncond:
            extra["maps"] = SemanticMaps(cfg.R, cfg.completion, tuple(sample.shape[-2:]), batch)
        self.last_rate = None
        with torch.no_grad():
            out = self.adapter.forward(plan, sample, t, base, perms, negative if nag else None, nag, **extra)
            rate = None
            if extra:
                region, foreground = extra["maps"].masks()

                def rate(u, c):   # S-CFG's per-pixel CFG scale, kept for inspection
                    self.last_rate = scfg_rate(u, c, region.to(u.dtype), foreground.to(u.dtype), w,
                                               cfg.clamp, cfg.max_product)
                    return self.last_rate
            return combine(out, plan, w, tuple(s for _, _, s in self._ordered(plan, active)),
                           cfg.rescale if cfg is not None else 0.0, rate)

    @staticmethod
    def _ordered(plan: StepPlan, active):
        by_index = {i: s for i, _, s in active}
        return [(b.term_index, b.term, by_index[b.term_index] * b.weight) for b in plan.branches]

    def _permutations(self, plan: StepPlan, generator, device):
        """TPG permutations: one seed per active TPG term per step from the user's generator, then
        one randperm per layer from seed + layer position (order-independent, reproducible)."""
        seeds = {}
        for i, t in enumerate(self.guidance.terms):
            if isinstance(t, TPG) and i in plan.tpg_positions:
                gen_device = generator.device if generator is not None else "cpu"
                seeds[i] = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device))
        cache = {}

        def perm(term_index: int, position: int, n_tokens: int, dev):
            key = (term_index, position, n_tokens)
            if key not in cache:
                g = torch.Generator("cpu").manual_seed(seeds[term_index] + position)
                cache[key] = torch.randperm(n_tokens, generator=g).to(dev)
            return cache[key]

        return perm
