"""What a perturbation does at a layer it touches: the mechanisms every model family implements.

A method (guidance_rt.methods) says which of these its perturbed rows get; the plan places them
on rows; a family's packed forward executes them. The set is small on purpose: a new method that
is a new combination of these needs no family or kernel code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

SKIPS = ("block", "attn", "ff")


@dataclass(frozen=True)
class AttnVariant:
    """A perturbed self-attention (joint attention on MM-DiTs), as the attention op computes it.

    ``pag``: weight of PAG's attention map mixed into the softmax map, ``(1 - pag) A + pag A_pag``
    (1: PAG's map alone; on the heads in ``heads``, all when None). ``blur``: sigma of a Gaussian
    blur of the image queries on the token grid before attention (inf: their mean)."""

    pag: float = 0.0
    heads: tuple | None = None
    blur: float = 0.0

    @property
    def identity(self) -> bool:
        return self.pag == 1.0 and self.heads is None

    @property
    def mean(self) -> bool:
        return math.isinf(self.blur)


@dataclass(frozen=True)
class Effect:
    """``attention``: the self-attention variant; ``shuffle``: the image tokens are permuted at the
    block's input (one permutation per term, layer and step); ``skip``: "block" (output = input),
    "attn" or "ff" (those sublayers add nothing)."""

    attention: AttnVariant | None = None
    shuffle: bool = False
    skip: str | None = None


@dataclass(frozen=True)
class Segment:
    """Rows [start, end) of the rows a block runs on, and the attention variant they get
    (None: plain attention)."""

    start: int
    end: int
    variant: AttnVariant | None = None

    @property
    def rows(self) -> slice:
        return slice(self.start, self.end)
