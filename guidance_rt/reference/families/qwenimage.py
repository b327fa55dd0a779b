"""QwenImageTransformer2DModel (Qwen-Image) in the reference oracle.

- Joint attention ``attn`` (stock ``QwenDoubleStreamAttnProcessor2_0``: qk RMS-norm, then the
  rotary embedding), sequence [text, image], the text keys masked by
  ``encoder_hidden_states_mask`` when the forward has one. PAG: the MM-DiT map on the image query
  rows (own image key + every valid text key), after qk-norm and rotary. SEG: ``to_q`` sees image
  tokens only; the grid is ``img_shapes``' (frames, rows, cols) of the first image.
- SLG "attn" zeroes ``attn`` (both streams); "ff" both streams' MLPs (``img_mlp``, ``txt_mlp``).
- NAG (one sample at a time): the negative prompt's text rides as a second row of the text
  stream. A pre-hook on the model pads the positive text (zeros, masked) and the negative one to
  a common length, so both rows have the same shape (padded keys get no weight; the rotary text
  positions start at 0 for both, as in their own forwards); a hook on ``txt_in`` appends
  ``txt_in(txt_norm(negative))``. The stock blocks broadcast the 1-row temb and image stream
  against the 2 text rows (so the negative text is modulated with the positive temb), and the
  NAG processor runs row r = [text r, image] with row r's key mask (the hook gives the forward
  the 2-row mask [positive, negative]), NAG-combines the image parts
  and gives each text row its own output.
- CFG: ``cfg_renorm``, QwenImagePipeline's true CFG rescales the guided prediction per token to
  the cond prediction's norm (oracle.step).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import NAGSetting, PAGProcessor, nag_combine
from ..hooks import hook, set_processor
from .base import negative_input
from .dit import DiTFamily

NEG = float("-inf")


def qwen_projections(attn, image, text, image_rope, text_rope):
    """The stock processor's projections as (R, H, L, d): image q, k, v, text q, k, v, with the
    qk-norms and the rotary embedding (complex freqs, consecutive channel pairs) applied."""
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    d = attn.inner_dim // attn.heads
    heads = lambda x: x.unflatten(-1, (-1, d))
    rot = lambda x, f: apply_rotary_emb_qwen(x, f, use_real=False)
    q = rot(attn.norm_q(heads(attn.to_q(image))), image_rope)
    k = rot(attn.norm_k(heads(attn.to_k(image))), image_rope)
    v = heads(attn.to_v(image))
    tq = rot(attn.norm_added_q(heads(attn.add_q_proj(text))), text_rope)
    tk = rot(attn.norm_added_k(heads(attn.add_k_proj(text))), text_rope)
    tv = heads(attn.add_v_proj(text))
    return tuple(t.transpose(1, 2) for t in (q, k, v, tq, tk, tv))


def masked_joint(q, k, v, n_text: int, text_mask, pag: PAGProcessor | None):
    """Attention of rows (R, H, n_text + n_image, d) with the text keys masked by text_mask
    (R, n_text) bool or None; with a PAG processor its MM-DiT map on the image query rows."""
    bias = None
    if text_mask is not None:
        full = torch.cat([text_mask, text_mask.new_ones(text_mask.shape[0], q.shape[2] - n_text)], 1)
        bias = full[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    if pag is None:
        return out
    work = torch.promote_types(q.dtype, torch.float32)
    qi, ki, vi = (t[:, :, n_text:].to(work) for t in (q, k, v))
    kt, vt = k[:, :, :n_text].to(work), v[:, :, :n_text].to(work)
    scale = q.shape[-1] ** -0.5
    self_logit = (qi * ki).sum(-1, keepdim=True) * scale
    text_logit = (qi @ kt.transpose(-1, -2)) * scale
    if text_mask is not None:
        text_logit = text_logit.masked_fill(~text_mask[:, None, None, :], NEG)
    p = torch.softmax(torch.cat([self_logit, text_logit], -1), -1)
    perturbed = (p[..., :1] * vi + p[..., 1:] @ vt).to(q.dtype)
    out = out.clone()
    out[:, :, n_text:] = pag.mix(out[:, :, n_text:], perturbed)
    return out


def _outputs(attn, out, n_text):
    out = out.transpose(1, 2).flatten(2, 3)
    text, image = out[:, :n_text], out[:, n_text:]
    return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(text)


class QwenJointAttentionPAG(PAGProcessor):
    """The stock Qwen joint attention with the MM-DiT PAG map mixed into the image query rows."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None or attention_mask is not None or image_rotary_emb is None:
            raise ValueError("reference PAG: Qwen joint attention needs the text stream and rotary, no mask")
        q, k, v, tq, tk, tv = qwen_projections(attn, hidden_states, encoder_hidden_states, *image_rotary_emb)
        n_text = tq.shape[2]
        mask = None if encoder_hidden_states_mask is None else encoder_hidden_states_mask.bool()
        out = masked_joint(torch.cat([tq, q], 2), torch.cat([tk, k], 2), torch.cat([tv, v], 2), n_text, mask, self)
        return _outputs(attn, out.to(q.dtype), n_text)


