"""CFG: classifier-free guidance (methods.md section 1), the term every method that takes CFG's
place (S-CFG, APG, CFG-Zero*) derives from."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Term, check_number


@dataclass(frozen=True)
class CFG(Term):
    """Classifier-free guidance ``u + w (c - u)``; ``scale`` 1 means off. ``rescale`` is Lin et
    al.'s guidance_rescale (0 = off)."""

    scale: float = 5.0
    rescale: float = 0.0

    # guide() is u + w (c - u), which the combine op fuses with the perturbation terms; a
    # subclass with another formula sets this False and the formula runs as written
    linear: ClassVar[bool] = True
    off_scale = 1.0

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "rescale", check_number(type(self).__name__, "rescale", self.rescale, 0.0, 1.0))

    def step_scale(self, step: int, num_steps: int) -> float:
        """The CFG weight in this step; 1.0 (no uncond row) outside the window."""
        return self.scale if self.in_window(step, num_steps) else 1.0

    def guide(self, u, c, w, *, step: int, state: dict):
        """The guided prediction from the uncond and cond predictions u, c (fp32 tensors, batch
        first) and the step's weight w (a number, or a tensor broadcasting per sample or per
        pixel). `state`: this term's memory across the steps of one run (empty at step 0)."""
        return u + w * (c - u)

    def step_extras(self, sample, batch: int) -> dict:
        """Data the family's forward collects for this term in a step with uncond rows (passed
        to Adapter.forward as `extras`; S-CFG: its semantic maps)."""
        return {}

    def weight_map(self, extras: dict, u, c, w):
        """A per-pixel map multiplying w, computed from the step's `extras` (None: none)."""
        return None

    def zero_prediction(self, step: int) -> bool:
        """Whether the guided prediction of this step is zero whatever the model says (then no
        forward runs)."""
        return False
