"""guidance-rt: every branch of a guided diffusion step in one packed forward.

The terms are plain Python; everything that needs torch or diffusers is imported on first use, so
`import guidance_rt` and the command line's --help and spec stay fast.
"""
import importlib

from .guidance import Guidance
from .methods import APG, CFG, NAG, PAG, SCFG, SEG, SLG, TPG, CFGZeroStar

# public name -> module that defines it (imported when first asked for)
_LAZY = {"GuidedDenoiser": ".denoiser", "NonFiniteError": ".denoiser", "guided": ".pipelines",
         "PackedGuider": ".modular", "reference": ".reference"}

__all__ = ["APG", "CFG", "CFGZeroStar", "NAG", "PAG", "SCFG", "SEG", "SLG", "TPG", "Guidance", *_LAZY]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'guidance_rt' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name], __name__)
    value = module if name == "reference" else getattr(module, name)
    globals()[name] = value
    return value
