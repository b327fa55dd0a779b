"""guidance-rt: every branch of a guided diffusion step in one packed forward."""
from . import reference
from .denoiser import GuidedDenoiser, NonFiniteError
from .terms import CFG, NAG, PAG, SCFG, SEG, SLG, TPG, Guidance

__all__ = ["CFG", "NAG", "PAG", "SCFG", "SEG", "SLG", "TPG", "Guidance", "GuidedDenoiser", "NonFiniteError", "reference", "guided", "PackedGuider"]


def __getattr__(name):
    if name == "guided":
        from .pipelines import guided
        return guided
    if name == "PackedGuider":   # imports diffusers.guiders only when asked for
        from .modular import PackedGuider
        return PackedGuider
    raise AttributeError(name)
