"""NAG (normalized attention guidance) for the reference oracle, written from shared/methods.md
section 5. Nothing here is shared with the packed runtime; plain PyTorch, obviously right over fast.

NAG adds no branch: it changes the attention of every POSITIVE forward (cond and every perturbed
branch; the CFG uncond branch stays plain). Per guided layer and per token, over all heads'
channels together, before the output projection:

    Zp = attention(q, K_pos, V_pos);  Zn = attention(q, K_neg, V_neg)      (same queries)
    Zt = phi Zp - (phi - 1) Zn;  r = |Zt|_p / |Zp|_p;  Zh = Zt min(r, tau) / r
    Z  = alpha Zh + (1 - alpha) Zp          (min(r, tau) / r := 1 where r is 0 or not finite)

How each family is done (one plain forward of the stock model per positive branch still):

- UNet: every cross-attention ``attn2`` of every ``BasicTransformerBlock`` gets
  ``UNetCrossAttentionNAG``, which projects the negative text with that layer's to_k / to_v.
  The whole batch runs at once.
- SD3 / FLUX: the positive branch runs sample by sample (batch 1) and the negative text stream is
  carried as a second row of the text stream: a forward hook on ``context_embedder`` appends
  ``context_embedder(negative text)``. The joint attention processors (``SD3JointAttentionNAG``,
  ``FluxAttentionNAG``) run row 0 = [image, positive text] and row 1 = [image, negative text]
  (FLUX: [text, image], row 1 with rotary ids cat(negative txt_ids, img_ids)), NAG-combine the
  image parts and give each text row its own output.
- SD3: the stock blocks broadcast the batch-1 temb (and image stream) against the 2-row text
  stream, so the negative text is modulated with the positive row's temb. This is the authors'
  SD3 pipeline: it concatenates the positive pooled projection again for the NAG rows and never
  uses the negative one.
- FLUX follows the authors' NAGFluxTransformer2DModel and pipeline_flux_nag.py: the pipeline
  concatenates the negative prompt's pooled projection, so temb has a second row,
  time_text_embed(same timestep, same guidance, negative pooled) (a pre-hook on
  ``time_text_embed``), and their Trunc* norms give every AdaLayerNormZero / AdaLayerNormContinuous
  only its input's rows of temb: the image stream of the double blocks and ``norm_out`` (1 row)
  use the positive row, the text stream's norm1_context (2 rows) modulates the negative text with
  the negative row. Single blocks: a pre-hook on the first one tiles the image stream to 2 rows,
  so row 1 = [negative text, image] is its own sequence, modulated (AdaLayerNormZeroSingle, not
  truncated) by the negative temb; its image tokens drift from row 0's although the processor
  gives both rows' image tokens the combined output; a hook on the last one keeps row 0.
- A PAG processor of the reference already installed on a guided joint attention (a PAG branch on
  SD3 / FLUX) is absorbed: both Zp and Zn use its MM-DiT map (text part = that row's text). SEG's
  to_q hook blurs the image queries: shared by both rows, in FLUX single blocks each row's own.

Everything is installed on an ExitStack and removed on exit, also after an exception.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..families import model_family
from ..guidance import Guidance

# the families' default alpha (methods.md section 5), kept here so the oracle reads the spec, not the runtime
DEFAULT_ALPHA = {"unet": 0.5, "sd3": 0.125, "flux": 0.25}
from .attention import (STOCK_PROCESSORS, FluxAttentionPAG, SD3JointAttentionPAG, _merge_heads, sd3_projections,
                        _split_heads, mmdit_pag_image_rows)
from .perturb import _hook, _set_processor


@dataclass(frozen=True)
class NAGSetting:
    """NAG's numbers for one step: phi (code convention, != 1 when active), tau, alpha (the
    family default resolved), p-norm."""

    phi: float
    tau: float
    alpha: float
    norm: int


def nag_setting(guidance: Guidance, family: str, step: int, num_steps: int) -> NAGSetting | None:
    """The step's NAG setting, or None when NAG is absent, outside its window or phi == 1."""
    term = guidance.nag
    if term is None:
        return None
    phi = term.step_scale(step, num_steps)
    if phi == 1.0:
        return None
    alpha = DEFAULT_ALPHA[family] if term.alpha is None else term.alpha
    return NAGSetting(phi=float(phi), tau=float(term.tau), alpha=float(alpha), norm=int(term.norm))


