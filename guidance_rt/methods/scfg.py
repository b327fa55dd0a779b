"""S-CFG: semantic-aware CFG (methods.md section 7). The per-pixel scale map is built from the
step's own attention maps by guidance_rt.scfg_maps (UNet families) and multiplies CFG's w."""
from __future__ import annotations

from dataclasses import dataclass

from .base import check_number
from .cfg import CFG


@dataclass(frozen=True)
class SCFG(CFG):
    """Semantic-aware CFG: CFG whose scale is a per-pixel map, equalising the guidance strength
    over the semantic regions found in the step's own attention maps. Takes CFG's place.
    ``completion``: "code" ((A + 3 A^2) / 4, the published code) or "paper"
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
        lo, hi = (check_number("SCFG", "clamp", v) for v in self.clamp)
        if not 0 < lo <= hi:
            raise ValueError(f"SCFG.clamp must be (low, high) with 0 < low <= high, got {self.clamp!r}")
        object.__setattr__(self, "clamp", (lo, hi))
        object.__setattr__(self, "max_product", check_number("SCFG", "max_product", self.max_product, 0.0))

    def check_model(self, layers, family, where, model=""):
        if not family.semantic_maps:
            raise NotImplementedError(f"SCFG (semantic-aware CFG) is supported on UNet models (SD1.5, SDXL) "
                                      f"only, not on {model or family.title}; use CFG")

    def step_extras(self, sample, batch: int) -> dict:
        from .scfg_maps import SemanticMaps
        return {"maps": SemanticMaps(self.R, self.completion, tuple(sample.shape[-2:]), batch)}

    def weight_map(self, extras: dict, u, c, w):
        from .scfg_maps import scfg_rate
        region, foreground = extras["maps"].masks()
        return scfg_rate(u, c, region.to(u.dtype), foreground.to(u.dtype), w, self.clamp, self.max_product)
