"""Flux2Transformer2DModel (FLUX.2) in the reference oracle.

- Double blocks: ``attn`` is a Flux2Attention (stock ``Flux2AttnProcessor``: qk-norm, rotary,
  sequence [text, image], text passed separately); it has FLUX.1's projections, so the FLUX
  reference processors (flux.py: PAG's MM-DiT map on the image query rows, NAG) serve it as they
  are. SLG "attn" zeroes ``attn`` (both streams), "ff" both feed-forwards.
- Single blocks: ``attn`` is a Flux2ParallelSelfAttention (stock
  ``Flux2ParallelSelfAttnProcessor``): one ``to_qkv_mlp_proj`` gives [q | k | v | mlp in], the
  model calls the block with the concatenation [text, image] and it returns that sequence.
  PAG: ``Flux2ParallelPAG`` below (the processor re-written from the stock one, MM-DiT map on the
  image query rows). SEG: the hook on ``to_qkv_mlp_proj`` changes only its query columns. TPG /
  SLG "block": the image tokens are the last ``n_image`` (from img_ids) of ``hidden_states``.
  SLG "attn": a pre-hook on ``attn.to_out`` zeroes the attention columns of its input
  cat([attention, mlp]); "ff": ``attn.mlp_act_fn`` outputs zeros (the MLP half enters to_out as
  zeros).
- NAG (methods.md 5, the FLUX form): the positive forward runs one sample at a time with the
  negative text as row 1 of the text stream (dit.py). FLUX.2's modulation is shared and has no
  pooled text, so both rows use the model's (batch 1) modulation as is. Double blocks: row 1 of
  the attention is [negative text, image] with rotary ids (negative txt_ids, img_ids). A forward
  hook on the last double block tiles the image stream to 2 rows, so that the model's
  concatenation gives each row its own single-block sequence; single blocks run
  ``Flux2ParallelNAG`` (both rows' image tokens get the combined output); a hook on the last
  single block keeps row 0.
"""
from __future__ import annotations

import torch

from ..attention import NAGSetting, PAGProcessor, joint_attention, merge_heads, nag_combine
from ..hooks import hook, return_zeros
from .dit import DiTFamily
from .flux import FluxAttentionNAG, FluxAttentionPAG, flux_grid, negative_ids


def _parallel_projections(what: str, attn, hidden_states, attention_mask):
    """Flux2ParallelSelfAttnProcessor's projections: q, k (qk-normed), v in (R, L, H, d) and the
    MLP input, from the one fused projection."""
    if attention_mask is not None:
        raise ValueError(f"reference {what}: FLUX.2 attention with a mask is not supported")
    fused = attn.to_qkv_mlp_proj(hidden_states)
    inner = attn.inner_dim
    q, k, v = (fused[..., i * inner:(i + 1) * inner].unflatten(-1, (-1, attn.head_dim)) for i in range(3))
    return attn.norm_q(q), attn.norm_k(k), v, fused[..., 3 * inner:]


def _rotate(x, rotary):
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, rotary, sequence_dim=1)


def _finish(attn, out, mlp):
    """The single block's fused output projection of cat([attention, activated mlp])."""
    return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


class Flux2ParallelPAG(PAGProcessor):
    """Flux2ParallelSelfAttnProcessor with the MM-DiT PAG map mixed into the image query rows of
    [text, image] (the last ``n_image`` tokens)."""

    def __init__(self, beta, heads, num_heads, n_image: int):
        super().__init__(beta, heads, num_heads)
        self.n_image = n_image

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        q, k, v, mlp = _parallel_projections("PAG", attn, hidden_states, attention_mask)
        if image_rotary_emb is not None:
            q, k = _rotate(q, image_rotary_emb), _rotate(k, image_rotary_emb)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        length = q.shape[2]
        n_text = length - self.n_image
        out = joint_attention(q, k, v, slice(n_text, length), slice(0, n_text), self)
        return _finish(attn, merge_heads(out).to(q.dtype), mlp)


class Flux2ParallelNAG:
    """Flux2ParallelSelfAttnProcessor on the two sequences of a positive sample: row 0 = [text,
    image] with the model's rotary, row 1 = [negative text, its image tokens] with
    ``negative_rotary``; the image tokens of both rows get nag_combine(row 0, row 1)."""

    def __init__(self, setting: NAGSetting, negative_rotary, n_image: int, pag: Flux2ParallelPAG | None = None):
        self.setting = setting
        self.negative_rotary = negative_rotary
        self.n_image = n_image
        self.pag = pag

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        if hidden_states.shape[0] != 2:
            raise ValueError("reference NAG: FLUX.2 single block expects 2 rows (positive and negative "
                             f"sequence), got {hidden_states.shape[0]}")
        q, k, v, mlp = _parallel_projections("NAG", attn, hidden_states, attention_mask)
        if image_rotary_emb is not None:
            rotaries = (image_rotary_emb, self.negative_rotary)
            q = torch.cat([_rotate(q[i:i + 1], r) for i, r in enumerate(rotaries)])
            k = torch.cat([_rotate(k[i:i + 1], r) for i, r in enumerate(rotaries)])
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        length = q.shape[2]
        n_text = length - self.n_image
        out = joint_attention(q, k, v, slice(n_text, length), slice(0, n_text), self.pag)
        out = merge_heads(out).to(q.dtype)
        image = nag_combine(out[0:1, n_text:], out[1:2, n_text:], self.setting)
        out = torch.cat([out[:, :n_text], image.expand(2, -1, -1)], dim=1)
        return _finish(attn, out, mlp)


