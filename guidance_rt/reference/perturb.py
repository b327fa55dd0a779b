"""Temporary perturbations of a stock diffusers model, one term at a time (the reference oracle).

``perturbed(model, term, ...)`` is a context manager: on entry it installs the term's
perturbation on the stock model (forward hooks, attention processors, per-instance forward
wrappers); on exit - also after an exception - it removes every one of them, so the model is
exactly as before. Which mechanism each term uses:

- PAG / SoftPAG: the chosen block's attention processor is swapped for a re-implementation of the
  stock one with the PAG map mixed in (attention.py).
- SEG: a forward hook on the attention's ``to_q`` blurs (or averages) the image-token queries.
  UNet grids come from a pre-hook on the block's Transformer2DModel.
- TPG: a forward wrapper on the chosen block permutes the image tokens (UNet: at the input, never
  undone; DiT: the block's residual update computed on permuted tokens lands unpermuted).
- SLG: "block" - a forward wrapper returns the block's input; "attn" / "ff" - forward hooks make
  the sublayer modules return zeros.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable

import torch
import torch.nn as nn

from ..families import model_family, resolve_layers
from ..layers import Layer
from ..methods import PAG, SEG, SLG, TPG, PerturbationTerm
from .attention import (STOCK_PROCESSORS, FluxAttentionPAG, SD3JointAttentionPAG,
                        UNetSelfAttentionPAG, blur_grid, mean_queries)

# --------------------------------------------------------------------- install / remove helpers


def _set_processor(stack: contextlib.ExitStack, attn: nn.Module, processor) -> None:
    original = attn.processor
    if isinstance(original, nn.Module):
        raise ValueError("reference: attention processors with weights are not supported")
    attn.processor = processor
    stack.callback(setattr, attn, "processor", original)


def _wrap_forward(stack: contextlib.ExitStack, module: nn.Module,
                  make: Callable[[Callable, inspect.Signature], Callable]) -> None:
    """Give ``module`` an instance-level forward built by ``make(inner_forward, signature)``;
    on exit the instance attribute is restored (or removed when it did not exist)."""
    had_own = "forward" in module.__dict__
    own = module.__dict__.get("forward")
    inner = module.forward
    module.forward = make(inner, inspect.signature(inner))

    def restore():
        if had_own:
            module.forward = own
        else:
            del module.forward

    stack.callback(restore)


def _hook(stack: contextlib.ExitStack, module: nn.Module, fn, pre: bool = False,
          with_kwargs: bool = False) -> None:
    if pre:
        handle = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
    else:
        handle = module.register_forward_hook(fn, with_kwargs=with_kwargs)
    stack.callback(handle.remove)


def _zeros_like(output):
    if isinstance(output, tuple):
        return tuple(None if o is None else torch.zeros_like(o) for o in output)
    return torch.zeros_like(output)


def _return_zeros(module, args, output):
    return _zeros_like(output)


def _check_stock_processor(family: str, attn: nn.Module, what: str) -> None:
    name = type(attn.processor).__name__
    if name not in STOCK_PROCESSORS[family]:
        raise ValueError(f"reference {what}: expects the stock attention processor "
                         f"({' / '.join(STOCK_PROCESSORS[family])}), found {name}")
    if getattr(attn, "fused_projections", False):
        raise ValueError(f"reference {what}: fused qkv projections are not supported")


# --------------------------------------------------------------------------- branch context


class BranchInputs:
    """What a perturbation needs to know about the branch's forward: the model family, the
    latent sample and the branch's forward kwargs."""

    def __init__(self, model: nn.Module, sample: torch.Tensor, kwargs: dict):
        self.model = model
        self.family = model_family(model)
        self.sample = sample
        self.kwargs = kwargs

    def flux_grid(self) -> tuple[int, int]:
        """(rows, cols) of the FLUX image tokens from img_ids (row-major order)."""
        ids = self.kwargs.get("img_ids")
        if ids is None:
            raise ValueError("reference: FLUX needs img_ids in the branch kwargs")
        if ids.ndim == 3:
            ids = ids[0]
        rows = int(ids[:, 1].max().item()) + 1
        cols = int(ids[:, 2].max().item()) + 1
        if rows * cols != ids.shape[0]:
            raise ValueError(f"reference: img_ids ({ids.shape[0]} tokens) are not a full "
                             f"{rows}x{cols} grid")
        return rows, cols

    def flux_image_tokens(self) -> int:
        ids = self.kwargs["img_ids"]
        return ids.shape[-2]

    def sd3_grid(self) -> tuple[int, int]:
        patch = self.model.config.patch_size
        height, width = self.sample.shape[-2:]
        return height // patch, width // patch


# ----------------------------------------------------------------------------------- PAG


