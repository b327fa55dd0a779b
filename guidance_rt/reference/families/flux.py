"""FluxTransformer2DModel (FLUX.1) in the reference oracle.

- Attention ``attn`` (stock ``FluxAttnProcessor``: qk-norm, rotary), sequence [text, image]:
  double blocks pass the text stream separately, single blocks pass the concatenation, whose
  last ``n_image`` tokens are the image (``n_image`` and the grid come from img_ids). PAG: the
  MM-DiT map on the image query rows, after qk-norm and rotary.
- SLG "attn" zeroes ``attn`` (double: both streams; single: the attention half); "ff" zeroes
  both streams' feed-forwards, in single blocks ``act_mlp`` (the MLP half enters proj_out as
  zeros).
- NAG (dit.py) follows the authors' NAGFluxTransformer2DModel and pipeline_flux_nag.py: the
  pipeline concatenates the negative prompt's pooled projection, so temb has a second row,
  time_text_embed(same timestep, same guidance, negative pooled) (a pre-hook on
  ``time_text_embed``), and their Trunc* norms give every AdaLayerNormZero /
  AdaLayerNormContinuous only its input's rows of temb: the image stream of the double blocks
  and ``norm_out`` (1 row) use the positive row, the text stream's norm1_context (2 rows)
  modulates the negative text with the negative row. Row 1 of the attention is [negative text,
  image] with rotary ids cat(negative txt_ids, img_ids). Single blocks: a pre-hook on the first
  one tiles the image stream to 2 rows, so row 1 is its own sequence, modulated
  (AdaLayerNormZeroSingle, not truncated) by the negative temb; its image tokens drift from row
  0's although the processor gives both rows' image tokens the combined output; a hook on the
  last one keeps row 0. SEG's to_q hook blurs each row's own image queries there.
"""
from __future__ import annotations

import inspect

import torch

from ..attention import NAGSetting, PAGProcessor, joint_attention, merge_heads, nag_combine
from ..hooks import hook
from .base import negative_input
from .dit import DiTFamily


def flux_grid(kwargs: dict) -> tuple[int, int]:
    """(rows, cols) of the FLUX image tokens from img_ids (row-major order)."""
    ids = kwargs.get("img_ids")
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


def flux_projections(what: str, attn, hidden_states, encoder_hidden_states, attention_mask):
    """FluxAttnProcessor's projections in its (R, L, H, d) layout, qk-norms applied: q, k, v of
    ``hidden_states``, and the text stream's (t_q, t_k, t_v) in a double block (else None).
    ``what`` (PAG / NAG) names the processor in the errors of calls it does not support."""
    if attention_mask is not None:
        raise ValueError(f"reference {what}: FLUX attention with a mask is not supported")
    if getattr(attn, "fused_projections", False):
        raise ValueError(f"reference {what}: fused qkv projections are not supported")

    def heads(x):  # (R, L, H*d) -> (R, L, H, d), the stock layout
        return x.unflatten(-1, (-1, attn.head_dim))

    query = attn.norm_q(heads(attn.to_q(hidden_states)))
    key = attn.norm_k(heads(attn.to_k(hidden_states)))
    value = heads(attn.to_v(hidden_states))
    if encoder_hidden_states is None or attn.added_kv_proj_dim is None:
        return query, key, value, None
    text = encoder_hidden_states
    return query, key, value, (attn.norm_added_q(heads(attn.add_q_proj(text))),
                               attn.norm_added_k(heads(attn.add_k_proj(text))),
                               heads(attn.add_v_proj(text)))


def _text_tokens(hidden_states, n_image: int, what: str) -> int:
    """A single block's text tokens: its sequence [text, image] less the image tokens."""
    n_text = hidden_states.shape[1] - n_image
    if n_text < 0:
        raise ValueError(f"reference {what}: FLUX single block shorter than the image tokens")
    return n_text


