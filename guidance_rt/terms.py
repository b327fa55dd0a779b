"""Guidance terms: validated, immutable configurations (shared/methods.md sections 1-4, 6).

A term only says *what* to compute. Which rows exist in a step, where they fork and what each
layer does to them is the plan's job (plan.py); the adapters execute it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

LayerSpec = Any  # str | int | Sequence[str | int] | None (None: the model family's default)

SKIP_KINDS = ("block", "attn", "ff")


def _check_number(owner: str, name: str, value, lo=None, hi=None, finite=True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}.{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise ValueError(f"{owner}.{name} must be finite, got {value}")
    if lo is not None and value < lo:
        raise ValueError(f"{owner}.{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{owner}.{name} must be <= {hi}, got {value}")
    return value


def _freeze_layers(layers: LayerSpec) -> LayerSpec:
    if layers is None or isinstance(layers, (str, int)):
        return layers
    if isinstance(layers, Sequence):
        out = tuple(layers)
        if not out:
            raise ValueError("layers must name at least one layer (got an empty list)")
        for item in out:
            if isinstance(item, bool) or not isinstance(item, (str, int)):
                raise TypeError(f"layers entries must be names or block indices, got {item!r}")
        return out
    raise TypeError(f"layers must be a name, an index or a list of them, got {type(layers).__name__}")


@dataclass(frozen=True)
class Term:
    """Common fields: ``scale`` (0 = off), step window ``start <= i / N < stop``."""

    scale: float = 1.0
    start: float = 0.0
    stop: float = 1.0

    def __post_init__(self):
        name = type(self).__name__
        object.__setattr__(self, "scale", _check_number(name, "scale", self.scale))
        object.__setattr__(self, "start", _check_number(name, "start", self.start, 0.0, 1.0))
        object.__setattr__(self, "stop", _check_number(name, "stop", self.stop, 0.0, 1.0))
        if self.start > self.stop:
            raise ValueError(f"{name}: start ({self.start}) must not exceed stop ({self.stop})")

    def in_window(self, step: int, num_steps: int) -> bool:
        return self.start <= step / num_steps < self.stop

    def to_dict(self) -> dict:
        d = {"type": type(self).__name__}
        for f in fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d


@dataclass(frozen=True)
class CFG(Term):
    """Classifier-free guidance ``u + w (c - u)``; ``scale`` 1 means off. ``rescale`` is Lin et
    al.'s guidance_rescale (0 = off)."""

    scale: float = 5.0
    rescale: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "rescale", _check_number("CFG", "rescale", self.rescale, 0.0, 1.0))

    def step_scale(self, step: int, num_steps: int) -> float:
        """The CFG weight in this step; 1.0 (no uncond row) outside the window."""
        return self.scale if self.in_window(step, num_steps) else 1.0


@dataclass(frozen=True)
class SCFG(CFG):
    """Semantic-aware CFG (methods.md section 7): CFG whose scale is a per-pixel map, equalising
    the guidance strength over the semantic regions found in the step's own attention maps.
    Takes CFG's place. ``completion``: "code" ((A + 3 A^2) / 4, the published code) or "paper"
    ((A + A^2 + A^3 + A^4) / 4). The rate is clamped to ``clamp`` and to ``max_product / scale``.
    UNet models only (SD1.5, SDXL)."""

    scale: float = 7.5
    R: int = 4
    completion: str = "code"
    clamp: tuple = (0.8, 3.0)
    max_product: float = 15.0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.R, bool) or not isinstance(self.R, int) or self.R < 1:
            raise ValueError(f"SCFG.R must be a positive integer, got {self.R!r}")
        if self.completion not in ("code", "paper"):
            raise ValueError(f"SCFG.completion must be 'code' or 'paper', got {self.completion!r}")
        lo, hi = (_check_number("SCFG", "clamp", v) for v in self.clamp)
        if not 0 < lo <= hi:
            raise ValueError(f"SCFG.clamp must be (low, high) with 0 < low <= high, got {self.clamp!r}")
        object.__setattr__(self, "clamp", (lo, hi))
        object.__setattr__(self, "max_product", _check_number("SCFG", "max_product", self.max_product, 0.0))


@dataclass(frozen=True)
class PerturbationTerm(Term):
    """A term that adds one perturbed branch ``p`` and the guidance ``scale * (c - p)``."""

    layers: LayerSpec = None

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "layers", _freeze_layers(self.layers))

    def step_scale(self, step: int, num_steps: int, timestep: float | None = None) -> float:
        return self.scale if self.in_window(step, num_steps) else 0.0

    def check_model(self, layers: Sequence, family: str, where: str) -> None:
        """Raise if a field cannot apply to this model family and the resolved blocks
        (`layers.Layer`s): a value the forward would silently ignore or misread is an error
        here, when the denoiser is built. `where` names the term."""