def _n_image(inputs) -> int:
    ids = inputs.kwargs.get("img_ids")
    if ids is None:
        raise ValueError("reference: FLUX.2 needs img_ids in the branch kwargs")
    return ids.shape[-2]


def _single(arguments: dict) -> bool:
    return "temb_mod" in arguments


class Flux2Family(DiTFamily):
    name = "flux2"
    stock_processors = ("Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor")
    nag_alpha = 0.25
    unbatched = ("txt_ids", "img_ids")

    def pag_processor(self, term, attn, layer, inputs):
        if layer.part == "single":
            return Flux2ParallelPAG(term.beta, term.heads, attn.heads, n_image=_n_image(inputs))
        return FluxAttentionPAG(term.beta, term.heads, attn.heads, n_image=_n_image(inputs))

    def queries(self, attn):
        if hasattr(attn, "to_qkv_mlp_proj"):
            return attn.to_qkv_mlp_proj, slice(0, attn.inner_dim)
        return attn.to_q, None

    def image_grid(self, stack, inputs, layer):
        grid = flux_grid(inputs.kwargs)
        return lambda: grid

    def text_before_image(self, layer):
        return layer.part == "single"

    def shuffled_in(self, inputs, layer, run, arguments, shuffle):
        if not _single(arguments):
            return self.shuffled(run, arguments, shuffle)
        if arguments.get("encoder_hidden_states") is not None:
            raise ValueError("reference TPG: FLUX.2 single blocks are called with the joined sequence")
        sequence = arguments["hidden_states"]
        n_text = sequence.shape[1] - _n_image(inputs)
        text, image = sequence[:, :n_text], sequence[:, n_text:]
        permuted = shuffle(image)
        arguments["hidden_states"] = torch.cat([text, permuted], dim=1)
        out = run()
        # the residual update computed on permuted tokens lands on unpermuted positions
        return torch.cat([out[:, :n_text], image + (out[:, n_text:] - permuted)], dim=1)

    def skipped(self, block, arguments):
        if _single(arguments):
            return arguments["hidden_states"]
        return arguments["encoder_hidden_states"], arguments["hidden_states"]

    def skipped_sublayers(self, block, layer, skip):
        if skip == "attn":
            return [block.attn]
        return [block.ff, block.ff_context]

    def install_skip(self, stack, block, layer, skip):
        if layer.part != "single":
            return super().install_skip(stack, block, layer, skip)
        attn = block.attn
        if skip == "ff":
            hook(stack, attn.mlp_act_fn, return_zeros)
            return

        def zero_attention(module, args):   # to_out's input is cat([attention, mlp])
            x = args[0]
            return (torch.cat([torch.zeros_like(x[..., :attn.inner_dim]), x[..., attn.inner_dim:]], dim=-1),)

        hook(stack, attn.to_out, zero_attention, pre=True)

    def install_nag_attention(self, stack, model, setting, negative, kwargs, row, text):
        txt_ids, img_ids = negative_ids(negative, kwargs, row, text)
        with torch.no_grad():   # as the model: each set of ids embedded on its own, text first
            t, i = model.pos_embed(txt_ids.to(img_ids)), model.pos_embed(img_ids)
            negative_rotary = (torch.cat([t[0], i[0]]), torch.cat([t[1], i[1]]))
        n_image = img_ids.shape[0]
        attns = self.set_nag_processors(stack, model.transformer_blocks, FluxAttentionPAG,
                                        lambda pag: FluxAttentionNAG(setting, negative_rotary, n_image, pag))
        attns += self.set_nag_processors(stack, model.single_transformer_blocks, Flux2ParallelPAG,
                                         lambda pag: Flux2ParallelNAG(setting, negative_rotary, n_image, pag))
        if len(model.single_transformer_blocks):
            def tile_image(module, args, output):   # the model joins [text (2 rows), image]
                text_out, image_out = output
                return text_out, image_out.expand(text_out.shape[0], -1, -1)

            def keep_positive(module, args, output):
                return output[:1]

            hook(stack, model.transformer_blocks[-1], tile_image)
            hook(stack, model.single_transformer_blocks[-1], keep_positive)
        return attns
