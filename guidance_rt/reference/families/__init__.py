"""The reference oracle's model families, one module each (base.py: what a family declares).
Adding one: its module here and one line in FAMILIES."""
from __future__ import annotations

import torch.nn as nn

from ...families import model_family
from ...layers import UnsupportedModelError
from .base import Family
from .flux import FluxFamily
from .flux2 import Flux2Family
from .qwenimage import QwenImageFamily
from .sd3 import SD3Family
from .unet import UNetFamily
from .wan import WanFamily

FAMILIES: dict[str, Family] = {family.name: family for family in (
    UNetFamily(),
    SD3Family(),
    FluxFamily(),
    Flux2Family(),
    QwenImageFamily(),
    WanFamily(),
)}


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise UnsupportedModelError(f"the reference oracle has no module for the {name} family; "
                                    f"it has {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_for(model: nn.Module) -> Family:
    return family_named(model_family(model))   # model_family: a clear error for unknown models


__all__ = ["FAMILIES", "Family", "family_for", "family_named"]
