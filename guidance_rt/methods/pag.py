"""PAG: perturbed-attention guidance and SoftPAG (methods.md section 2)."""
from __future__ import annotations

from dataclasses import dataclass

from ..effects import AttnVariant, Effect
from .base import PerturbationTerm, check_number


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

    per_sample_fields = ("scale", "start", "stop", "adaptive_scale")

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "beta", check_number("PAG", "beta", self.beta, 0.0, 1.0))
        object.__setattr__(self, "adaptive_scale",
                           check_number("PAG", "adaptive_scale", self.adaptive_scale, 0.0))
        if self.heads is not None:
            heads = tuple(self.heads) if not isinstance(self.heads, int) else (self.heads,)
            if not heads or any(isinstance(h, bool) or not isinstance(h, int) or h < 0 for h in heads):
                raise ValueError(f"PAG.heads must be non-negative head indices, got {self.heads!r}")
            object.__setattr__(self, "heads", tuple(sorted(set(heads))))

    def effect(self) -> Effect:
        return Effect(attention=AttnVariant(pag=self.beta, heads=self.heads))

    def check_model(self, layers, family, where, model=""):
        if self.adaptive_scale and family.sigma_timesteps:
            raise ValueError(f"{where}.adaptive_scale must be 0 on {family.title}: its timestep is sigma in 0..1, so "
                             f"max(0, scale - a (1000 - t)) would only shift the scale; valid: 0")
        if self.heads is None:
            return
        fewest = min(layers, key=lambda layer: layer.heads)
        if self.heads[-1] >= fewest.heads:
            raise ValueError(f"{where}.heads: head {self.heads[-1]} does not exist in layer {fewest.name} "
                             f"({fewest.path}), which has {fewest.heads} heads; valid: 0-{fewest.heads - 1}")

    def needs_timestep(self) -> bool:
        return bool(self.adaptive_scale)

    def step_scale(self, step, num_steps, timestep=None):
        s = super().step_scale(step, num_steps)
        if s and self.adaptive_scale:
            if timestep is None:
                raise ValueError("PAG.adaptive_scale needs the step's timestep")
            s = max(0.0, s - self.adaptive_scale * (1000.0 - float(timestep)))
        return s
