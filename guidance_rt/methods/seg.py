"""SEG: smoothed energy guidance (methods.md section 3)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..effects import AttnVariant, Effect
from .base import PerturbationTerm, check_number


@dataclass(frozen=True)
class SEG(PerturbationTerm):
    """Smoothed energy guidance: the chosen self-attention queries are blurred with a Gaussian
    of ``sigma`` on the latent token grid; ``sigma > 9999`` (or inf) means their spatial mean."""

    scale: float = 3.0
    sigma: float = math.inf

    INFINITE_ABOVE: ClassVar[float] = 9999.0

    def __post_init__(self):
        super().__post_init__()
        sigma = check_number("SEG", "sigma", self.sigma, finite=False)
        if not sigma > 1 / 6:
            # ceil(6 sigma) <= 1 makes a 1-tap kernel: no blur, so SEG would change nothing
            raise ValueError(f"SEG.sigma must be > 1/6 (smaller gives a 1-tap kernel, no blur); inf or "
                             f"> 9999 = infinite blur; got {sigma}")
        object.__setattr__(self, "sigma", sigma)

    @property
    def infinite(self) -> bool:
        return self.sigma > self.INFINITE_ABOVE

    def effect(self) -> Effect:
        return Effect(attention=AttnVariant(blur=math.inf if self.infinite else self.sigma))
