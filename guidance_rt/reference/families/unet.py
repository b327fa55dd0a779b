"""UNet2DConditionModel (SD1.5, SDXL) in the reference oracle.

- PAG / SEG perturb a BasicTransformerBlock's self-attention ``attn1`` (stock
  ``AttnProcessor2_0``); PAG's map is the identity, so its output is V. SEG's token grid is the
  spatial size of the hidden state entering the block's Transformer2DModel.
- TPG permutes the block's input image tokens, never undone: the Transformer2DModel's outer
  residual is added unpermuted. SLG "block" returns the block's input.
- NAG: every cross-attention ``attn2`` gets ``UNetCrossAttentionNAG``, which projects the negative
  text with that layer's to_k / to_v; the whole batch runs at once.
- S-CFG records ``attn1`` / ``attn2`` maps (reference/scfg.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ...layers import Layer
from ..attention import NAGSetting, PAGProcessor, attention, merge_heads, nag_combine, split_heads
from ..hooks import hook, set_processor
from .base import Family, negative_input


class UNetSelfAttentionPAG(PAGProcessor):
    """UNet ``attn1`` (self-attention) as ``AttnProcessor2_0`` computes it, with A -> I mixed in."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("reference PAG: UNet attn1 must be a plain self-attention (no mask)")
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise ValueError("reference PAG: unsupported attn1 configuration")
        residual = hidden_states
        value = split_heads(attn.to_v(hidden_states), attn.heads)
        if self.pure:
            out = value                                   # identity map: output = V
        else:
            query = split_heads(attn.to_q(hidden_states), attn.heads)
            key = split_heads(attn.to_k(hidden_states), attn.heads)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            out = self.mix(attention(query, key, value), value)
        out = merge_heads(out).to(value.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class UNetCrossAttentionNAG:
    """UNet ``attn2`` as ``AttnProcessor2_0`` computes it, with NAG before ``to_out``: the
    negative keys / values are this layer's to_k / to_v of the negative text embeddings."""

    def __init__(self, setting: NAGSetting, negative_text: torch.Tensor):
        self.setting = setting
        self.negative_text = negative_text

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError("reference NAG: UNet attn2 called without encoder_hidden_states")
        if attention_mask is not None:
            raise ValueError("reference NAG: attention masks are not supported")
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise ValueError("reference NAG: unsupported attn2 configuration")
        residual = hidden_states
        batch = hidden_states.shape[0]
        negative = self.negative_text.to(device=encoder_hidden_states.device,
                                         dtype=encoder_hidden_states.dtype)
        if negative.shape[0] not in (1, batch):
            raise ValueError(f"reference NAG: negative encoder_hidden_states has batch "
                             f"{negative.shape[0]}, expected 1 or {batch}")
        negative = negative.expand(batch, *negative.shape[1:])
        positive = encoder_hidden_states
        if attn.norm_cross:
            positive = attn.norm_encoder_hidden_states(positive)
            negative = attn.norm_encoder_hidden_states(negative)

        query = split_heads(attn.to_q(hidden_states), attn.heads)
        key_p = split_heads(attn.to_k(positive), attn.heads)
        value_p = split_heads(attn.to_v(positive), attn.heads)
        key_n = split_heads(attn.to_k(negative), attn.heads)
        value_n = split_heads(attn.to_v(negative), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key_p, key_n = attn.norm_k(key_p), attn.norm_k(key_n)
        zp = merge_heads(attention(query, key_p, value_p)).to(query.dtype)
        zn = merge_heads(attention(query, key_n, value_n)).to(query.dtype)
        out = nag_combine(zp, zn, self.setting)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _cross_attentions(model: nn.Module) -> list[nn.Module]:
    from diffusers.models.attention import BasicTransformerBlock

    found = []
    for module in model.modules():
        if isinstance(module, BasicTransformerBlock) and module.attn2 is not None:
            if getattr(module.attn2, "is_cross_attention", False):
                found.append(module.attn2)
    return found


class UNetFamily(Family):
    name = "unet"
    stock_processors = ("AttnProcessor2_0", "AttnProcessor")
    nag_alpha = 0.5
    semantic_maps = True
    # the NAG processor makes q / k as the stock one does: a cond forward's positive map
    semantic_map_processors = (UNetCrossAttentionNAG,)

    def attention(self, block):
        return block.attn1

    def pag_processor(self, term, attn, layer, inputs):
        if getattr(attn, "is_cross_attention", False):
            raise ValueError(f"reference PAG: {layer.path}.attn1 is not a self-attention")
        return UNetSelfAttentionPAG(term.beta, term.heads, attn.heads)

    def image_grid(self, stack, inputs, layer):
        grid = {}

        def capture_grid(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            grid["hw"] = tuple(hidden.shape[-2:])

        hook(stack, inputs.model.get_submodule(self.grid_path(layer)), capture_grid, pre=True,
             with_kwargs=True)
        return lambda: grid["hw"]

    def shuffled(self, run, arguments, shuffle):
        arguments["hidden_states"] = shuffle(arguments["hidden_states"])    # never undone
        return run()

    def skipped(self, block, arguments):
        return arguments["hidden_states"]

    def skipped_sublayers(self, block, layer, skip):
        return [block.attn1, block.attn2] if skip == "attn" else [block.ff]

    def install_nag(self, stack, model, setting, negative, kwargs, row):
        if getattr(model, "encoder_hid_proj", None) is not None:
            raise ValueError("reference NAG: UNets with encoder_hid_proj are not supported")
        attns = _cross_attentions(model)
        if not attns:
            raise ValueError("reference NAG: the UNet has no cross-attention layers")
        text = negative_input(negative, "encoder_hidden_states", row)
        for attn in attns:
            self.check_processor(attn, "NAG")
            set_processor(stack, attn, UNetCrossAttentionNAG(setting, text))
        return attns

    def grid_path(self, layer: Layer) -> str:
        # the Transformer2DModel holding the block
        return layer.path.rsplit(".transformer_blocks.", 1)[0]
