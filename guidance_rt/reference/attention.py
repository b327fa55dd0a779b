"""Attention pieces of the reference oracle, written from shared/methods.md sections 2-3.

Nothing here is shared with the packed runtime. Every function is plain PyTorch and favours
being obviously right over being fast.

- SEG: ``seg_kernel_size`` / ``gaussian_taps`` / ``blur_grid`` blur a query seen as a
  (h, w) image of C channels; ``mean_queries`` is the infinite blur.
- PAG / SoftPAG: three attention processors, one per model family, that reproduce the stock
  diffusers processor and replace the attention map of the selected heads by
  ``(1 - beta) A + beta A_pag``:
    * ``UNetSelfAttentionPAG`` (UNet ``attn1``, stock ``AttnProcessor2_0``): A_pag = identity, so
      the PAG output is V.
    * ``SD3JointAttentionPAG`` (SD3 ``attn``, stock ``JointAttnProcessor2_0``): sequence
      [image, text]; image queries see only their own image key and every text key.
    * ``FluxAttentionPAG`` (FLUX ``attn``, stock ``FluxAttnProcessor``): sequence [text, image]
      (single blocks get it already concatenated); same MM-DiT map, after qk-norm and rotary.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SEG_INFINITE_ABOVE = 9999.0

# the stock processors these re-implementations stand in for (checked before installing)
STOCK_PROCESSORS = {
    "unet": ("AttnProcessor2_0", "AttnProcessor"),
    "sd3": ("JointAttnProcessor2_0",),
    "flux": ("FluxAttnProcessor", "FluxAttnProcessor2_0"),
}


# ------------------------------------------------------------------------------------- SEG


def seg_kernel_size(sigma: float, extent: int) -> int:
    """Odd Gaussian kernel size ``ceil(6 sigma) + 1 - (ceil(6 sigma) mod 2)``, clamped to one axis
    of the token grid: ``k <= extent - (extent mod 2 - 1)``."""
    six = math.ceil(6.0 * sigma)
    k = six + 1 - six % 2
    return min(k, extent - (extent % 2 - 1))


def gaussian_taps(sigma: float, size: int) -> torch.Tensor:
    """float64 taps ``exp(-0.5 (x / sigma)^2)``, x = -(size-1)/2 .. (size-1)/2, summing to 1."""
    half = (size - 1) / 2.0
    x = torch.linspace(-half, half, steps=size, dtype=torch.float64)
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def blur_grid(tokens: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """Blur ``tokens`` (B, height*width, C), row-major on a (height, width) grid: every channel with
    the same 2-D Gaussian (outer product of the per-axis taps), reflect padding k//2 per axis."""
    batch, n, channels = tokens.shape
    if n != height * width:
        raise ValueError(f"SEG: {n} tokens do not fill a {height}x{width} grid")
    k_h, k_w = seg_kernel_size(sigma, height), seg_kernel_size(sigma, width)
    kernel = torch.outer(gaussian_taps(sigma, k_h), gaussian_taps(sigma, k_w))
    kernel = kernel.to(device=tokens.device, dtype=tokens.dtype)
    kernel = kernel.expand(channels, 1, k_h, k_w)
    image = tokens.transpose(1, 2).reshape(batch, channels, height, width)
    pad_h, pad_w = k_h // 2, k_w // 2
    if pad_h or pad_w:
        image = F.pad(image, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    image = F.conv2d(image, kernel, groups=channels)
    return image.reshape(batch, channels, n).transpose(1, 2)


def mean_queries(tokens: torch.Tensor) -> torch.Tensor:
    """Infinite blur: every token replaced by the per-channel mean over the tokens."""
    return tokens.mean(dim=1, keepdim=True).expand_as(tokens).clone()


# ------------------------------------------------------------------------------------- PAG


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, heads*d) -> (B, heads, L, d)."""
    batch, length, inner = x.shape
    return x.view(batch, length, heads, inner // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, d) -> (B, L, heads*d)."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


def _attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)


def mmdit_pag_image_rows(q, k, v, image: slice, text: slice) -> torch.Tensor:
    """PAG's MM-DiT map for the image query rows: each image query attends to its own image key
    and to every text key, nothing else. q, k, v: (B, H, L, d). Returns (B, H, n_image, d).

    Written out explicitly (softmax over [own key, text keys]), computed in float32 or better."""
    dtype = q.dtype
    work = torch.promote_types(dtype, torch.float32)
    q_img, k_img, v_img = (t[:, :, image].to(work) for t in (q, k, v))
    k_txt, v_txt = k[:, :, text].to(work), v[:, :, text].to(work)
    scale = q.shape[-1] ** -0.5
    self_logit = (q_img * k_img).sum(dim=-1, keepdim=True) * scale      # (B, H, N, 1)
    text_logit = (q_img @ k_txt.transpose(-1, -2)) * scale              # (B, H, N, T)
    probs = torch.softmax(torch.cat([self_logit, text_logit], dim=-1), dim=-1)
    out = probs[..., :1] * v_img + probs[..., 1:] @ v_txt
    return out.to(dtype)


class _PAGProcessor:
    """Common part: per-head weights of the PAG map (beta on the selected heads, 0 elsewhere)."""

    def __init__(self, beta: float, heads: tuple | None, num_heads: int):
        if heads is not None and max(heads) >= num_heads:
            raise ValueError(f"PAG.heads {heads} out of range: the layer has {num_heads} heads")
        weights = torch.zeros(num_heads, dtype=torch.float64)
        weights[list(range(num_heads)) if heads is None else list(heads)] = beta
        self.weights = weights
        self.pure = bool((weights == 1.0).all())   # plain PAG: A is not needed at all

    def mix(self, normal: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
        """Per head (1 - w) normal + w perturbed; lerp is exact at w = 0 and w = 1."""
        if self.pure:
            return perturbed
        w = self.weights.to(device=normal.device, dtype=normal.dtype).view(1, -1, 1, 1)
        return torch.lerp(normal, perturbed, w)


class UNetSelfAttentionPAG(_PAGProcessor):
    """UNet ``attn1`` (self-attention) as ``AttnProcessor2_0`` computes it, with A -> I mixed in."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("reference PAG: UNet attn1 must be a plain self-attention (no mask)")
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise ValueError("reference PAG: unsupported attn1 configuration")
        residual = hidden_states
        value = _split_heads(attn.to_v(hidden_states), attn.heads)
        if self.pure:
            out = value                                   # identity map: output = V
        else:
            query = _split_heads(attn.to_q(hidden_states), attn.heads)
            key = _split_heads(attn.to_k(hidden_states), attn.heads)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            out = self.mix(_attention(query, key, value), value)
        out = _merge_heads(out).to(value.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def sd3_projections(attn, hidden_states, encoder_hidden_states):
    """JointAttnProcessor2_0's head-split projections: image q, k, v then text q, k, v, with the
    block's qk-norms applied."""
    split = lambda t: _split_heads(t, attn.heads)
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


class SD3JointAttentionPAG(_PAGProcessor):
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

        out = _attention(query, key, value)
        pag = mmdit_pag_image_rows(query, key, value, image, text)
        out_img = self.mix(out[:, :, image], pag)
        out = torch.cat([out_img, out[:, :, text]], dim=2)

        out = _merge_heads(out).to(query.dtype)
        img_out, txt_out = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            txt_out = attn.to_add_out(txt_out)
        img_out = attn.to_out[1](attn.to_out[0](img_out))
        return img_out, txt_out


class FluxAttentionPAG(_PAGProcessor):
    """FLUX attention as ``FluxAttnProcessor`` computes it (qk-norm, rotary), with the MM-DiT PAG
    map mixed into the image query rows. Sequence order: [text, image]. Double blocks pass the
    text stream separately; single blocks pass the concatenation, whose last ``n_image`` tokens
    are the image (``n_image`` comes from img_ids)."""

    def __init__(self, beta, heads, num_heads, n_image: int):
        super().__init__(beta, heads, num_heads)
        self.n_image = n_image

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise ValueError("reference PAG: FLUX attention with a mask is not supported")
        if getattr(attn, "fused_projections", False):
            raise ValueError("reference PAG: fused qkv projections are not supported")

        def heads(x):  # (B, L, H*d) -> (B, L, H, d), the stock layout
            return x.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(heads(attn.to_q(hidden_states)))
        key = attn.norm_k(heads(attn.to_k(hidden_states)))
        value = heads(attn.to_v(hidden_states))
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            t_query = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
            t_key = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
            t_value = heads(attn.add_v_proj(encoder_hidden_states))
            query = torch.cat([t_query, query], dim=1)
            key = torch.cat([t_key, key], dim=1)
            value = torch.cat([t_value, value], dim=1)
            n_text = encoder_hidden_states.shape[1]
        else:
            n_text = hidden_states.shape[1] - self.n_image
            if n_text < 0:
                raise ValueError("reference PAG: FLUX single block shorter than the image tokens")
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))   # (B, H, L, d)
        length = query.shape[2]
        text, image = slice(0, n_text), slice(n_text, length)

        out = _attention(query, key, value)
        pag = mmdit_pag_image_rows(query, key, value, image, text)
        out_img = self.mix(out[:, :, image], pag)
        out = torch.cat([out[:, :, text], out_img], dim=2)
        out = _merge_heads(out).to(query.dtype)

        if joint:
            txt_out, img_out = out[:, :n_text], out[:, n_text:]
            img_out = attn.to_out[1](attn.to_out[0](img_out.contiguous()))
            txt_out = attn.to_add_out(txt_out.contiguous())
            return img_out, txt_out
        return out
