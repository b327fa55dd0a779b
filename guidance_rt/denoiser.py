"""GuidedDenoiser: one packed forward per step for every branch the guidance needs."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from . import kernels
from .combine import combine, renorm_to_cond
from .families import adapter_for
from .guidance import Guidance
from .methods import PerturbationTerm
from .plan import Permutations, StepPlan, build_plan


@dataclass(frozen=True)
class NagStep:
    """NAG's parameters in one step (methods.md section 5)."""

    phi: float
    tau: float
    alpha: float
    norm: int

Scale = float | list[float]   # one number, or one per sample (per-sample guidances)


def _collapse(values: list[float]) -> Scale:
    return values[0] if all(v == values[0] for v in values) else values


def _times(s: Scale, weight: float) -> Scale:
    return [v * weight for v in s] if isinstance(s, list) else s * weight


def check_per_sample(guidance) -> tuple[Guidance, ...]:
    """The Guidance, or the per-sample list of them, as a tuple; per-sample Guidances must share
    their structure (see Guidance.structure)."""
    items = tuple(guidance) if isinstance(guidance, (list, tuple)) else (guidance,)
    if not items:
        raise ValueError("guidance is an empty list: give a grt.Guidance or one per sample")
    for g in items:
        if not isinstance(g, Guidance):
            raise TypeError(f"guidance must be a grt.Guidance or a list of them, got {type(g).__name__}")
    first = items[0].structure()
    for k, g in enumerate(items[1:], 1):
        other = g.structure()
        if other != first:
            names = lambda st: [name for name, _ in st]
            if names(other) != names(first):
                why = f"terms {names(other)} instead of {names(first)}"
            else:
                j = next(j for j, (a, b) in enumerate(zip(first, other)) if a != b)
                diff = [f for (f, v), (_, u) in zip(first[j][1], other[j][1]) if v != u]
                why = f"{first[j][0]}.{', '.join(diff)} (term {j})"
            fields = sorted({f for t in items[0].terms for f in t.per_sample_fields})
            raise ValueError(f"per-sample Guidances can differ only in {', '.join(fields)} (and only where "
                             f"the term allows: NAG not at all); sample {k} differs from sample 0 in {why}")
    return items


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


class NonFiniteError(FloatingPointError, ValueError):
    """An input or the guided prediction holds NaN or Inf (a ValueError too, like other bad input)."""


class _FiniteCheck:
    """Finiteness of every floating input of a step and of its result, read with ONE device sync
    after the step (the flags are computed on the device as the step is queued)."""

    def __init__(self, given: dict, device: torch.device):
        self.names, flags = [], []
        for name, value in _floating(given):
            self.names.append(name)
            flags.append(torch.isfinite(value).all().to(device))
        self.flags = flags

    def verify(self, out: torch.Tensor, eps: torch.Tensor, plan: StepPlan, w, ordered, step: int):
        ok = torch.stack([*self.flags, torch.isfinite(eps).all()])
        if bool(ok.all()):
            return
        bad = [n for n, f in zip(self.names, ok.tolist()) if not f]
        if bad:
            raise NonFiniteError(f"{bad[0]} contains NaN or Inf values")
        raise NonFiniteError(f"step {step}: {_non_finite_cause(out, plan, w, ordered)}")


