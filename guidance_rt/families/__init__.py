"""Model families, one module each: each holds a family's Adapter (layer addressing, defaults,
pipeline hooks and its packed forward). Adding one: its module here, one line in FAMILIES, its
preset (README: "Adding a family")."""
from __future__ import annotations

import torch.nn as nn

from ..layers import Layer, UnsupportedModelError
from .base import Adapter
from .flux import FluxAdapter
from .flux2 import Flux2Adapter
from .qwenimage import QwenImageAdapter
from .sd3 import SD3Adapter
from .unet import UNetAdapter
from .wan import WanAdapter

FAMILIES: dict[str, type[Adapter]] = {cls.name: cls for cls in (UNetAdapter, SD3Adapter, FluxAdapter,
                                                               Flux2Adapter, QwenImageAdapter)}
FAMILIES[WanAdapter.name] = WanAdapter

SUPPORTED_CLASSES = {c: family.name for family in FAMILIES.values() for c in family.classes}
# pipeline class -> the family of its denoiser, and the attribute holding it
PIPELINE_FAMILIES = {p: family for family in FAMILIES.values() for p in family.pipelines}
SUPPORTED_PIPELINES = {p: family.denoiser_attribute for p, family in PIPELINE_FAMILIES.items()}

__all__ = ["FAMILIES", "SUPPORTED_CLASSES", "SUPPORTED_PIPELINES", "PIPELINE_FAMILIES", "Adapter", "family_of", "model_family", "adapter_for", "enumerate_layers",
           "resolve_layers", "UnsupportedModelError"]


def family_of(model: nn.Module) -> type[Adapter]:
    """The family serving a diffusers denoiser, or a clear error naming the supported classes."""
    for cls in type(model).__mro__:
        for family in FAMILIES.values():
            if cls.__name__ in family.classes:
                return family
    raise UnsupportedModelError(f"model class {type(model).__name__} is not supported; guidance-rt serves "
                                f"{', '.join(SUPPORTED_CLASSES)}")


def model_family(model: nn.Module) -> str:
    return family_of(model).name


def adapter_for(model: nn.Module) -> Adapter:
    return family_of(model)(model)


def enumerate_layers(model: nn.Module) -> list[Layer]:
    """Every addressable block of the model, in execution order."""
    return family_of(model).enumerate_layers(model)


def resolve_layers(model: nn.Module, spec, term: str = "layers", keep_order: bool = False,
                   role: str | None = None) -> tuple[Layer, ...]:
    """The model's blocks a layer spec names (layers.match_layers); spec None takes the family's
    default for `role` (a PerturbationTerm.layer_role; by default the role of the term class
    named `term`, e.g. "PAG")."""
    family = family_of(model)
    if spec is None and role is None:
        from ..methods import TERM_TYPES
        role = getattr(TERM_TYPES.get(term), "layer_role", None)
    return family.resolve(model, family.enumerate_layers(model), spec, term, role, keep_order)
