"""TPG: token perturbation guidance (methods.md section 4)."""
from __future__ import annotations

from dataclasses import dataclass

from ..effects import Effect
from .base import PerturbationTerm


@dataclass(frozen=True)
class TPG(PerturbationTerm):
    """Token perturbation guidance: image tokens are shuffled at the input of each chosen block
    with a permutation drawn from the user's generator (one per layer per step)."""

    scale: float = 3.0

    layer_role = "tokens"

    def effect(self) -> Effect:
        return Effect(shuffle=True)