# ------------------------------------------------------------------------------- the formula


def nag_combine(zp: torch.Tensor, zn: torch.Tensor, setting: NAGSetting) -> torch.Tensor:
    """``alpha Zh + (1 - alpha) Zp`` per token (last dim = all heads' channels), computed in
    float32 or better and returned in zp's dtype. The clip factor ``min(r, tau) / r`` is 1 where
    r = |Zt| / |Zp| is 0 or not finite (|Zt| = 0 or |Zp| = 0), so the result stays finite."""
    work = torch.promote_types(zp.dtype, torch.float32)
    p, n = zp.to(work), zn.to(work)
    phi = setting.phi
    zt = phi * p - (phi - 1.0) * n
    norm_p = torch.linalg.vector_norm(p, ord=setting.norm, dim=-1, keepdim=True)
    norm_t = torch.linalg.vector_norm(zt, ord=setting.norm, dim=-1, keepdim=True)
    r = norm_t / norm_p
    usable = torch.isfinite(r) & (r > 0)
    factor = torch.where(usable, torch.clamp(r, max=setting.tau) / r, torch.ones_like(r))
    zh = zt * factor
    z = setting.alpha * zh + (1.0 - setting.alpha) * p
    return z.to(zp.dtype)


def _attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)


def _joint_attention(q, k, v, image: slice, text: slice, pag) -> torch.Tensor:
    """Joint attention of (R, H, L, d) rows; with a reference PAG processor, its MM-DiT map is
    mixed into the image query rows (text part = the row's own text)."""
    out = _attention(q, k, v)
    if pag is None:
        return out
    out = out.clone()
    out[:, :, image] = pag.mix(out[:, :, image], mmdit_pag_image_rows(q, k, v, image, text))
    return out


# -------------------------------------------------------------------------------- processors


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

        query = _split_heads(attn.to_q(hidden_states), attn.heads)
        key_p = _split_heads(attn.to_k(positive), attn.heads)
        value_p = _split_heads(attn.to_v(positive), attn.heads)
        key_n = _split_heads(attn.to_k(negative), attn.heads)
        value_n = _split_heads(attn.to_v(negative), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key_p, key_n = attn.norm_k(key_p), attn.norm_k(key_n)
        zp = _merge_heads(_attention(query, key_p, value_p)).to(query.dtype)
        zn = _merge_heads(_attention(query, key_n, value_n)).to(query.dtype)
        out = nag_combine(zp, zn, self.setting)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


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
        out = _joint_attention(query, key, value, slice(0, n_img), slice(n_img, length), self.pag)
        out = _merge_heads(out).to(query.dtype)
        image = nag_combine(out[0:1, :n_img], out[1:2, :n_img], self.setting)
        text = out[:, n_img:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        image = attn.to_out[1](attn.to_out[0](image))
        return image, text


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
        if attention_mask is not None:
            raise ValueError("reference NAG: FLUX attention with a mask is not supported")
        if getattr(attn, "fused_projections", False):
            raise ValueError("reference NAG: fused qkv projections are not supported")

        def heads(x):  # (R, L, H*d) -> (R, L, H, d), the stock layout
            return x.unflatten(-1, (-1, attn.head_dim))

        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        query = attn.norm_q(heads(attn.to_q(hidden_states)))
        key = attn.norm_k(heads(attn.to_k(hidden_states)))
        value = heads(attn.to_v(hidden_states))
        if joint:
            if hidden_states.shape[0] != 1 or encoder_hidden_states.shape[0] != 2:
                raise ValueError("reference NAG: FLUX double block expects 1 image row and 2 "
                                 f"text rows, got {hidden_states.shape[0]} and "
                                 f"{encoder_hidden_states.shape[0]}")
            t_query = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
            t_key = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
            t_value = heads(attn.add_v_proj(encoder_hidden_states))

            def rows(text_part, image_part):              # (2, T + N, H, d)
                return torch.cat([text_part, image_part.expand(2, -1, -1, -1)], dim=1)

            query, key, value = rows(t_query, query), rows(t_key, key), rows(t_value, value)
            n_text = encoder_hidden_states.shape[1]
        else:
            if hidden_states.shape[0] != 2:
                raise ValueError("reference NAG: FLUX single block expects 2 rows (positive and "
                                 f"negative sequence), got {hidden_states.shape[0]}")
            n_text = hidden_states.shape[1] - self.n_image
            if n_text < 0:
                raise ValueError("reference NAG: FLUX single block shorter than the image tokens")
        if image_rotary_emb is not None:
            rotaries = (image_rotary_emb, self.negative_rotary)
            query, key = _rotary_rows(query, rotaries), _rotary_rows(key, rotaries)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))   # (2, H, L, d)
        length = query.shape[2]
        out = _joint_attention(query, key, value, slice(n_text, length), slice(0, n_text),
                               self.pag)
        out = _merge_heads(out).to(query.dtype)
        image = nag_combine(out[0:1, n_text:], out[1:2, n_text:], self.setting)
        if joint:
            text = attn.to_add_out(out[:, :n_text].contiguous())
            image = attn.to_out[1](attn.to_out[0](image.contiguous()))
            return image, text
        return torch.cat([out[:, :n_text], image.expand(2, -1, -1)], dim=1)


