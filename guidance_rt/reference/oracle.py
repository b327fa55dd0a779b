"""The sequential reference: one plain forward of the stock model per branch, then the combiner of
shared/methods.md section 1 in float64. NAG (section 5) adds no branch: it changes the attention
of every positive forward (cond and the perturbed branches), see nag.py. A term in CFG's place
with its own formula (APG, CFG-Zero*: CFG_PLACE) replaces ``u + w (c - u)`` in the combiner."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..families import model_family, resolve_layers
from .families import family_for
from ..guidance import Guidance
from ..methods import APG, CFG, NAG, PAG, SCFG, SEG, SLG, TPG, CFGZeroStar, Term
from .apg import apg_prediction
from .cfg_zero_star import cfg_zero_star_prediction, zero_init
from .nag import nag_forward, nag_setting
from .perturb import perturbed
from .scfg import scfg_recorded, scfg_step_rate, scfg_term   # S-CFG (methods.md 7)

# terms in CFG's place with their own formula: (term, u, c, w, state) -> the guided prediction
CFG_PLACE = {APG: apg_prediction, CFGZeroStar: cfg_zero_star_prediction}

KNOWN_TERMS = (CFG, SCFG, PAG, SEG, TPG, SLG, NAG, *CFG_PLACE)


@dataclass
class Branch:
    """One forward of a step: ``kind`` is "uncond", "cond" or the term's class name; ``index`` is
    the term's position in ``guidance.terms`` (None for uncond / cond); ``scale`` is w for
    uncond, 1 for cond and s_k for a perturbed branch."""

    kind: str
    index: int | None
    term: Term | None
    scale: float
    prediction: torch.Tensor | None = None
    maps: object = None      # S-CFG: the SCFGRecording of an uncond / cond forward


def _timestep_value(timestep) -> float:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.flatten()[0].item())
    return float(timestep)


def plan_branches(guidance: Guidance, timestep, step: int, num_steps: int) -> list[Branch]:
    """The branches of this step, in run order: uncond (iff CFG is active), cond, then one per
    perturbation term with a non-zero scale, in Guidance order. NAG adds no branch."""
    if not isinstance(guidance, Guidance):
        raise TypeError(f"guidance must be a guidance_rt.Guidance, got {type(guidance).__name__}")
    for term in guidance.terms:
        if type(term) not in KNOWN_TERMS:
            raise ValueError(f"reference.step does not implement {type(term).__name__}; it knows "
                             f"{', '.join(t.__name__ for t in KNOWN_TERMS)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < num_steps:
        raise ValueError(f"step must be an int in [0, {num_steps}), got {step!r}")

    branches = []
    cfg = guidance.cfg
    if cfg is not None:
        w = cfg.step_scale(step, num_steps)
        if w != 1.0:
            branches.append(Branch("uncond", guidance.terms.index(cfg), cfg, w))
    branches.append(Branch("cond", None, None, 1.0))
    t = _timestep_value(timestep)
    for index, term in enumerate(guidance.terms):
        if isinstance(term, (CFG, NAG)):   # SCFG is a CFG
            continue
        s = term.step_scale(step, num_steps, t)
        if s != 0.0:
            branches.append(Branch(type(term).__name__, index, term, s))
    return branches


def draw_tpg_seeds(branches: list[Branch], generator: torch.Generator | None) -> dict[int, int]:
    """One seed per active TPG term, in Guidance order, drawn before any forward."""
    seeds = {}
    for branch in branches:
        if branch.kind == "TPG":
            device = generator.device if generator is not None else "cpu"
            draw = torch.randint(0, 2**62, (1,), generator=generator, device=device)
            seeds[branch.index] = int(draw)
    return seeds


def _forward(model: nn.Module, sample, timestep, kwargs: dict) -> torch.Tensor:
    return model(sample, timestep=timestep, **kwargs, return_dict=False)[0]


def branch_predictions(model: nn.Module, guidance: Guidance, sample: torch.Tensor, timestep, *,
                       cond: dict, uncond: dict | None = None, negative: dict | None = None,
                       step: int, num_steps: int,
                       generator: torch.Generator | None = None) -> list[Branch]:
    """Run every branch of the step (one plain forward each); returns them with predictions.
    With NAG active, every positive forward (cond, perturbed) runs with NAG in its attention;
    the uncond forward stays plain."""
    family = model_family(model)  # clear error for unsupported models
    branches = plan_branches(guidance, timestep, step, num_steps)
    if branches[0].kind == "uncond" and uncond is None:
        raise ValueError("CFG is active in this step: the uncond kwargs are required")
    if cond is None:
        raise ValueError("cond kwargs are required")
    nag = nag_setting(guidance, family, step, num_steps)
    if nag is not None and negative is None:
        raise ValueError("NAG is active in this step: the negative prompt's kwargs are required "
                         "(negative=...)")

    def positive():
        if nag is None:
            return _forward(model, sample, timestep, cond)
        return nag_forward(model, nag, negative, sample, timestep, cond)

    seeds = draw_tpg_seeds(branches, generator)
    # S-CFG (UNet-only): record the uncond / cond forwards' attention maps when its uncond row exists
    scfg = scfg_term(guidance, model)
    scfg = scfg if branches[0].kind == "uncond" else None
    with torch.no_grad():
        for branch in branches:
            if branch.kind == "uncond":
                with scfg_recorded(model, scfg, sample) as branch.maps:
                    branch.prediction = _forward(model, sample, timestep, uncond)
            elif branch.kind == "cond":
                with scfg_recorded(model, scfg, sample) as branch.maps:
                    branch.prediction = positive()
            elif isinstance(branch.term, SLG) and branch.term.weights is not None:
                branch.prediction = _multi_skip(model, branch.term, sample, cond, positive)
            else:
                with perturbed(model, branch.term, sample=sample, kwargs=cond,
                               tpg_seed=seeds.get(branch.index)):
                    branch.prediction = positive()
    return branches


def _multi_skip(model, term: SLG, sample, cond, positive) -> torch.Tensor:
    """CSLG's weighted multi-skip: p = sum_l a_l p_l / sum_l a_l, p_l with only layer l skipped."""
    layers = resolve_layers(model, term.layers, "SLG", keep_order=True)   # weights follow the user's order
    if len(term.weights) != len(layers):
        raise ValueError(f"SLG.weights has {len(term.weights)} entries for {len(layers)} layers")
    total, p = sum(term.weights), 0.0
    for layer, a in zip(layers, term.weights):
        single = dataclasses.replace(term, layers=layer.path, weights=None)
        with perturbed(model, single, sample=sample, kwargs=cond):
            p = p + (a / total) * positive().double()
    return p


