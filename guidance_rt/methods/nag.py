"""NAG: normalized attention guidance (methods.md section 5). It adds no row: it acts inside the
positive rows' attention, which every family's packed forward computes against the negative
conditioning too (the `nag_attention` / `nag_combine` ops)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Term, check_number


@dataclass(frozen=True)
class NAG(Term):
    """Normalized attention guidance: ``Zt = phi Zp - (phi - 1) Zn``, clipped to ``tau`` times
    ``|Zp|`` (``norm``-norm over all heads of a token), blended ``alpha Zt' + (1 - alpha) Zp``.
    It needs the negative prompt's conditioning.

    ``scale`` is phi in the code convention: 1 means off, and the paper's scale is ``scale - 1``.
    ``alpha=None`` takes the model family's default (SD1.5/SDXL 0.5, SD3 0.125, FLUX 0.25).
    """

    scale: float = 5.0
    tau: float = 2.5
    alpha: float | None = None
    norm: int = 1

    off_scale = 1.0
    per_sample_fields = ()   # phi acts inside attention: one value for the whole batch

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "tau", check_number("NAG", "tau", self.tau, 0.0))
        if self.alpha is not None:
            object.__setattr__(self, "alpha", check_number("NAG", "alpha", self.alpha, 0.0, 1.0))
        if self.norm not in (1, 2):
            raise ValueError(f"NAG.norm must be 1 or 2, got {self.norm!r}")

    def step_scale(self, step: int, num_steps: int) -> float:
        """phi in this step; 1.0 (off) outside the window."""
        return self.scale if self.in_window(step, num_steps) else 1.0

    def alpha_for(self, default: float) -> float:
        """alpha, or the model family's default."""
        return default if self.alpha is None else self.alpha
