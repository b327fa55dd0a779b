"""WanTransformer3DModel (Wan 2.1 / 2.2) in the reference oracle.

Written from shared/methods.md and diffusers' stock WanTransformerBlock / WanAttnProcessor.

- PAG / SEG perturb a block's self-attention ``attn1`` (stock ``WanAttnProcessor``). PAG's map
  is the identity, so a fully perturbed head outputs V. SEG (the shared hook on ``to_q``, before
  the qk-norm and the rotary embedding) blurs each latent frame on its own (rows, cols) grid:
  image_grid gives (frames, rows, cols) after the 3-D patch embedding.
- TPG: the block runs on tokens permuted within each frame (token_groups = frames), and its
  residual update lands on the unpermuted tokens, ``x + (block(P x) - P x)``, as on the other
  DiTs. SLG "block" returns the block's input; "attn" zeroes ``attn1``, "ff" zeroes ``ffn``.
- NAG: every block's cross-attention ``attn2`` gets ``WanCrossAttentionNAG``: the video queries
  attend to the positive text and to the negative text (the negative prompt's UMT5 embeddings
  through the model's own ``condition_embedder.text_embedder``, then this layer's to_k / norm_k /
  to_v), combined per token before ``to_out``. The whole batch runs at once.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..attention import NAGSetting, PAGProcessor, attention, nag_combine
from ..hooks import set_processor
from .base import Family, negative_input


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, heads*d) -> (B, heads, L, d)."""
    return x.view(x.shape[0], x.shape[1], heads, -1).permute(0, 2, 1, 3)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, d) -> (B, L, heads*d)."""
    return x.permute(0, 2, 1, 3).flatten(2)


def _rotary(x: torch.Tensor, rotary) -> torch.Tensor:
    """Rotate (B, heads, L, d) by Wan's rotary embedding (cos, sin), each (1, L, 1, d) with every
    frequency repeated for both members of an adjacent channel pair (2i, 2i+1):
    x' = x cos + rot(x) sin, rot(x)_(2i) = -x_(2i+1), rot(x)_(2i+1) = x_(2i)."""
    cos, sin = (t.permute(0, 2, 1, 3) for t in rotary)     # -> (1, 1, L, d)
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rot = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(x.shape)
    return (x.double() * cos.double() + rot.double() * sin.double()).to(x.dtype)


def _check_attention(attn, what):
    if getattr(attn, "add_k_proj", None) is not None:
        raise ValueError(f"reference {what}: Wan image-to-video attention is not supported")


class WanSelfAttentionPAG(PAGProcessor):
    """``attn1`` as ``WanAttnProcessor`` computes it (qk rms-norm over all heads, rotary
    embedding), with A -> I mixed in per head."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or rotary_emb is None:
            raise ValueError("reference PAG: Wan attn1 must be a plain self-attention with rotary embedding")
        _check_attention(attn, "PAG")
        value = _heads(attn.to_v(hidden_states), attn.heads)
        if self.pure:
            out = value
        else:
            query = _rotary(_heads(attn.norm_q(attn.to_q(hidden_states)), attn.heads), rotary_emb)
            key = _rotary(_heads(attn.norm_k(attn.to_k(hidden_states)), attn.heads), rotary_emb)
            out = self.mix(attention(query, key, value), value)
        out = _merge(out).to(value.dtype)
        return attn.to_out[1](attn.to_out[0](out))


class WanCrossAttentionNAG:
    """``attn2`` as ``WanAttnProcessor`` computes it for text-only cross-attention, with NAG
    before ``to_out`` (``negative_text``: already through the text embedder)."""

    def __init__(self, setting: NAGSetting, negative_text: torch.Tensor):
        self.setting = setting
        self.negative_text = negative_text

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None, **kwargs):
        if encoder_hidden_states is None or attention_mask is not None or rotary_emb is not None:
            raise ValueError("reference NAG: Wan attn2 must be a plain cross-attention")
        _check_attention(attn, "NAG")
        batch = hidden_states.shape[0]
        negative = self.negative_text.to(device=encoder_hidden_states.device, dtype=encoder_hidden_states.dtype)
        if negative.shape[0] not in (1, batch):
            raise ValueError(f"reference NAG: negative text has batch {negative.shape[0]}, expected 1 or {batch}")
        negative = negative.expand(batch, *negative.shape[1:])
        query = _heads(attn.norm_q(attn.to_q(hidden_states)), attn.heads)

        def attend(text):
            key = _heads(attn.norm_k(attn.to_k(text)), attn.heads)
            value = _heads(attn.to_v(text), attn.heads)
            return _merge(attention(query, key, value)).to(query.dtype)

        out = nag_combine(attend(encoder_hidden_states), attend(negative), self.setting)
        return attn.to_out[1](attn.to_out[0](out))


class WanFamily(Family):
    name = "wan"
    stock_processors = ("WanAttnProcessor",)
    nag_alpha = 0.25

    def attention(self, block):
        return block.attn1

    def pag_processor(self, term, attn, layer, inputs):
        return WanSelfAttentionPAG(term.beta, term.heads, attn.heads)

    @staticmethod
    def _frames_grid(inputs) -> tuple[int, int, int]:
        p_t, p_h, p_w = inputs.model.config.patch_size
        frames, height, width = inputs.sample.shape[-3:]
        return frames // p_t, height // p_h, width // p_w

    def image_grid(self, stack, inputs, layer):
        grid = self._frames_grid(inputs)
        return lambda: grid

    def token_groups(self, inputs, layer):
        return self._frames_grid(inputs)[0]

    def shuffled(self, run, arguments, shuffle):
        tokens = arguments["hidden_states"]
        permuted = shuffle(tokens)
        arguments["hidden_states"] = permuted
        return tokens + (run() - permuted)

    def skipped(self, block, arguments):
        return arguments["hidden_states"]

    def skipped_sublayers(self, block, layer, skip):
        return [block.attn1] if skip == "attn" else [block.ffn]

    def install_nag(self, stack, model: nn.Module, setting, negative, kwargs, row):
        text = negative_input(negative, "encoder_hidden_states", row)
        with torch.no_grad():
            embedded = model.condition_embedder.text_embedder(text)
        attns = []
        for block in model.blocks:
            self.check_processor(block.attn2, "NAG")
            set_processor(stack, block.attn2, WanCrossAttentionNAG(setting, embedded))
            attns.append(block.attn2)
        return attns
