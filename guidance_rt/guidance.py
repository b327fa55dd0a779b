"""Guidance: the ordered set of terms applied together in one packed forward per step."""
from __future__ import annotations

from dataclasses import fields, replace

from .methods import CFG, METHODS, NAG, TERM_TYPES, PerturbationTerm, Term


class Guidance:
    """An ordered set of terms applied together in one packed forward per step."""

    def __init__(self, *terms: Term):
        if len(terms) == 1 and isinstance(terms[0], (list, tuple)):
            terms = tuple(terms[0])
        for t in terms:
            if not isinstance(t, Term):
                raise TypeError(f"Guidance takes terms such as grt.CFG(...), got {type(t).__name__}")
        cfgs = [t for t in terms if isinstance(t, CFG)]
        if len(cfgs) > 1:
            place = ", ".join(c.__name__ for c in METHODS if issubclass(c, CFG))
            raise ValueError(f"Guidance takes at most one CFG term or term in CFG's place ({place}); "
                             f"got {', '.join(type(t).__name__ for t in cfgs)}")
        nags = [t for t in terms if isinstance(t, NAG)]
        if len(nags) > 1:
            raise ValueError("Guidance takes at most one NAG term")
        self.nag: NAG | None = nags[0] if nags else None
        self.terms: tuple[Term, ...] = tuple(terms)
        self.cfg: CFG | None = cfgs[0] if cfgs else None
        self.perturbations: tuple[PerturbationTerm, ...] = tuple(
            t for t in terms if isinstance(t, PerturbationTerm))

    def __repr__(self):
        return f"Guidance({', '.join(map(repr, self.terms))})"

    def __eq__(self, other):
        return isinstance(other, Guidance) and self.terms == other.terms

    def __hash__(self):
        return hash(self.terms)

    def needs_uncond(self) -> bool:
        """Whether any step may need the unconditional row."""
        return self.cfg is not None and self.cfg.scale != 1.0

    def to_dict(self) -> dict:
        return {"terms": [t.to_dict() for t in self.terms]}

    @classmethod
    def from_dict(cls, data: dict) -> "Guidance":
        terms = []
        for d in data["terms"]:
            d = dict(d)
            kind = d.pop("type", None)
            if kind not in TERM_TYPES:
                raise ValueError(f"unknown term type {kind!r}; valid: {sorted(TERM_TYPES)}")
            terms.append(TERM_TYPES[kind](**d))
        return cls(*terms)

    def structure(self) -> tuple:
        """The terms without their per-sample fields (Term.per_sample_fields): Guidances with
        equal structures can share one packed forward (GuidedDenoiser with a list of Guidances),
        each sample combined with its own scales."""
        return tuple((type(t).__name__, tuple(
            (f.name, getattr(t, f.name)) for f in fields(t)
            if f.name not in t.per_sample_fields)) for t in self.terms)

    def replace(self, index: int, **changes) -> "Guidance":
        terms = list(self.terms)
        terms[index] = replace(terms[index], **changes)
        return Guidance(*terms)
