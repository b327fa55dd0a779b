"""Layer addressing for every model family (shared/methods.md section 8).

A "layer" is one transformer block, the unit every perturbation acts on:
- UNet (SD1.5, SDXL): each BasicTransformerBlock, named d<i>, m<i>, u<i> in module order per part
  (SDXL: d0-d23, m0-m9, u0-u35). Parts `down`, `mid`, `up`; ranges `d6-d23`; diffusers module
  paths such as `mid_block.attentions.0` (every block under it, matched on whole path components).
- SD3 / SD3.5: the joint blocks of `transformer_blocks`, by index (`7`, `"7"`, `"7-9"`).
- FLUX: double-stream blocks by index (`3`, `"0-18"`, part `double`) and single-stream blocks as
  `s<i>` (`"s0-s37"`, part `single`); module paths `single_transformer_blocks.5` work too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch.nn as nn

FAMILIES = ("unet", "sd3", "flux")
SUPPORTED_CLASSES = {
    "UNet2DConditionModel": "unet",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
}


class UnsupportedModelError(TypeError):
    pass


class LayerNotFoundError(ValueError):
    pass


def model_family(model: nn.Module) -> str:
    """The family of a diffusers denoiser, or a clear error naming the supported classes."""
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED_CLASSES:
            return SUPPORTED_CLASSES[cls.__name__]
    raise UnsupportedModelError(
        f"model class {type(model).__name__} is not supported; guidance-rt serves "
        f"{', '.join(SUPPORTED_CLASSES)}")


@dataclass(frozen=True)
class Layer:
    name: str       # canonical short name: d6, m0, u3 / 7 / s5
    path: str       # diffusers module path of the block
    part: str       # down | mid | up | joint | double | single
    position: int   # execution order of the block in one forward
    heads: int      # attention heads of the block's (self-/joint) attention, the one PAG/SEG perturb


def enumerate_layers(model: nn.Module) -> list[Layer]:
    """Every addressable block of the model, in execution order."""
    family = model_family(model)
    out: list[Layer] = []
    if family == "unet":
        parts = [("down", "d", [(f"down_blocks.{i}", b) for i, b in enumerate(model.down_blocks)]),
                 ("mid", "m", [("mid_block", model.mid_block)] if model.mid_block is not None else []),
                 ("up", "u", [(f"up_blocks.{i}", b) for i, b in enumerate(model.up_blocks)])]
        for part, letter, blocks in parts:
            n = 0
            for prefix, block in blocks:
                for j, t2d in enumerate(getattr(block, "attentions", None) or []):
                    for k, tb in enumerate(getattr(t2d, "transformer_blocks", [])):
                        out.append(Layer(f"{letter}{n}", f"{prefix}.attentions.{j}.transformer_blocks.{k}",
                                         part, len(out), tb.attn1.heads))
                        n += 1
    elif family == "sd3":
        for i, b in enumerate(model.transformer_blocks):
            out.append(Layer(str(i), f"transformer_blocks.{i}", "joint", len(out), b.attn.heads))
    else:
        for i, b in enumerate(model.transformer_blocks):
            out.append(Layer(str(i), f"transformer_blocks.{i}", "double", len(out), b.attn.heads))
        for i, b in enumerate(model.single_transformer_blocks):
            out.append(Layer(f"s{i}", f"single_transformer_blocks.{i}", "single", len(out), b.attn.heads))
    return out


DEFAULT_LAYERS = {
    # family -> term -> spec; used when a term's layers is None
    "unet": {"PAG": "mid", "SEG": "mid", "TPG": "d6-d23", "SLG": "mid"},
    "sd3": {"PAG": "1", "SEG": "1", "TPG": "1", "SLG": (7, 8, 9)},
    "flux": {"PAG": "1", "SEG": "1", "TPG": "1", "SLG": (7, 8, 9)},
}


def _describe(layers: list[Layer]) -> str:
    groups: dict[str, list[str]] = {}
    for layer in layers:
        groups.setdefault(layer.part, []).append(layer.name)
    spans = [f"{names[0]}-{names[-1]}" if len(names) > 1 else names[0] for names in groups.values()]
    parts = ", ".join(groups)
    example = layers[0].path if layers else ""
    return (f"valid layers: {', '.join(spans)}; parts: {parts}; or module paths such as "
            f"{example!r}")


_RANGE = re.compile(r"^([a-z]*)(\d+)-([a-z]*)(\d+)$")


def _match_one(item, layers: list[Layer], family: str) -> list[Layer]:
    if isinstance(item, int):
        if family == "unet":
            return []
        item = str(item)
    text = item.strip()
    by_name = {layer.name: layer for layer in layers}
    if text == "all":
        return list(layers)
    if text in by_name:
        return [by_name[text]]
    parts = {layer.part for layer in layers}
    if text in parts and text != "joint":
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


def resolve_layers(model: nn.Module, spec, term: str = "layers", keep_order: bool = False) -> tuple[Layer, ...]:
    """Resolve a layer spec (name, index, range, part, module path, or a list of them) to blocks,
    sorted in execution order (`keep_order`: in the order the spec names them, for per-layer
    weights). Unknown names raise LayerNotFoundError listing the valid ones."""
    family = model_family(model)
    layers = enumerate_layers(model)
    if spec is None:
        spec = DEFAULT_LAYERS[family].get(term)
        if spec is None:
            raise LayerNotFoundError(f"{term}: no default layers for {family}; {_describe(layers)}")
    items: Iterable = spec if isinstance(spec, (list, tuple)) else [spec]
    chosen: dict[int, Layer] = {}
    for item in items:
        found = _match_one(item, layers, family)
        if not found:
            raise LayerNotFoundError(
                f"{term}: layer {item!r} matches no block of this {type(model).__name__}; "
                f"{_describe(layers)}")
        for layer in found:
            chosen.setdefault(layer.position, layer)
    return tuple(chosen.values()) if keep_order else tuple(chosen[p] for p in sorted(chosen))