# ---------------------------------------------------------------------------------- install


def _guided_processor_check(family: str, attn: nn.Module, allowed=()) -> None:
    processor = attn.processor
    if isinstance(processor, allowed):
        return
    name = type(processor).__name__
    if name not in STOCK_PROCESSORS[family]:
        raise ValueError(f"reference NAG: expects the stock attention processor "
                         f"({' / '.join(STOCK_PROCESSORS[family])}), found {name}")
    if getattr(attn, "fused_projections", False):
        raise ValueError("reference NAG: fused qkv projections are not supported")


def _negative_input(negative: dict, key: str, row: int | None) -> torch.Tensor:
    value = negative.get(key) if negative is not None else None
    if value is None:
        raise ValueError(f"NAG needs the negative prompt's {key} in `negative`")
    if row is not None:
        value = value[row:row + 1] if value.shape[0] > 1 else value
    return value


def _unet_cross_attentions(model: nn.Module) -> list[nn.Module]:
    from diffusers.models.attention import BasicTransformerBlock

    found = []
    for module in model.modules():
        if isinstance(module, BasicTransformerBlock) and module.attn2 is not None:
            if getattr(module.attn2, "is_cross_attention", False):
                found.append(module.attn2)
    return found


@contextlib.contextmanager
def nag_installed(model: nn.Module, setting: NAGSetting, negative: dict, kwargs: dict,
                  row: int | None = None):
    """Install NAG on ``model`` for one positive forward with forward kwargs ``kwargs``; always
    removed on exit. UNet: the forward may have any batch; SD3 / FLUX: the forward must be batch
    1 and ``row`` picks the negative's row (a batch-1 negative serves every row)."""
    family = model_family(model)
    with contextlib.ExitStack() as stack:
        if family == "unet":
            if getattr(model, "encoder_hid_proj", None) is not None:
                raise ValueError("reference NAG: UNets with encoder_hid_proj are not supported")
            attns = _unet_cross_attentions(model)
            if not attns:
                raise ValueError("reference NAG: the UNet has no cross-attention layers")
            text = _negative_input(negative, "encoder_hidden_states", row)
            for attn in attns:
                _guided_processor_check(family, attn)
                _set_processor(stack, attn, UNetCrossAttentionNAG(setting, text))
            yield attns
            return

        text = _negative_input(negative, "encoder_hidden_states", row)
        if text.shape[0] != 1:
            raise ValueError("reference NAG: SD3 / FLUX run one sample at a time; pick a row")
        with torch.no_grad():
            negative_stream = model.context_embedder(text)

        def add_negative_stream(module, args, output):
            if output.shape[0] != 1:
                raise ValueError("reference NAG: SD3 / FLUX positive forwards must be batch 1")
            if output.shape[1:] != negative_stream.shape[1:]:
                raise ValueError(f"reference NAG: the negative text has {negative_stream.shape[1]}"
                                 f" tokens, the positive {output.shape[1]}; they must match")
            return torch.cat([output, negative_stream.to(output.dtype)], dim=0)

        _hook(stack, model.context_embedder, add_negative_stream)

        attns = []
        if family == "sd3":
            for block in model.transformer_blocks:
                _guided_processor_check(family, block.attn, (SD3JointAttentionPAG,))
                pag = block.attn.processor if isinstance(block.attn.processor,
                                                         SD3JointAttentionPAG) else None
                _set_processor(stack, block.attn, SD3JointAttentionNAG(setting, pag))
                attns.append(block.attn)
            yield attns
            return

        # FLUX
        from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero

        txt_ids = negative.get("txt_ids")
        img_ids = kwargs.get("img_ids")
        if txt_ids is None or img_ids is None:
            raise ValueError("reference NAG: FLUX needs txt_ids in `negative` and img_ids in the "
                             "branch kwargs")
        if txt_ids.ndim == 3:
            txt_ids = txt_ids[row if row is not None and txt_ids.shape[0] > 1 else 0]
        if img_ids.ndim == 3:
            img_ids = img_ids[0]
        if txt_ids.shape[0] != text.shape[1]:
            raise ValueError(f"reference NAG: negative txt_ids ({txt_ids.shape[0]}) do not match "
                             f"its {text.shape[1]} text tokens")
        with torch.no_grad():
            negative_rotary = model.pos_embed(torch.cat([txt_ids.to(img_ids), img_ids], dim=0))
        n_image = img_ids.shape[0]
        pooled = _negative_input(negative, "pooled_projections", row)
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

        _hook(stack, model.time_text_embed, add_negative_temb, pre=True)

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
                _hook(stack, module, input_rows_of_temb, pre=True, with_kwargs=True)
        blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
        for block in blocks:
            _guided_processor_check(family, block.attn, (FluxAttentionPAG,))
            pag = block.attn.processor if isinstance(block.attn.processor,
                                                     FluxAttentionPAG) else None
            _set_processor(stack, block.attn,
                           FluxAttentionNAG(setting, negative_rotary, n_image, pag))
            attns.append(block.attn)

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

            _hook(stack, singles[0], tile_image, pre=True, with_kwargs=True)
            _hook(stack, singles[-1], keep_positive, with_kwargs=True)
        yield attns


