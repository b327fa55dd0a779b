"""SD3Transformer2DModel (SD3, SD3.5) in the reference oracle.

- Joint attention ``attn`` (stock ``JointAttnProcessor2_0``), sequence [image, text]. PAG: the
  MM-DiT map on the image query rows. SEG: the image queries on the latent grid / patch size.
- SLG "attn" zeroes ``attn`` and SD3.5's ``attn2``; "ff" both streams' feed-forwards.
- NAG (dit.py): the stock blocks broadcast the batch-1 temb (and image stream) against the 2-row
  text stream, so the negative text is modulated with the positive row's temb. This is the
  authors' SD3 pipeline: it concatenates the positive pooled projection again for the NAG rows
  and never uses the negative one.
"""
from __future__ import annotations

import torch

from ..attention import (NAGSetting, PAGProcessor, joint_attention, merge_heads, nag_combine,
                         split_heads)
from .dit import DiTFamily


def sd3_projections(attn, hidden_states, encoder_hidden_states):
    """JointAttnProcessor2_0's head-split projections: image q, k, v then text q, k, v, with the
    block's qk-norms applied."""
    split = lambda t: split_heads(t, attn.heads)
    query, key, value = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    text = encoder_hidden_states
    t_query, t_key, t_value = split(attn.add_q_proj(text)), split(attn.add_k_proj(text)), split(attn.add_v_proj(text))
    if attn.norm_added_q is not None:
        t_query = attn.norm_added_q(t_query)
    if attn.norm_added_k is not None:
        t_key = attn.norm_added_k(t_key)
    return query, key, value, t_query, t_key, t_value


class SD3JointAttentionPAG(PAGProcessor):
    """SD3 joint attention as ``JointAttnProcessor2_0`` computes it (qk-norm included), with the
    MM-DiT PAG map mixed into the image query rows. Sequence order: [image, text]."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):
        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError("reference PAG: SD3 joint attention needs the text stream, no mask")
        n_img = hidden_states.shape[1]
        query, key, value, t_query, t_key, t_value = sd3_projections(attn, hidden_states, encoder_hidden_states)
        query = torch.cat([query, t_query], dim=2)
        key = torch.cat([key, t_key], dim=2)
        value = torch.cat([value, t_value], dim=2)
        length = query.shape[2]
        image, text = slice(0, n_img), slice(n_img, length)

        out = joint_attention(query, key, value, image, text, self)
        out = merge_heads(out).to(query.dtype)
        img_out, txt_out = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            txt_out = attn.to_add_out(txt_out)
        img_out = attn.to_out[1](attn.to_out[0](img_out))
        return img_out, txt_out


class SD3JointAttentionNAG:
    """SD3 joint attention (``JointAttnProcessor2_0``, qk-norm included) for a batch-1 image
    stream and a 2-row text stream [positive, negative]. Row r attends over [image, text r]; the
    image output is NAG(Zp = row 0, Zn = row 1), each text row keeps its own output."""

    def __init__(self, setting: NAGSetting, pag: SD3JointAttentionPAG | None = None):
        self.setting = setting
        self.pag = pag

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):
        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError("reference NAG: SD3 joint attention needs the text stream, no mask")
        if hidden_states.shape[0] != 1 or encoder_hidden_states.shape[0] != 2:
            raise ValueError("reference NAG: SD3 joint attention expects 1 image row and 2 text "
                             f"rows, got {hidden_states.shape[0]} and "
                             f"{encoder_hidden_states.shape[0]}")
        n_img = hidden_states.shape[1]
        query, key, value, t_query, t_key, t_value = sd3_projections(attn, hidden_states, encoder_hidden_states)

        def rows(image_part, text_part):                  # (2, H, n_img + T, d)
            return torch.cat([image_part.expand(2, -1, -1, -1), text_part], dim=2)

        query, key, value = rows(query, t_query), rows(key, t_key), rows(value, t_value)
        length = query.shape[2]
        out = joint_attention(query, key, value, slice(0, n_img), slice(n_img, length), self.pag)
        out = merge_heads(out).to(query.dtype)
        image = nag_combine(out[0:1, :n_img], out[1:2, :n_img], self.setting)
        text = out[:, n_img:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        image = attn.to_out[1](attn.to_out[0](image))
        return image, text


class SD3Family(DiTFamily):
    name = "sd3"
    stock_processors = ("JointAttnProcessor2_0",)
    nag_alpha = 0.125

    def pag_processor(self, term, attn, layer, inputs):
        return SD3JointAttentionPAG(term.beta, term.heads, attn.heads)

    def image_grid(self, stack, inputs, layer):
        patch = inputs.model.config.patch_size
        height, width = inputs.sample.shape[-2:]
        grid = (height // patch, width // patch)
        return lambda: grid

    def skipped(self, block, arguments):
        text, image = super().skipped(block, arguments)
        return (None if block.context_pre_only else text), image

    def skipped_sublayers(self, block, layer, skip):
        return [block.attn, block.attn2] if skip == "attn" else [block.ff, block.ff_context]

    def install_nag_attention(self, stack, model, setting, negative, kwargs, row, text):
        return self.set_nag_processors(stack, model.transformer_blocks, SD3JointAttentionPAG,
                                       lambda pag: SD3JointAttentionNAG(setting, pag))