@dataclass(frozen=True)
class PAG(PerturbationTerm):
    """Perturbed-attention guidance: the chosen self-attention maps become the identity.

    ``beta`` < 1 gives SoftPAG, ``A' = (1 - beta) A + beta I`` on the heads in ``heads`` (all
    heads when None). ``adaptive_scale`` a makes the scale ``max(0, scale - a (1000 - t))``.
    """

    scale: float = 3.0
    beta: float = 1.0
    heads: tuple | None = None
    adaptive_scale: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "beta", _check_number("PAG", "beta", self.beta, 0.0, 1.0))
        object.__setattr__(self, "adaptive_scale",
                           _check_number("PAG", "adaptive_scale", self.adaptive_scale, 0.0))
        if self.heads is not None:
            heads = tuple(self.heads) if not isinstance(self.heads, int) else (self.heads,)
            if not heads or any(isinstance(h, bool) or not isinstance(h, int) or h < 0 for h in heads):
                raise ValueError(f"PAG.heads must be non-negative head indices, got {self.heads!r}")
            object.__setattr__(self, "heads", tuple(sorted(set(heads))))

    def check_model(self, layers, family, where):
        if self.adaptive_scale and family == "flux":
            raise ValueError(f"{where}.adaptive_scale must be 0 on FLUX: its timestep is sigma in 0..1, so "
                             f"max(0, scale - a (1000 - t)) would only shift the scale; valid: 0")
        if self.heads is None:
            return
        fewest = min(layers, key=lambda layer: layer.heads)
        if self.heads[-1] >= fewest.heads:
            raise ValueError(f"{where}.heads: head {self.heads[-1]} does not exist in layer {fewest.name} "
                             f"({fewest.path}), which has {fewest.heads} heads; valid: 0-{fewest.heads - 1}")

    def step_scale(self, step, num_steps, timestep=None):
        s = super().step_scale(step, num_steps)
        if s and self.adaptive_scale:
            if timestep is None:
                raise ValueError("PAG.adaptive_scale needs the step's timestep")
            s = max(0.0, s - self.adaptive_scale * (1000.0 - float(timestep)))
        return s


@dataclass(frozen=True)
class SEG(PerturbationTerm):
    """Smoothed energy guidance: the chosen self-attention queries are blurred with a Gaussian
    of ``sigma`` on the latent token grid; ``sigma > 9999`` (or inf) means their spatial mean."""

    scale: float = 3.0
    sigma: float = math.inf

    INFINITE_ABOVE = 9999.0

    def __post_init__(self):
        super().__post_init__()
        sigma = _check_number("SEG", "sigma", self.sigma, finite=False)
        if not sigma > 1 / 6:
            # ceil(6 sigma) <= 1 makes a 1-tap kernel: no blur, so SEG would change nothing
            raise ValueError(f"SEG.sigma must be > 1/6 (smaller gives a 1-tap kernel, no blur); inf or "
                             f"> 9999 = infinite blur; got {sigma}")
        object.__setattr__(self, "sigma", sigma)

    @property
    def infinite(self) -> bool:
        return self.sigma > self.INFINITE_ABOVE


@dataclass(frozen=True)
class TPG(PerturbationTerm):
    """Token perturbation guidance: image tokens are shuffled at the input of each chosen block
    with a permutation drawn from the user's generator (one per layer per step)."""

    scale: float = 3.0


@dataclass(frozen=True)
class SLG(PerturbationTerm):
    """Skip-layer guidance: the chosen blocks are bypassed in the perturbed branch.

    ``skip``: "block" (output = input), "attn" (attention sublayers add nothing) or "ff"
    (feed-forward sublayers add nothing).

    CSLG (contrastive skip-layer guidance, methods.md section 6):
    - ``form="cslg"`` reads ``scale`` as CSLG's s: without CFG ``eps = p + s (c - p)`` (the FLUX
      form), with CFG ``eps = u + w (c - u) + (s - 1)(c - p)`` (the SD3 form). ``form="slg"``
      (default) adds ``scale * (c - p)``.
    - ``weights`` (one positive number per layer, in the order ``layers`` names them): weighted
      multi-skip, ``p = sum_l a_l p_l / sum_l a_l`` with one layer skipped in each ``p_l``; every
      ``p_l`` is a row of the same packed forward.
    """

    scale: float = 2.8
    skip: str = "block"
    start: float = 0.01
    stop: float = 0.2
    form: str = "slg"
    weights: tuple | None = None

    FORMS = ("slg", "cslg")

    def __post_init__(self):
        super().__post_init__()
        if self.skip not in SKIP_KINDS:
            raise ValueError(f"SLG.skip must be one of {SKIP_KINDS}, got {self.skip!r}")
        if self.form not in self.FORMS:
            raise ValueError(f"SLG.form must be one of {self.FORMS}, got {self.form!r}")
        if self.weights is not None:
            weights = tuple(_check_number("SLG", "weights", w) for w in self.weights)
            if not weights or any(w <= 0 for w in weights):
                raise ValueError(f"SLG.weights must be positive numbers, one per layer, got {self.weights!r}")
            object.__setattr__(self, "weights", weights)

    def coefficient(self, s: float) -> float:
        """The weight of (c - p) in the combiner for step scale s."""
        return s - 1.0 if self.form == "cslg" and s != 0 else s