# ---------------------------------------------------------------------------------- forward


def _row(value, b: int, batch: int, key: str | None = None):
    """Sample b of one forward kwarg: tensors whose first dim is the batch are sliced (FLUX's 2-D
    txt_ids / img_ids have no batch dim), dicts recursively, everything else kept."""
    if isinstance(value, dict):
        return {k: _row(v, b, batch, k) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        if key in ("txt_ids", "img_ids") and value.ndim < 3:
            return value
        if value.ndim >= 1 and value.shape[0] == batch and batch > 1:
            return value[b:b + 1]
    return value


def nag_forward(model: nn.Module, setting: NAGSetting, negative: dict, sample: torch.Tensor,
                timestep, kwargs: dict) -> torch.Tensor:
    """One positive branch forward of the stock model with NAG (UNet: the whole batch; SD3 /
    FLUX: sample by sample, concatenated)."""
    family = model_family(model)
    if family == "unet":
        with nag_installed(model, setting, negative, kwargs):
            return model(sample, timestep=timestep, **kwargs, return_dict=False)[0]
    batch = sample.shape[0]
    rows = _negative_input(negative, "encoder_hidden_states", None).shape[0]
    if rows not in (1, batch):
        raise ValueError(f"reference NAG: negative encoder_hidden_states has batch {rows}, "
                         f"expected 1 or {batch}")
    outputs = []
    for b in range(batch):
        kwargs_b = _row(kwargs, b, batch)
        timestep_b = _row(timestep, b, batch)
        with nag_installed(model, setting, negative, kwargs_b, row=b):
            outputs.append(model(sample[b:b + 1], timestep=timestep_b, **kwargs_b,
                                 return_dict=False)[0])
    return torch.cat(outputs, dim=0)