def negative_ids(negative: dict, kwargs: dict, row, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NAG's (txt_ids, img_ids), 2-D: the negative prompt's text ids (its row `row`) and the
    branch's image ids, checked against the negative text's length."""
    txt_ids = negative.get("txt_ids")
    img_ids = kwargs.get("img_ids")
    if txt_ids is None or img_ids is None:
        raise ValueError("reference NAG: FLUX needs txt_ids in `negative` and img_ids in the branch kwargs")
    if txt_ids.ndim == 3:
        txt_ids = txt_ids[row if row is not None and txt_ids.shape[0] > 1 else 0]
    if img_ids.ndim == 3:
        img_ids = img_ids[0]
    if txt_ids.shape[0] != text.shape[1]:
        raise ValueError(f"reference NAG: negative txt_ids ({txt_ids.shape[0]}) do not match "
                         f"its {text.shape[1]} text tokens")
    return txt_ids, img_ids


class FluxAttentionPAG(PAGProcessor):
    """FLUX attention as ``FluxAttnProcessor`` computes it (qk-norm, rotary), with the MM-DiT PAG
    map mixed into the image query rows. Sequence order: [text, image]."""

    def __init__(self, beta, heads, num_heads, n_image: int):
        super().__init__(beta, heads, num_heads)
        self.n_image = n_image

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        query, key, value, text_qkv = flux_projections("PAG", attn, hidden_states,
                                                       encoder_hidden_states, attention_mask)
        joint = text_qkv is not None
        if joint:
            t_query, t_key, t_value = text_qkv
            query = torch.cat([t_query, query], dim=1)
            key = torch.cat([t_key, key], dim=1)
            value = torch.cat([t_value, value], dim=1)
            n_text = encoder_hidden_states.shape[1]
        else:
            n_text = _text_tokens(hidden_states, self.n_image, "PAG")
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))   # (B, H, L, d)
        length = query.shape[2]
        text, image = slice(0, n_text), slice(n_text, length)

        out = joint_attention(query, key, value, image, text, self)
        out = merge_heads(out).to(query.dtype)

        if joint:
            txt_out, img_out = out[:, :n_text], out[:, n_text:]
            img_out = attn.to_out[1](attn.to_out[0](img_out.contiguous()))
            txt_out = attn.to_add_out(txt_out.contiguous())
            return img_out, txt_out
        return out


def _rotary_rows(x: torch.Tensor, rotaries) -> torch.Tensor:
    """Apply a different rotary embedding to each row of x (R, L, H, d)."""
    from diffusers.models.embeddings import apply_rotary_emb

    return torch.cat([apply_rotary_emb(x[i:i + 1], rot, sequence_dim=1)
                      for i, rot in enumerate(rotaries)], dim=0)


class FluxAttentionNAG:
    """FLUX attention (``FluxAttnProcessor``: qk-norm, rotary) for the two sequences of a
    positive row: row 0 = [positive text, image] with the model's rotary, row 1 = [negative
    text, image] with ``negative_rotary`` (ids cat(negative txt_ids, img_ids)).

    Double blocks: image stream (1, N, D), text stream (2, T, D); returns the NAG image output
    (1, N, D) after to_out and both text rows after to_add_out. Single blocks: (2, T + N, D), each
    row its own sequence (row 1's image tokens are the negative sequence's, queries included);
    returns both rows with the NAG image output in each."""

    def __init__(self, setting: NAGSetting, negative_rotary, n_image: int,
                 pag: FluxAttentionPAG | None = None):
        self.setting = setting
        self.negative_rotary = negative_rotary
        self.n_image = n_image
        self.pag = pag

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        query, key, value, text_qkv = flux_projections("NAG", attn, hidden_states,
                                                       encoder_hidden_states, attention_mask)
        joint = text_qkv is not None
        if joint:
            if hidden_states.shape[0] != 1 or encoder_hidden_states.shape[0] != 2:
                raise ValueError("reference NAG: FLUX double block expects 1 image row and 2 "
                                 f"text rows, got {hidden_states.shape[0]} and "
                                 f"{encoder_hidden_states.shape[0]}")
            t_query, t_key, t_value = text_qkv

            def rows(text_part, image_part):              # (2, T + N, H, d)
                return torch.cat([text_part, image_part.expand(2, -1, -1, -1)], dim=1)

            query, key, value = rows(t_query, query), rows(t_key, key), rows(t_value, value)
            n_text = encoder_hidden_states.shape[1]
        else:
            if hidden_states.shape[0] != 2:
                raise ValueError("reference NAG: FLUX single block expects 2 rows (positive and "
                                 f"negative sequence), got {hidden_states.shape[0]}")
            n_text = _text_tokens(hidden_states, self.n_image, "NAG")
        if image_rotary_emb is not None:
            rotaries = (image_rotary_emb, self.negative_rotary)
            query, key = _rotary_rows(query, rotaries), _rotary_rows(key, rotaries)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))   # (2, H, L, d)
        length = query.shape[2]
        out = joint_attention(query, key, value, slice(n_text, length), slice(0, n_text),
                              self.pag)
        out = merge_heads(out).to(query.dtype)
        image = nag_combine(out[0:1, n_text:], out[1:2, n_text:], self.setting)
        if joint:
            text = attn.to_add_out(out[:, :n_text].contiguous())
            image = attn.to_out[1](attn.to_out[0](image.contiguous()))
            return image, text
        return torch.cat([out[:, :n_text], image.expand(2, -1, -1)], dim=1)


class FluxFamily(DiTFamily):
    name = "flux"
    stock_processors = ("FluxAttnProcessor", "FluxAttnProcessor2_0")
    nag_alpha = 0.25
    unbatched = ("txt_ids", "img_ids")    # 2-D position ids, one set for every sample

    def pag_processor(self, term, attn, layer, inputs):
        return FluxAttentionPAG(term.beta, term.heads, attn.heads,
                                n_image=inputs.kwargs["img_ids"].shape[-2])

    def image_grid(self, stack, inputs, layer):
        grid = flux_grid(inputs.kwargs)
        return lambda: grid

    def text_before_image(self, layer):
        return layer.part == "single"

    def skipped_sublayers(self, block, layer, skip):
        if skip == "attn":
            return [block.attn]
        if layer.part == "single":
            return [block.act_mlp]
        return [block.ff, block.ff_context]

    def install_nag_attention(self, stack, model, setting, negative, kwargs, row, text):
        from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero

        txt_ids, img_ids = negative_ids(negative, kwargs, row, text)
        with torch.no_grad():
            negative_rotary = model.pos_embed(torch.cat([txt_ids.to(img_ids), img_ids], dim=0))
        n_image = img_ids.shape[0]
        pooled = negative_input(negative, "pooled_projections", row)
        if pooled.shape[0] != 1:
            raise ValueError("reference NAG: SD3 / FLUX run one sample at a time; pick a row")

        def add_negative_temb(module, args):
            # (timestep, [guidance,] pooled), each already scaled by the model: the pipeline's
            # cat([pooled, negative pooled]) with the timestep and guidance expanded to both rows
            *times, positive = args
            if positive.shape[0] != 1:
                raise ValueError("reference NAG: SD3 / FLUX positive forwards must be batch 1")
            return tuple(x.reshape(-1).expand(2) for x in times) + (
                torch.cat([positive, pooled.to(positive)]),)

        hook(stack, model.time_text_embed, add_negative_temb, pre=True)

        def input_rows_of_temb(module, args, kwargs):
            # the authors' TruncAdaLayerNormZero / TruncAdaLayerNormContinuous: emb[:len(x)]
            bound = inspect.signature(module.forward).bind(*args, **kwargs)
            name = "emb" if isinstance(module, AdaLayerNormZero) else "conditioning_embedding"
            emb = bound.arguments.get(name)
            if emb is not None:
                bound.arguments[name] = emb[:bound.arguments["x"].shape[0]]
            return bound.args, bound.kwargs

        for module in model.modules():
            if isinstance(module, (AdaLayerNormZero, AdaLayerNormContinuous)):
                hook(stack, module, input_rows_of_temb, pre=True, with_kwargs=True)
        blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
        attns = self.set_nag_processors(
            stack, blocks, FluxAttentionPAG,
            lambda pag: FluxAttentionNAG(setting, negative_rotary, n_image, pag))

        singles = model.single_transformer_blocks
        if len(singles):
            def tile_image(module, args, kwargs_):
                if "hidden_states" in kwargs_:
                    image = kwargs_["hidden_states"]
                    return args, {**kwargs_, "hidden_states": image.expand(2, -1, -1)}
                return (args[0].expand(2, -1, -1),) + tuple(args[1:]), kwargs_

            def keep_positive(module, args, kwargs_, output):
                text_out, image_out = output
                return text_out[:1], image_out[:1]

            hook(stack, singles[0], tile_image, pre=True, with_kwargs=True)
            hook(stack, singles[-1], keep_positive, with_kwargs=True)
        return attns
