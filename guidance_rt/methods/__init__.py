"""Guidance methods, one module each. Adding one: its module here, one line in METHODS, its
oracle in guidance_rt/reference, its tests (README: "Adding a method")."""
from .apg import APG
from .base import PerturbationTerm, Term
from .cfg import CFG
from .cfg_zero_star import CFGZeroStar
from .nag import NAG
from .pag import PAG
from .scfg import SCFG
from .seg import SEG
from .slg import SLG
from .tpg import TPG

METHODS: tuple[type[Term], ...] = (CFG, SCFG, APG, CFGZeroStar, PAG, SEG, TPG, SLG, NAG)

TERM_TYPES = {cls.__name__: cls for cls in METHODS}   # the JSON form's "type"

__all__ = [*TERM_TYPES]   # what `guidance_rt` exports
