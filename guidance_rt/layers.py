"""Layer addressing (shared/methods.md section 8), the same for every model family.

A "layer" is one transformer block, the unit every perturbation acts on. Each family
(guidance_rt.families) lists its blocks in execution order with their names, parts and module
paths; this module matches a user's spec against that list: names (`d6`, `7`, `s5`), ranges
(`d6-d23`, `"0-18"`, `"s0-s37"`), parts (`mid`, `single`), diffusers module paths
(`mid_block.attentions.0`: every block under it, matched on whole path components) and, where
the family allows, bare block indices.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable


class UnsupportedModelError(TypeError):
    pass


class LayerNotFoundError(ValueError):
    pass


@dataclass(frozen=True)
class Layer:
    name: str       # canonical short name: d6, m0, u3 / 7 / s5
    path: str       # diffusers module path of the block
    part: str       # down | mid | up | joint | double | single
    position: int   # execution order of the block in one forward
    heads: int      # attention heads of the block's (self-/joint) attention, the one PAG/SEG perturb


def describe(layers: list[Layer]) -> str:
    groups: dict[str, list[str]] = {}
    for layer in layers:
        groups.setdefault(layer.part, []).append(layer.name)
    spans = [f"{names[0]}-{names[-1]}" if len(names) > 1 else names[0] for names in groups.values()]
    parts = ", ".join(groups)
    example = layers[0].path if layers else ""
    return (f"valid layers: {', '.join(spans)}; parts: {parts}; or module paths such as "
            f"{example!r}")


_RANGE = re.compile(r"^([a-z]*)(\d+)-([a-z]*)(\d+)$")


def _match_one(item, layers: list[Layer], by_index: bool, parts: tuple[str, ...]) -> list[Layer]:
    if isinstance(item, int):
        if not by_index:
            return []
        item = str(item)
    text = item.strip()
    by_name = {layer.name: layer for layer in layers}
    if text == "all":
        return list(layers)
    if text in by_name:
        return [by_name[text]]
    if text in parts:
        return [layer for layer in layers if layer.part == text]
    m = _RANGE.match(text)
    if m and m.group(1) == m.group(3):
        lo, hi = int(m.group(2)), int(m.group(4))
        names = [f"{m.group(1)}{i}" for i in range(lo, hi + 1)]
        if lo <= hi and all(n in by_name for n in names):
            return [by_name[n] for n in names]
        return []
    # diffusers module path: the block itself, everything under a container, or a submodule
    # of one block; matched on whole components so "blocks.1" never matches "blocks.10".
    return [layer for layer in layers
            if layer.path == text or layer.path.startswith(text + ".") or text.startswith(layer.path + ".")]


def match_layers(layers: list[Layer], spec, *, by_index: bool, parts: tuple[str, ...], owner: str,
                 term: str = "layers", keep_order: bool = False) -> tuple[Layer, ...]:
    """Resolve a layer spec (name, index, range, part, module path, or a list of them) to blocks
    of `layers`, sorted in execution order (`keep_order`: in the order the spec names them, for
    per-layer weights). `by_index`: bare integers address blocks; `parts`: the part names that
    address all their blocks; `owner`: the model, for messages. Unknown names raise
    LayerNotFoundError listing the valid ones."""
    items: Iterable = spec if isinstance(spec, (list, tuple)) else [spec]
    chosen: dict[int, Layer] = {}
    for item in items:
        found = _match_one(item, layers, by_index, parts)
        if not found:
            raise LayerNotFoundError(
                f"{term}: layer {item!r} matches no block of this {owner}; {describe(layers)}")
        for layer in found:
            chosen.setdefault(layer.position, layer)
    return tuple(chosen.values()) if keep_order else tuple(chosen[p] for p in sorted(chosen))