NAG_DEFAULT_ALPHA = {"unet": 0.5, "sd3": 0.125, "flux": 0.25}


@dataclass(frozen=True)
class NAG(Term):
    """Normalized attention guidance (methods.md section 5), inside the positive rows' attention:
    ``Zt = phi Zp - (phi - 1) Zn``, clipped to ``tau`` times ``|Zp|`` (``norm``-norm over all
    heads of a token), blended ``alpha Zt' + (1 - alpha) Zp``. It adds no branch; it needs the
    negative prompt's conditioning.

    ``scale`` is phi in the code convention: 1 means off, and the paper's scale is ``scale - 1``.
    ``alpha=None`` takes the model family's default (SD1.5/SDXL 0.5, SD3 0.125, FLUX 0.25).
    """

    scale: float = 5.0
    tau: float = 2.5
    alpha: float | None = None
    norm: int = 1

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "tau", _check_number("NAG", "tau", self.tau, 0.0))
        if self.alpha is not None:
            object.__setattr__(self, "alpha", _check_number("NAG", "alpha", self.alpha, 0.0, 1.0))
        if self.norm not in (1, 2):
            raise ValueError(f"NAG.norm must be 1 or 2, got {self.norm!r}")

    def step_scale(self, step: int, num_steps: int) -> float:
        """phi in this step; 1.0 (off) outside the window."""
        return self.scale if self.in_window(step, num_steps) else 1.0

    def alpha_for(self, family: str) -> float:
        return NAG_DEFAULT_ALPHA[family] if self.alpha is None else self.alpha


TERM_TYPES = {cls.__name__: cls for cls in (CFG, SCFG, PAG, SEG, TPG, SLG, NAG)}


class Guidance:
    """An ordered set of terms applied together in one packed forward per step."""

    def __init__(self, *terms: Term):
        if len(terms) == 1 and isinstance(terms[0], (list, tuple)):
            terms = tuple(terms[0])
        for t in terms:
            if not isinstance(t, Term):
                raise TypeError(f"Guidance takes terms such as grt.CFG(...), got {type(t).__name__}")
        cfgs = [t for t in terms if isinstance(t, CFG)]
        if len(cfgs) > 1:
            raise ValueError("Guidance takes at most one CFG term (SCFG takes CFG's place)")
        nags = [t for t in terms if isinstance(t, NAG)]
        if len(nags) > 1:
            raise ValueError("Guidance takes at most one NAG term")
        self.nag: NAG | None = nags[0] if nags else None
        self.terms: tuple[Term, ...] = tuple(terms)
        self.cfg: CFG | None = cfgs[0] if cfgs else None
        self.perturbations: tuple[PerturbationTerm, ...] = tuple(
            t for t in terms if isinstance(t, PerturbationTerm))

    def __repr__(self):
        return f"Guidance({', '.join(map(repr, self.terms))})"

    def __eq__(self, other):
        return isinstance(other, Guidance) and self.terms == other.terms

    def __hash__(self):
        return hash(self.terms)

    def needs_uncond(self) -> bool:
        """Whether any step may need the unconditional row."""
        return self.cfg is not None and self.cfg.scale != 1.0

    def to_dict(self) -> dict:
        return {"terms": [t.to_dict() for t in self.terms]}

    @classmethod
    def from_dict(cls, data: dict) -> "Guidance":
        terms = []
        for d in data["terms"]:
            d = dict(d)
            kind = d.pop("type", None)
            if kind not in TERM_TYPES:
                raise ValueError(f"unknown term type {kind!r}; valid: {sorted(TERM_TYPES)}")
            terms.append(TERM_TYPES[kind](**d))
        return cls(*terms)

    # what may differ between the samples of one packed batch (GuidedDenoiser with a list of
    # Guidances): the numbers that only weight a branch in the combine. NAG's scale acts inside
    # attention, so NAG must be the same for every sample.
    PER_SAMPLE_FIELDS = ("scale", "start", "stop", "adaptive_scale")

    def structure(self) -> tuple:
        """The terms without their per-sample fields: Guidances with equal structures can share
        one packed forward with per-sample scales."""
        return tuple((type(t).__name__, tuple(
            (f.name, getattr(t, f.name)) for f in fields(t)
            if isinstance(t, NAG) or f.name not in self.PER_SAMPLE_FIELDS)) for t in self.terms)

    def replace(self, index: int, **changes) -> "Guidance":
        terms = list(self.terms)
        terms[index] = replace(terms[index], **changes)
        return Guidance(*terms)