def _floating(value, name: str = ""):
    """(name, tensor) for every floating-point tensor in a nest of dicts, lists and tensors."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            yield name, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _floating(v, f"{name}[{k!r}]" if name else k)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _floating(v, f"{name}[{i}]")


def _non_finite_cause(out: torch.Tensor, plan: StepPlan, w, ordered) -> str:
    """Which branch or term made the guided prediction non-finite (called only when it is)."""
    rows = [("cond", plan.cond_rows)] + [(f"{type(t).__name__} (term {i}) branch", plan.branch_rows(k))
                                         for k, (i, t, _) in enumerate(ordered)]
    if plan.has_uncond:
        rows.insert(0, ("uncond", slice(0, plan.batch)))
    for name, r in rows:
        if not torch.isfinite(out[r]).all():
            return (f"the model's prediction for the {name} rows is not finite (NaN/Inf inside the "
                    f"forward; check the weights, the dtype and the conditioning)")
    acc = torch.promote_types(out.dtype, torch.float32)
    c = out[plan.cond_rows].to(acc)
    parts = []
    if plan.has_uncond:
        parts.append((f"CFG(scale={w})", "w (c - u)", w, out[: plan.batch].to(acc)))
    parts += [(f"{type(t).__name__} (term {i}, scale {s})", "s (c - p)", s, out[plan.branch_rows(k)].to(acc))
              for k, (i, t, s) in enumerate(ordered)]
    for name, formula, scale, other in parts:
        weight = torch.tensor(scale, dtype=acc).reshape(-1, *[1] * (c.dim() - 1))
        if not torch.isfinite(weight * (c - other)).all():
            return (f"{name} makes the guided prediction non-finite ({formula} overflows {out.dtype}); "
                    "use a smaller scale")
    return f"the sum of the guidance terms overflows {out.dtype}; use smaller scales"


class GuidedDenoiser:
    """Wraps a diffusers UNet2DConditionModel, SD3Transformer2DModel or FluxTransformer2DModel.

    ``den(sample, timestep, cond=..., uncond=..., step=i, num_steps=n, generator=g)`` runs the
    uncond, cond and every active perturbed row of step i in one forward and returns the guided
    prediction (methods.md section 1). The model is never modified.

    ``guidance`` may also be a list with one Guidance per sample of the batch, all with the same
    ``Guidance.structure()`` (they differ only in scales and step windows): one packed forward
    then serves them all, each sample combined with its own scales (comparison grids).

    ``state=``: one dict per run, passed to every step, holds the run's memory (APG's momentum),
    so one denoiser serves overlapping runs; without it the denoiser keeps one, restarted at step 0.
    """

    def __init__(self, model: nn.Module, guidance: Guidance | Sequence[Guidance], *,
                 check_inputs: bool = True):
        per_sample = check_per_sample(guidance)
        self.adapter = adapter_for(model)
        self.family = self.adapter.name
        self.model = model
        self.guidance = per_sample[0]           # the terms, layers and fields every sample shares
        self.per_sample = per_sample if isinstance(guidance, (list, tuple)) else None
        guidance = self.guidance
        self.check_inputs = check_inputs
        a = self.adapter
        self.layers_of = {i: a.resolve(model, a.layers, t.layers, type(t).__name__, t.layer_role, t.keep_layer_order)
                          for i, t in enumerate(guidance.terms) if isinstance(t, PerturbationTerm)}
        for i, t in enumerate(guidance.terms):
            t.check_model(self.layers_of.get(i, ()), type(self.adapter), f"{type(t).__name__} (term {i})",
                          type(model).__name__)
        self._plans: dict[tuple, list] = {}     # step configuration -> [plan, compiled step]
        self._compile: dict | None = None        # torch.compile's options once compile() is called
        self._state: dict = {}    # the CFG-place term's memory across the steps of a run (APG)
        self.last_rate: torch.Tensor | None = None   # S-CFG's rate map of the last step

    # ---------------------------------------------------------------- per step

    def branch_scales(self, step: int, num_steps: int, timestep) -> tuple[Scale, list[tuple[int, PerturbationTerm, Scale]]]:
        """CFG weight (1.0: no uncond row) and the active perturbation terms with their scales.
        With per-sample guidances a scale that differs between samples is a list, one per sample,
        and a term is active when it is for any sample."""
        guidances = self.per_sample or (self.guidance,)
        t_value = None
        if any(t.needs_timestep() for g in guidances for t in g.perturbations):
            t_value = float(torch.as_tensor(timestep).flatten()[0])
        w = _collapse([g.cfg.step_scale(step, num_steps) if g.cfg is not None else 1.0 for g in guidances])
        active = []
        for i, t in enumerate(self.guidance.terms):
            if isinstance(t, PerturbationTerm):
                scales = []
                for g in guidances:
                    term = g.terms[i]
                    scales.append(term.coefficient(term.step_scale(step, num_steps, t_value)))
                if any(s != 0 for s in scales):
                    active.append((i, t, _collapse(scales)))
        return w, active

    MAX_PLANS = 64   # distinct step configurations kept (a run has a handful)

    def plan(self, batch: int, has_uncond: bool, active, nag: bool = False, device=None) -> StepPlan:
        return self._entry(batch, has_uncond, active, nag, device)[0]

    def _entry(self, batch, has_uncond, active, nag, device) -> list:
        """[plan, its compiled step or None] of one step configuration, built on first use; the
        oldest is dropped beyond MAX_PLANS, its compiled step with it."""
        key = (batch, has_uncond, tuple(i for i, _, _ in active), nag, str(device))
        if key not in self._plans:
            if len(self._plans) >= self.MAX_PLANS:
                self._plans.pop(next(iter(self._plans)))
            plan = build_plan(self.layers_of, tuple((i, t) for i, t, _ in active), batch, has_uncond, nag,
                              device, len(self.adapter.layers))
            self.adapter.prepare(plan)
            self._plans[key] = [plan, None]
        return self._plans[key]

    def compile(self, **options) -> GuidedDenoiser:
        """Run every later step's packed forward and guidance formula (`packed_step`) compiled
        by ``torch.compile(**options)`` (e.g. ``mode="max-autotune"``, ``fullgraph=True``):
        one compilation per step configuration (plan), isolated from the others, so a run whose
        configuration changes (CFG's window closing, say) adds an entry instead of recompiling,
        and steps whose scales or timestep change reuse it. Input checks, scales and TPG's
        permutations stay on the host, outside the compiled function. Shapes are static by
        default (``dynamic=False``): a plan fixes the rows, and a new latent size compiles anew
        (dynamo's automatic dynamic shapes would otherwise make the next configuration's shapes
        symbolic, as the configurations share one function). Returns self."""
        options = {"dynamic": False, **options}
        if "isolate_recompiles" in inspect.signature(torch.compile).parameters:   # torch >= 2.13
            options["isolate_recompiles"] = options.get("isolate_recompiles", True)
        self._compile = options
        for entry in self._plans.values():
            entry[1] = None
        return self

    def __call__(self, sample: torch.Tensor, timestep, *, cond: dict, uncond: dict | None = None,
                 negative: dict | None = None, step: int, num_steps: int,
                 generator: torch.Generator | None = None, state: dict | None = None) -> torch.Tensor:
        if not isinstance(num_steps, int) or num_steps < 1 or not isinstance(step, int) or not 0 <= step < num_steps:
            raise ValueError(f"need 0 <= step < num_steps, got step={step!r}, num_steps={num_steps!r}")
        if not isinstance(cond, dict):
            raise TypeError("cond must be a dict of the model's forward keyword arguments")
        batch = sample.shape[0]
        if self.per_sample is not None and len(self.per_sample) != batch:
            raise ValueError(f"guidance has {len(self.per_sample)} per-sample Guidances but the sample "
                             f"batch is {batch}; give one Guidance per sample")
        unbatched = self.adapter.unbatched
        w, active = self.branch_scales(step, num_steps, timestep)
        has_uncond = any(v != 1.0 for v in (w if isinstance(w, list) else [w]))
        g = self.guidance
        nag = None
        if g.nag is not None and g.nag.step_scale(step, num_steps) != 1.0:
            nag = NagStep(g.nag.scale, g.nag.tau, g.nag.alpha_for(self.adapter.nag_alpha), g.nag.norm)
            if nag.alpha == 0.0:
                nag = None
        if nag is not None and negative is None:
            raise ValueError("NAG is active but negative is None: pass the NAG negative prompt's "
                             "forward arguments as negative=...")
        finite = None
        if self.check_inputs:
            given = {"sample": sample, "timestep": timestep, "cond": cond}
            if has_uncond:
                given["uncond"] = uncond
            if nag is not None:
                given["negative"] = negative
            finite = _FiniteCheck(given, sample.device)
            _check_batch(cond, batch, unbatched, "cond")
            if has_uncond:
                if uncond is None:
                    raise ValueError(f"CFG(scale={w}) is active at step {step} but uncond is None; pass the "
                                     "unconditional (negative prompt) forward arguments")
                _check_batch(uncond, batch, unbatched, "uncond")
            if nag is not None:
                _check_batch(negative, batch, unbatched, "negative")
        if g.cfg is not None and g.cfg.zero_prediction(step):   # no forward can change a zero
            return sample.new_zeros(self.adapter.output_shape(sample))
        device = sample.device
        plan, compiled = entry = self._entry(batch, has_uncond, active, nag is not None, device)
        if self._compile is not None and compiled is None:
            if device.type == "cuda":   # tracing only reads the kernels' self-check verdicts: make them now
                kernels.selfcheck.verify(device)
            compiled = entry[1] = torch.compile(self.packed_step, **self._compile)
        t = to_device(timestep if isinstance(timestep, torch.Tensor) else torch.as_tensor(timestep), device)
        if t.numel() not in (1, batch) and not (self.adapter.token_timesteps and t.dim() == 2 and t.shape[0] == batch):
            raise ValueError(f"timestep must be a scalar or have one value per sample ({batch}), got shape {tuple(t.shape)}")
        ordered = self._ordered(plan, active)
        weights = to_device(kernels.combine_weights(w, [s for _, _, s in ordered], "cpu"), device)
        if state is None:   # the run's memory (APG): the caller's (one dict per run), else ours
            if step == 0:
                self._state = {}
            state = self._state
        elif step == 0:
            state.clear()
        extras = g.cfg.step_extras(sample, batch) if g.cfg is not None and has_uncond else {}
        if has_uncond:
            uncond, cond = self.adapter.pair(uncond, cond)
        base = _merge(uncond, cond, "uncond/cond", unbatched) if has_uncond else cond
        out, eps, self.last_rate = (compiled or self.packed_step)(
            plan, sample, t, base, negative if nag else None, weights, self._permutations(plan, generator, sample),
            w=w, nag=nag, extras=extras, state=state, step=step, host=self.adapter.host_inputs(plan, cond))
        if finite is not None:
            finite.verify(out, eps, plan, w, ordered, step)
        return eps

    def packed_step(self, plan: StepPlan, sample: torch.Tensor, timestep: torch.Tensor, base: dict,
                    negative: dict | None, weights: torch.Tensor, perms: Permutations | None, *, w: Scale,
                    nag: NagStep | None, extras: dict, state: dict, step: int,
                    host: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One step's packed forward and guidance formula, a pure tensor function of what the
        host prepared (the plan, the base rows' arguments, the timestep, `weights` = [w, s_1, ...]
        on the device, TPG's permutations, the family's host_inputs): no Python decision on
        tensor values, no host sync, no host-to-device copy, so torch.compile captures it as one
        graph (`compile`). Returns every row's prediction, the guided prediction and S-CFG's
        rate map (or None)."""
        t = timestep.reshape(-1)
        t = t.expand(plan.base_rows) if t.numel() == 1 else t.repeat(plan.base_rows // plan.batch)
        cfg = self.guidance.cfg
        rates = []

        def rate(u, c):   # a per-pixel CFG scale (S-CFG), kept for inspection
            rates.append(cfg.weight_map(extras, u, c, w))
            return rates[0]

        with torch.no_grad():
            out = self.adapter.forward(plan, sample, t, base, perms, negative, nag, extras, **host)
            eps = combine(out, plan, cfg, weights, w, step=step, state=state,
                                   rate=rate if extras else None)
            if self.adapter.cfg_renorm and plan.has_uncond:
                eps = renorm_to_cond(eps, out[plan.cond_rows])
        return out, eps, rates[0] if rates else None

    @staticmethod
    def _ordered(plan: StepPlan, active):
        by_index = {i: s for i, _, s in active}
        return [(b.term_index, b.term, _times(by_index[b.term_index], b.weight)) for b in plan.branches]

    def _permutations(self, plan: StepPlan, generator, sample: torch.Tensor) -> Permutations | None:
        """TPG permutations: one seed per active TPG term per step from the user's generator, then
        one randperm per layer from seed + layer position (order-independent, reproducible),
        drawn on the host and copied to the device in one tensor."""
        if not plan.shuffled:
            return None
        seeds = {}
        for i in sorted(plan.shuffled):
            gen_device = generator.device if generator is not None else "cpu"
            seeds[i] = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device))
        parts, slots, offset = [], {}, 0
        for p, bp in sorted(plan.blocks.items()):
            if bp.shuffle:
                n = self.adapter.image_tokens(sample, p)
                groups = self.adapter.token_groups(sample, p)
                parts += [_grouped_randperm(n, groups, torch.Generator("cpu").manual_seed(seeds[term] + p))
                          for _, _, term in bp.shuffle]
                slots[p] = (offset, len(bp.shuffle), n)
                offset += len(bp.shuffle) * n
        return Permutations(to_device(torch.cat(parts), sample.device), slots)


def _grouped_randperm(n: int, groups: int, generator: torch.Generator) -> torch.Tensor:
    """A permutation of n tokens that keeps each of `groups` equal consecutive groups (video
    frames) in place: one randperm per group, in order, from one generator (groups == 1: exactly
    torch.randperm(n))."""
    if groups == 1:
        return torch.randperm(n, generator=generator)
    size = n // groups
    return torch.cat([torch.randperm(size, generator=generator) + g * size for g in range(groups)])


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a host sync: to CUDA through pinned memory,
    asynchronously (ordered before the step's kernels on the stream)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