def combine(branches: list[Branch], rescale: float = 0.0, dtype: torch.dtype | None = None,
            rate: torch.Tensor | None = None, guide=None):
    """eps = u + w (c - u) + sum_k s_k (c - p_k)  (CFG on)  or  c + sum_k s_k (c - p_k), in
    float64; then guidance_rescale r (only with CFG): r * eps * std(c) / std(eps) + (1 - r) eps,
    std unbiased over every non-batch dim per sample. ``rate`` (S-CFG, (B, 1, H, W)): the CFG
    part becomes u + w rate (c - u). ``guide`` (APG, CFG-Zero*): a function (u, c, w) -> the
    CFG part."""
    by_kind = {b.kind: b for b in branches if b.kind in ("uncond", "cond")}
    c = by_kind["cond"].prediction.double()
    dtype = dtype or by_kind["cond"].prediction.dtype
    if "uncond" in by_kind:
        u = by_kind["uncond"].prediction.double()
        w = by_kind["uncond"].scale
        if guide is not None:
            eps = guide(u, c, w)
        else:
            eps = u + (w * (c - u) if rate is None else w * rate.double() * (c - u))
    else:
        eps = c.clone()
    for b in branches:
        if b.kind in ("uncond", "cond"):
            continue
        p = b.prediction.double()
        if isinstance(b.term, SLG) and b.term.form == "cslg":
            # CSLG: without CFG eps = p + s (c - p) (FLUX form); with CFG the SD3 form
            # u + w (c - u) + (s - 1)(c - p). Both add (s - 1)(c - p) to what came before.
            eps = eps + (b.scale - 1.0) * (c - p)
        else:
            eps = eps + b.scale * (c - p)
    if "uncond" in by_kind and rescale > 0:
        dims = list(range(1, c.ndim))
        std_c = c.std(dim=dims, keepdim=True)
        std_eps = eps.std(dim=dims, keepdim=True)
        eps = rescale * (eps * (std_c / std_eps)) + (1 - rescale) * eps
    return eps.to(dtype)


def step(model: nn.Module, guidance: Guidance, sample: torch.Tensor, timestep, *, cond: dict,
         uncond: dict | None = None, negative: dict | None = None, step: int, num_steps: int,
         generator: torch.Generator | None = None, state: dict | None = None) -> torch.Tensor:
    """The guided prediction of one sampling step, by one plain forward of the stock model per
    branch (uncond, cond, one per active perturbation term; NAG inside the positive ones, which
    needs ``negative``). The model is left exactly as it was, also when a forward raises.

    ``state``: the run's memory across steps (APG's momentum average). Pass the same dict to
    every step of one run, in order; step 0 empties it. None: a fresh one (no earlier steps)."""
    cfg = guidance.cfg
    if isinstance(cfg, CFGZeroStar) and zero_init(cfg, step):
        plan_branches(guidance, timestep, step, num_steps)     # the same checks of the arguments
        with torch.no_grad():   # zero, shaped as the model's prediction
            return torch.zeros_like(_forward(model, sample, timestep, cond))
    branches = branch_predictions(model, guidance, sample, timestep, cond=cond, uncond=uncond,
                                  negative=negative, step=step, num_steps=num_steps,
                                  generator=generator)
    if state is None:
        state = {}
    elif step == 0:
        state.clear()
    formula = CFG_PLACE.get(type(cfg))
    guide = None if formula is None else (lambda u, c, w: formula(cfg, u, c, w, state))
    rescale = cfg.rescale if cfg is not None else 0.0
    rate = scfg_step_rate(guidance, branches)     # S-CFG's rate map, None without it
    eps = combine(branches, rescale, dtype=sample.dtype, rate=rate, guide=guide)
    kinds = {b.kind: b for b in branches}
    if family_for(model).cfg_renorm and "uncond" in kinds:
        # |c| / |eps| per token over the last dim, in float64
        c, e = kinds["cond"].prediction.double(), eps.double()
        eps = (e * (c.norm(dim=-1, keepdim=True) / e.norm(dim=-1, keepdim=True))).to(eps.dtype)
    return eps
