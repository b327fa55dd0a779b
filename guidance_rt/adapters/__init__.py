"""One adapter per model family: each owns that family's packed forward."""
from ..layers import model_family
from .flux import FluxAdapter
from .sd3 import SD3Adapter
from .unet import UNetAdapter

ADAPTERS = {"unet": UNetAdapter, "sd3": SD3Adapter, "flux": FluxAdapter}


def adapter_for(model):
    return ADAPTERS[model_family(model)](model)