def _install_pag(stack, inputs: BranchInputs, term: PAG, layer: Layer) -> None:
    block = inputs.model.get_submodule(layer.path)
    family = inputs.family
    attn = block.attn1 if family == "unet" else block.attn
    _check_stock_processor(family, attn, "PAG")
    if family == "unet":
        if getattr(attn, "is_cross_attention", False):
            raise ValueError(f"reference PAG: {layer.path}.attn1 is not a self-attention")
        processor = UNetSelfAttentionPAG(term.beta, term.heads, attn.heads)
    elif family == "sd3":
        processor = SD3JointAttentionPAG(term.beta, term.heads, attn.heads)
    else:
        processor = FluxAttentionPAG(term.beta, term.heads, attn.heads,
                                     n_image=inputs.flux_image_tokens())
    _set_processor(stack, attn, processor)


# ----------------------------------------------------------------------------------- SEG


def _install_seg(stack, inputs: BranchInputs, term: SEG, layer: Layer) -> None:
    model, family = inputs.model, inputs.family
    block = model.get_submodule(layer.path)
    attn = block.attn1 if family == "unet" else block.attn
    _check_stock_processor(family, attn, "SEG")

    grid: dict = {}
    if family == "unet":
        # the token grid is the spatial size of the hidden state entering the Transformer2DModel
        transformer = model.get_submodule(layer.path.rsplit(".transformer_blocks.", 1)[0])

        def capture_grid(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            grid["hw"] = tuple(hidden.shape[-2:])

        _hook(stack, transformer, capture_grid, pre=True, with_kwargs=True)
    elif family == "sd3":
        grid["hw"] = inputs.sd3_grid()
    else:
        grid["hw"] = inputs.flux_grid()

    def perturb_query(module, args, query):
        height, width = grid["hw"]
        n_image = height * width
        if query.shape[1] < n_image:
            raise ValueError(f"reference SEG: {query.shape[1]} query tokens at {layer.path}, "
                             f"expected {n_image} image tokens ({height}x{width})")
        # image tokens: all of them, except in FLUX single blocks where text comes first
        split = query.shape[1] - n_image
        text, image = query[:, :split], query[:, split:]
        if split and not (family == "flux" and layer.part == "single"):
            raise ValueError(f"reference SEG: unexpected token count at {layer.path}")
        if term.infinite:
            image = mean_queries(image)
        else:
            image = blur_grid(image, height, width, term.sigma)
        return torch.cat([text, image], dim=1)

    _hook(stack, attn.to_q, perturb_query)


# ----------------------------------------------------------------------------------- TPG


def tpg_permutation(seed: int, layer: Layer, n_tokens: int, device) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(seed + layer.position)
    return torch.randperm(n_tokens, generator=generator).to(device)


def _install_tpg(stack, inputs: BranchInputs, term: TPG, layer: Layer, seed: int) -> None:
    block = inputs.model.get_submodule(layer.path)

    if inputs.family == "unet":
        def make(inner, signature):
            def forward(*args, **kwargs):
                bound = signature.bind(*args, **kwargs)
                hidden = bound.arguments["hidden_states"]
                perm = tpg_permutation(seed, layer, hidden.shape[1], hidden.device)
                bound.arguments["hidden_states"] = hidden[:, perm]    # never undone
                return inner(*bound.args, **bound.kwargs)
            return forward
    else:
        def make(inner, signature):
            def forward(*args, **kwargs):
                bound = signature.bind(*args, **kwargs)
                image = bound.arguments["hidden_states"]
                perm = tpg_permutation(seed, layer, image.shape[1], image.device)
                permuted = image[:, perm]
                bound.arguments["hidden_states"] = permuted
                text_out, image_out = inner(*bound.args, **bound.kwargs)
                # the residual update computed on permuted tokens lands on unpermuted positions
                return text_out, image + (image_out - permuted)
            return forward

    _wrap_forward(stack, block, make)


# ----------------------------------------------------------------------------------- SLG


def _install_slg(stack, inputs: BranchInputs, term: SLG, layer: Layer) -> None:
    block = inputs.model.get_submodule(layer.path)
    family = inputs.family

    if term.skip == "block":
        def make(inner, signature):
            def forward(*args, **kwargs):
                bound = signature.bind(*args, **kwargs)
                image = bound.arguments["hidden_states"]
                if family == "unet":
                    return image
                text = bound.arguments["encoder_hidden_states"]
                if family == "sd3" and block.context_pre_only:
                    text = None
                return text, image
            return forward

        _wrap_forward(stack, block, make)
        return

    if term.skip == "attn":
        if family == "unet":
            modules = [block.attn1, block.attn2]
        elif family == "sd3":
            modules = [block.attn, block.attn2]
        else:
            modules = [block.attn]     # double: both streams; single: the attention half
    else:  # "ff"
        if family == "unet":
            modules = [block.ff]
        elif layer.part == "single":
            modules = [block.act_mlp]  # the MLP half enters proj_out as zeros
        else:
            modules = [block.ff, block.ff_context]
    for module in modules:
        if module is not None:
            _hook(stack, module, _return_zeros)


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
