"""What every guidance method shares: validated immutable configuration, a step window, and the
questions the packed runtime asks a method (shared/methods.md section 1).

A method is one dataclass. The runtime never tests for a method's name; it asks:

- every term: ``step_scale`` (its weight in a step, 0 / 1 = off outside its window);
- a term that takes CFG's place (``CFG`` and its subclasses): ``guide``, its formula over the
  uncond and cond predictions;
- a perturbation term: ``branches`` (the perturbed rows it adds and the blocks each touches),
  ``effect`` (what those rows get at those blocks, see guidance_rt.effects), ``coefficient``
  (the weight of ``c - p`` in the formula) and ``check_model``.

Plain Python (no torch import): the command line reads terms without loading torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Sequence

from ..effects import Effect

LayerSpec = Any  # str | int | Sequence[str | int] | None (None: the model family's default)


def check_number(owner: str, name: str, value, lo=None, hi=None, finite=True) -> float:
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

    # the term's name in the spec language (guidance_rt.spec); None: the class name in lower case
    spec_name: ClassVar[str | None] = None
    # fields that may differ between the samples of one packed batch (they only weight a branch
    # in the formula); a term acting inside attention (NAG) sets this to ()
    per_sample_fields: ClassVar[tuple[str, ...]] = ("scale", "start", "stop")
    # the scale at which the term does nothing (CFG's and NAG's 1: their formulas reduce to c)
    off_scale: ClassVar[float] = 0.0

    def __post_init__(self):
        name = type(self).__name__
        object.__setattr__(self, "scale", check_number(name, "scale", self.scale))
        object.__setattr__(self, "start", check_number(name, "start", self.start, 0.0, 1.0))
        object.__setattr__(self, "stop", check_number(name, "stop", self.stop, 0.0, 1.0))
        if self.start > self.stop:
            raise ValueError(f"{name}: start ({self.start}) must not exceed stop ({self.stop})")

    @classmethod
    def name(cls) -> str:
        return cls.spec_name or cls.__name__.lower()

    def in_window(self, step: int, num_steps: int) -> bool:
        return self.start <= step / num_steps < self.stop

    def to_dict(self) -> dict:
        d = {"type": type(self).__name__}
        for f in fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    def check_model(self, layers: Sequence, family, where: str, model: str = "") -> None:
        """Raise if a field cannot apply to this model family and the resolved blocks
        (`layers.Layer`s, empty for terms without layers): a value the forward would silently
        ignore or misread is an error here, when the denoiser is built. `family`: the family's
        Adapter class (its declared capabilities, families.base), `where` names the term,
        `model` the model's class."""


@dataclass(frozen=True)
class PerturbationTerm(Term):
    """A term that adds perturbed rows ``p`` and the guidance ``coefficient(scale) * (c - p)``."""

    layers: LayerSpec = None

    # which of the model family's default layer sets a term without `layers` takes:
    # "attention" (a self-attention perturbation), "tokens" (block inputs) or "skip" (whole blocks)
    layer_role: ClassVar[str] = "attention"

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "layers", _freeze_layers(self.layers))

    def step_scale(self, step: int, num_steps: int, timestep: float | None = None) -> float:
        return self.scale if self.in_window(step, num_steps) else 0.0

    def needs_timestep(self) -> bool:
        """Whether step_scale reads the step's timestep (a device sync, so only when needed)."""
        return False

    @property
    def keep_layer_order(self) -> bool:
        """Resolve `layers` in the order they are named (per-layer weights), not execution order."""
        return False

    def branches(self, positions: tuple[int, ...]) -> list[tuple[frozenset[int], float]]:
        """The perturbed rows this term adds, given the execution positions of its resolved
        blocks: (positions that row's perturbation touches, its share of the term's guidance)."""
        return [(frozenset(positions), 1.0)]

    def effect(self) -> Effect:
        """What this term's rows get at every block they touch."""
        raise NotImplementedError(f"{type(self).__name__} must say what it does at a layer")

    def coefficient(self, s: float) -> float:
        """The weight of (c - p) in the guidance formula for step scale s."""
        return s
