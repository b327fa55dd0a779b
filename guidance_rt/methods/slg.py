"""SLG: skip-layer guidance, and CSLG, its contrastive form (methods.md section 6)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..effects import SKIPS, Effect
from .base import PerturbationTerm, check_number


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

    FORMS: ClassVar[tuple[str, ...]] = ("slg", "cslg")
    layer_role = "skip"

    def __post_init__(self):
        super().__post_init__()
        if self.skip not in SKIPS:
            raise ValueError(f"SLG.skip must be one of {SKIPS}, got {self.skip!r}")
        if self.form not in self.FORMS:
            raise ValueError(f"SLG.form must be one of {self.FORMS}, got {self.form!r}")
        if self.weights is not None:
            weights = tuple(check_number("SLG", "weights", w) for w in self.weights)
            if not weights or any(w <= 0 for w in weights):
                raise ValueError(f"SLG.weights must be positive numbers, one per layer, got {self.weights!r}")
            object.__setattr__(self, "weights", weights)

    def effect(self) -> Effect:
        return Effect(skip=self.skip)

    @property
    def keep_layer_order(self) -> bool:
        return self.weights is not None

    def branches(self, positions):
        if self.weights is None:
            return super().branches(positions)
        total = sum(self.weights)   # weighted multi-skip: one row per skipped layer
        return [(frozenset([p]), a / total) for p, a in zip(positions, self.weights)]

    def check_model(self, layers, family, where, model=""):
        if self.weights is not None and len(self.weights) != len(layers):
            raise ValueError(f"{where}.weights has {len(self.weights)} entries but its layers resolve to "
                             f"{len(layers)} blocks ({', '.join(l.name for l in layers)})")

    def coefficient(self, s: float) -> float:
        return s - 1.0 if self.form == "cslg" and s != 0 else s