class QwenJointAttentionNAG:
    """Qwen joint attention for a 1-row image stream and a 2-row text stream [positive,
    negative]: row r attends over [text r, image] with row r's key mask; the image output is
    NAG(Zp = row 0, Zn = row 1), each text row keeps its own output."""

    def __init__(self, setting: NAGSetting, pag: QwenJointAttentionPAG | None):
        self.setting, self.pag = setting, pag

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        if hidden_states.shape[0] != 1 or encoder_hidden_states.shape[0] != 2 or attention_mask is not None:
            raise ValueError("reference NAG: Qwen joint attention expects 1 image row, 2 text rows, no mask")
        q, k, v, tq, tk, tv = qwen_projections(attn, hidden_states, encoder_hidden_states, *image_rotary_emb)
        n_text = tq.shape[2]
        both = lambda img, txt: torch.cat([txt, img.expand(2, -1, -1, -1)], 2)
        mask = encoder_hidden_states_mask.bool()   # (2, n_text): [positive, negative]
        out = masked_joint(both(q, tq), both(k, tk), both(v, tv), n_text, mask, self.pag).to(q.dtype)
        out = out.transpose(1, 2).flatten(2, 3)
        image = nag_combine(out[0:1, n_text:], out[1:2, n_text:], self.setting)
        return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(out[:, :n_text])


class QwenImageFamily(DiTFamily):
    name = "qwenimage"
    stock_processors = ("QwenDoubleStreamAttnProcessor2_0",)
    nag_alpha = 0.25
    unbatched = ("img_shapes",)
    cfg_renorm = True

    def pag_processor(self, term, attn, layer, inputs):
        return QwenJointAttentionPAG(term.beta, term.heads, attn.heads)

    def image_grid(self, stack, inputs, layer):
        shapes = inputs.kwargs.get("img_shapes")
        if shapes is None:
            raise ValueError("reference: Qwen-Image needs img_shapes in the branch kwargs")
        first = shapes[0][0] if isinstance(shapes[0], list) else shapes[0]
        grid = (int(first[1]), int(first[2]))
        return lambda: grid

    def skipped_sublayers(self, block, layer, skip):
        return [block.attn] if skip == "attn" else [block.img_mlp, block.txt_mlp]

    def install_nag(self, stack, model, setting, negative, kwargs, row):
        text = negative_input(negative, "encoder_hidden_states", row)
        nmask = negative.get("encoder_hidden_states_mask")
        if nmask is not None and row is not None and nmask.shape[0] > 1:
            nmask = nmask[row:row + 1]
        positive = kwargs["encoder_hidden_states"]
        length = max(positive.shape[1], text.shape[1])

        def padded(x, mask):
            n = x.shape[1]
            valid = torch.ones(1, n, dtype=torch.bool, device=x.device) if mask is None else mask.bool().to(x.device)
            x = torch.cat([x, x.new_zeros(1, length - n, x.shape[2])], 1)
            return x, torch.cat([valid, valid.new_zeros(1, length - n)], 1)

        neg_text, neg_mask = padded(text, nmask)
        with torch.no_grad():
            negative_stream = model.txt_in(model.txt_norm(neg_text.to(positive.dtype)))

        def pad_positive(module, args, kw):
            x = kw["encoder_hidden_states"]
            if x.shape[0] != 1:
                raise ValueError("reference NAG: Qwen-Image positive forwards must be batch 1")
            kw["encoder_hidden_states"], valid = padded(x, kw.get("encoder_hidden_states_mask"))
            # the model checks the mask against the text stream after txt_in: 2 rows by then
            kw["encoder_hidden_states_mask"] = torch.cat([valid, neg_mask.to(valid.device)], 0)
            return args, kw

        def add_negative_stream(module, args, output):
            return torch.cat([output, negative_stream.to(output.dtype)], dim=0)

        hook(stack, model, pad_positive, pre=True, with_kwargs=True)
        hook(stack, model.txt_in, add_negative_stream)
        attns = []
        for block in model.transformer_blocks:
            self.check_processor(block.attn, "NAG", (QwenJointAttentionPAG,))
            pag = block.attn.processor if isinstance(block.attn.processor, QwenJointAttentionPAG) else None
            set_processor(stack, block.attn, QwenJointAttentionNAG(setting, pag))
            attns.append(block.attn)
        return attns
