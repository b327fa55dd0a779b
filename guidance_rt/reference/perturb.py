"""Temporary perturbations of a stock diffusers model, one term at a time (the reference oracle).

``perturbed(model, term, ...)`` is a context manager: on entry it installs the term's
perturbation on the stock model (forward hooks, attention processors, per-instance forward
wrappers); on exit - also after an exception - it removes every one of them, so the model is
exactly as before. What is family-specific (which attention, which sublayers, the token grid, a
block's output when skipped or shuffled) the model's family module says (families/). Which
mechanism each term uses:

- PAG / SoftPAG: the chosen block's attention processor is swapped for the family's
  re-implementation of the stock one with the PAG map mixed in.
- SEG: a forward hook on the attention's ``to_q`` blurs (or averages) the image-token queries on
  the family's token grid.
- TPG: a forward wrapper on the chosen block runs it on permuted image tokens (what lands where:
  the family's ``shuffled``).
- SLG: "block" - a forward wrapper returns the family's bypassed output; "attn" / "ff" - forward
  hooks make the family's sublayers return zeros.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ..families import resolve_layers
from ..layers import Layer
from ..methods import PAG, SEG, SLG, TPG, PerturbationTerm
from .attention import blur_grid, mean_queries
from .families import family_for
from .hooks import hook, set_processor, wrap_forward


# --------------------------------------------------------------------------- branch context


class BranchInputs:
    """What a perturbation needs to know about the branch's forward: the model, its reference
    family, the latent sample and the branch's forward kwargs."""

    def __init__(self, model: nn.Module, sample: torch.Tensor, kwargs: dict):
        self.model = model
        self.family = family_for(model)
        self.sample = sample
        self.kwargs = kwargs


def _perturbed_attention(inputs: BranchInputs, layer: Layer, what: str) -> nn.Module:
    """The attention of ``layer`` that PAG / SEG perturb, checked to run the stock processor."""
    attn = inputs.family.attention(inputs.model.get_submodule(layer.path))
    inputs.family.check_processor(attn, what)
    return attn


# ----------------------------------------------------------------------------------- PAG


def _install_pag(stack, inputs: BranchInputs, term: PAG, layer: Layer) -> None:
    attn = _perturbed_attention(inputs, layer, "PAG")
    set_processor(stack, attn, inputs.family.pag_processor(term, attn, layer, inputs))


# ----------------------------------------------------------------------------------- SEG


def _install_seg(stack, inputs: BranchInputs, term: SEG, layer: Layer) -> None:
    attn = _perturbed_attention(inputs, layer, "SEG")
    grid = inputs.family.image_grid(stack, inputs, layer)
    text_first = inputs.family.text_before_image(layer)
    projection, columns = inputs.family.queries(attn)

    def perturb_query(module, args, output):
        query = output if columns is None else output[..., columns]
        shape = grid()   # (rows, cols), or (frames, rows, cols): video frames, each its own image
        frames, (height, width) = (shape[0], shape[1:]) if len(shape) == 3 else (1, shape)
        n_image = frames * height * width
        if query.shape[1] < n_image:
            raise ValueError(f"reference SEG: {query.shape[1]} query tokens at {layer.path}, "
                             f"expected {n_image} image tokens ({frames}x{height}x{width})")
        # image tokens: all of them, unless the family puts text first at this layer
        split = query.shape[1] - n_image
        text, image = query[:, :split], query[:, split:]
        if split and not text_first:
            raise ValueError(f"reference SEG: unexpected token count at {layer.path}")
        per_frame = [image[:, f * height * width:(f + 1) * height * width] for f in range(frames)]
        if term.infinite:
            per_frame = [mean_queries(x) for x in per_frame]
        else:
            per_frame = [blur_grid(x, height, width, term.sigma) for x in per_frame]
        query = torch.cat([text, *per_frame], dim=1)
        if columns is None:
            return query
        return torch.cat([output[..., :columns.start], query, output[..., columns.stop:]], dim=-1)

    hook(stack, projection, perturb_query)


# ----------------------------------------------------------------------------------- TPG


def tpg_permutation(seed: int, layer: Layer, n_tokens: int, device, groups: int = 1) -> torch.Tensor:
    """The layer's token permutation. With `groups` > 1 (video frames) the tokens form that many
    equal consecutive groups and each is permuted within itself, group after group, from the
    same generator."""
    generator = torch.Generator("cpu").manual_seed(seed + layer.position)
    if groups == 1:
        return torch.randperm(n_tokens, generator=generator).to(device)
    size = n_tokens // groups
    order = []
    for g in range(groups):
        order.extend((g * size + torch.randperm(size, generator=generator)).tolist())
    return torch.tensor(order, dtype=torch.long, device=device)


def _install_tpg(stack, inputs: BranchInputs, term: TPG, layer: Layer, seed: int) -> None:
    groups = inputs.family.token_groups(inputs, layer)

    def shuffle(tokens):
        return tokens[:, tpg_permutation(seed, layer, tokens.shape[1], tokens.device, groups)]

    wrap_forward(stack, inputs.model.get_submodule(layer.path),
                 lambda run, arguments: inputs.family.shuffled_in(inputs, layer, run, arguments, shuffle))


# ----------------------------------------------------------------------------------- SLG


def _install_slg(stack, inputs: BranchInputs, term: SLG, layer: Layer) -> None:
    block = inputs.model.get_submodule(layer.path)
    if term.skip == "block":
        wrap_forward(stack, block, lambda run, arguments: inputs.family.skipped(block, arguments))
        return
    inputs.family.install_skip(stack, block, layer, term.skip)


# --------------------------------------------------------------------------------- entry


@contextlib.contextmanager
def perturbed(model: nn.Module, term: PerturbationTerm, *, sample: torch.Tensor, kwargs: dict,
              tpg_seed: int | None = None):
    """Install ``term``'s perturbation on ``model`` for one branch forward; always removed on
    exit. ``sample`` / ``kwargs`` are that forward's inputs (used for token grids); ``tpg_seed``
    is the step's TPG seed for this term."""
    layers = resolve_layers(model, term.layers, type(term).__name__)
    inputs = BranchInputs(model, sample, kwargs)
    with contextlib.ExitStack() as stack:
        for layer in layers:
            if type(term) is PAG:
                _install_pag(stack, inputs, term, layer)
            elif type(term) is SEG:
                _install_seg(stack, inputs, term, layer)
            elif type(term) is TPG:
                if tpg_seed is None:
                    raise ValueError("reference TPG: no seed drawn for this term")
                _install_tpg(stack, inputs, term, layer, tpg_seed)
            elif type(term) is SLG:
                _install_slg(stack, inputs, term, layer)
            else:
                raise ValueError(f"reference: unknown perturbation term {type(term).__name__}")
        yield layers
