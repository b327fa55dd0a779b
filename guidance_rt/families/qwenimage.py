"""QwenImageTransformer2DModel (Qwen-Image): the packed forward over its 60 dual-stream blocks.

Layers: the blocks of `transformer_blocks`, by index (`7`, `"7"`, `"28-31"`). Each block is an
MM-DiT double block: image and text streams with their own modulation (img_mod / txt_mod, both
from the timestep embedding), one joint attention over [text, image] (qk RMS-norm, then a rotary
embedding: the image grid from `img_shapes`, the text positions after it), then per-stream MLPs.

Where each term acts (as on SD3 / FLUX double blocks):
- PAG: the joint attention in diffusers' MM-DiT form (image queries see their own image key and
  every valid text key); SEG blurs the image queries only (before qk-norm and the rotary
  embedding, so a mean-blurred row's queries are not identical: mean_identical False);
- TPG: the DiT residual form on the image tokens (dit.py); SLG: "block", "attn" (the joint
  attention of both streams), "ff" (both streams' MLPs);
- NAG: the negative prompt's text stream runs beside the positive one (dit.NagStream), modulated
  by the positive rows' temb (Qwen-Image has no pooled text embedding), with its own rotary text
  positions and its own key mask; the image queries' positive and negative attention outputs are
  combined before `to_out`.

Text masks. QwenImagePipeline gives every prompt its own length: the negative prompt (true CFG)
and the positive one differ, and a batch of prompts is zero-padded with
`encoder_hidden_states_mask`. `pair` pads uncond and cond text to one length with a key mask
(exact: padded keys get no weight, the text's rotary positions start at 0 for both), and the
forward masks the text keys of every row with its own mask. The per-row mask rides along with
the timestep embedding as extra columns, so that every row subset the shared block loop takes
(forks, run rows, NAG's positive rows) carries its own mask, which both attention paths take as
a key mask (SDPA's attn_mask, the variant attention op's key_mask).

CFG: QwenImagePipeline's true CFG is a second transformer call per step (`uncond_call`) and its
guided prediction is rescaled per token to the cond prediction's norm (`cfg_renorm`, applied by
the denoiser to the guided prediction of every step with the uncond row).

Supported: the Qwen-Image base config. zero_cond_t (edit models), use_additional_t_cond,
use_layer3d_rope and guidance_embeds are rejected with a clear error, as are attention_kwargs,
ControlNet residuals and additional_t_cond at call time.
"""
from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

from .. import ops
from ..layers import Layer
from .dit import DiTAdapter, NagStream
from .flux import pack_flux_latents

QWEN_PROCESSORS = ("QwenDoubleStreamAttnProcessor2_0",)
_UNSUPPORTED = ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope", "guidance_embeds")


def _split_temb(temb: torch.Tensor, dim: int):
    """(timestep embedding, key mask or None) from temb with the mask in its extra columns."""
    if temb.shape[-1] == dim:
        return temb, None
    return temb[:, :dim], temb[:, dim:] > 0.5


def _with_mask(temb: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return temb if mask is None else torch.cat([temb, mask.to(temb.dtype)], dim=-1)


def _pad_text(d: dict, length: int, need_mask: bool) -> dict:
    text = d["encoder_hidden_states"]
    n = text.shape[1]
    mask = d.get("encoder_hidden_states_mask")
    out = dict(d)
    if n < length:
        out["encoder_hidden_states"] = torch.cat([text, text.new_zeros(text.shape[0], length - n, text.shape[2])], 1)
    if need_mask:
        valid = (torch.ones(text.shape[:2], dtype=torch.bool, device=text.device) if mask is None
                 else mask.to(device=text.device, dtype=torch.bool))
        if n < length:
            valid = torch.cat([valid, valid.new_zeros(text.shape[0], length - n)], 1)
        out["encoder_hidden_states_mask"] = valid
    return out


def masked_attention(q, k, v, runs: tuple, image: slice, mask: torch.Tensor | None) -> torch.Tensor:
    """ops.variant_attention with a key mask (R, L) over the first L keys (the text), or None."""
    if mask is not None:
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], k.shape[2] - mask.shape[1])], 1)
    return ops.variant_attention(q, k, v, runs, image, mask)


class QwenImageAdapter(DiTAdapter):
    """Qwen-Image: the dual-stream blocks of `transformer_blocks`, by index (`7`, `"28-31"`)."""

    name = "qwenimage"
    title = "Qwen-Image"
    classes = ("QwenImageTransformer2DModel",)
    pipelines = ("QwenImagePipeline",)
    # PAG / SEG / TPG: an early block, as on SD3 / FLUX. SLG: no published Qwen-Image SLG layers
    # were found (searched ComfyUI docs/issues and community workflows: ComfyUI's generic
    # SkipLayerGuidanceDiT / SkipLayerGuidanceSD3 nodes default to "7, 8, 9", SD3.5-medium's
    # layers from Stability's sd3.5 repo, nothing tuned for Qwen-Image); so the SD3 practice
    # transposed to the same relative depth: SD3's 7-9 of 24 blocks (0.29-0.38) -> 18-23 of 60.
    default_layers = {"attention": "1", "tokens": "1", "skip": (18, 19, 20, 21, 22, 23)}
    unbatched = ("img_shapes",)
    nag_alpha = 0.25          # no published Qwen-Image default: FLUX's (a flow MM-DiT with rotary)
    text_tokens = 64
    default_guidance = "cfg=4"   # QwenImagePipeline's true_cfg_scale default
    cfg_argument = "true_cfg_scale"
    uncond_call = True
    sigma_timesteps = True
    cfg_renorm = True

    def __init__(self, model):
        cfg = model.config
        bad = [k for k in _UNSUPPORTED if cfg.get(k)]
        if bad:
            raise NotImplementedError(f"{self.title}: {', '.join(f'{k}=True' for k in bad)} is not supported by "
                                      "guidance-rt (the Qwen-Image base config is)")
        super().__init__(model)

    @staticmethod
    def latent_multiple(config):
        return 2

    @staticmethod
    def model_input(scheduler, x, t, n):
        return x, (t / 1000).expand(n).to(x.dtype)   # QwenImagePipeline passes timestep / 1000

    @staticmethod
    def pipeline_class(config):
        return "QwenImagePipeline"

    @staticmethod
    def uncond_arguments(arguments, encoded):
        embeds, mask = encoded
        out = dict(arguments, encoder_hidden_states=embeds)
        out.pop("encoder_hidden_states_mask", None)
        if mask is not None:
            out["encoder_hidden_states_mask"] = mask
        return out

    @staticmethod
    def encode_negative(pipe, original_class, kind, text):
        embeds, mask = original_class.encode_prompt(pipe, prompt=text, device=pipe._execution_device,
                                                    num_images_per_prompt=1)
        out = {"encoder_hidden_states": embeds}
        if mask is not None:
            out["encoder_hidden_states_mask"] = mask
        return out

    @staticmethod
    def example_step(config, batch, height, width, text_len, t, randn):
        channels = config.get("out_channels") or config["in_channels"] // 4
        sample = pack_flux_latents(randn(batch, channels, height, width))
        timestep = torch.full((batch,), t, dtype=sample.dtype, device=sample.device)
        shapes = [[(1, height // 2, width // 2)]] * batch
        return sample, timestep, lambda: {
            "encoder_hidden_states": randn(batch, text_len, config["joint_attention_dim"]),
            "img_shapes": shapes}

    @staticmethod
    def enumerate_layers(model) -> list[Layer]:
        return [Layer(str(i), f"transformer_blocks.{i}", "double", i, b.attn.heads)
                for i, b in enumerate(model.transformer_blocks)]

    def output_shape(self, sample):
        c = self.model.config
        return (*sample.shape[:-1], c.patch_size * c.patch_size * self.model.out_channels)

    def image_tokens(self, sample, position):
        return sample.shape[1]

    @staticmethod
    def pair(uncond: dict, cond: dict) -> tuple[dict, dict]:
        """uncond and cond text padded to one length, with key masks where any row needs one."""
        lu, lc = uncond["encoder_hidden_states"].shape[1], cond["encoder_hidden_states"].shape[1]
        need = lu != lc or any(d.get("encoder_hidden_states_mask") is not None for d in (uncond, cond))
        if not need:
            return uncond, cond
        length = max(lu, lc)
        return _pad_text(uncond, length, True), _pad_text(cond, length, True)

    @staticmethod
    def _grid(shapes):
        first = shapes[0]
        first = first[0] if isinstance(first, list) else first
        if isinstance(shapes[0], list) and len(shapes[0]) > 1:
            raise NotImplementedError("Qwen-Image img_shapes with several images per sample (edit "
                                      "conditioning) are not supported by guidance-rt")
        return int(first[1]), int(first[2])

    def forward(self, plan, sample, timestep, base: dict, perms, negative: dict | None = None, nag=None,
                extras=None):
        m = self.model
        if (base.get("attention_kwargs") or {}):
            raise NotImplementedError("attention_kwargs are not supported by guidance-rt")
        for key in ("controlnet_block_samples", "additional_t_cond", "guidance"):
            if base.get(key) is not None:
                raise NotImplementedError(f"Qwen-Image {key} is not supported by guidance-rt")
        shapes = base["img_shapes"]
        grid = self._grid(shapes)
        groups = plan.base_rows // plan.batch
        img = m.img_in(sample).repeat(groups, 1, 1)
        temb = self.per_row(m.time_text_embed(timestep.to(img.dtype), img), plan)
        txt = m.txt_in(m.txt_norm(base["encoder_hidden_states"]))
        mask = base.get("encoder_hidden_states_mask")
        mask = self.per_row(mask.to(torch.bool), plan) if mask is not None else None
        rope = m.pos_embed(shapes, max_txt_seq_len=txt.shape[1], device=img.device)
        ntxt = neg_rope = ntemb = None
        if nag is not None:
            ps = plan.pos_start
            ntxt = m.txt_in(m.txt_norm(negative["encoder_hidden_states"]))
            neg_rope = m.pos_embed(shapes, max_txt_seq_len=ntxt.shape[1], device=img.device)
            nmask = negative.get("encoder_hidden_states_mask")
            if nmask is not None:
                nmask = nmask.to(torch.bool).repeat((plan.total_rows - ps) // nmask.shape[0], 1)
            ntemb = _with_mask(temb[ps:], nmask)
        img, _, _ = self.run_blocks(m.transformer_blocks, 0, img, txt, _with_mask(temb, mask), rope, plan, perms,
                                    grid, ntxt=ntxt, nag=nag, nag_extra=neg_rope, ntemb=ntemb)
        return m.proj_out(m.norm_out(img, temb[: img.shape[0]]))

    def stock_block(self, block, img, txt, temb, rope):
        temb, mask = _split_temb(temb, block.dim)
        return block(hidden_states=img, encoder_hidden_states=txt, encoder_hidden_states_mask=mask, temb=temb,
                     image_rotary_emb=rope)

    def own_block(self, block, img, txt, temb, rope, bp, grid, nag: NagStream | None):
        """QwenImageTransformerBlock with per-row variants and NAG (mirrors diffusers' block)."""
        temb, mask = _split_temb(temb, block.dim)

        def modulate(x, params):
            shift, scale, gate = params.chunk(3, dim=-1)
            return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1), gate.unsqueeze(1)

        img_mod1, img_mod2 = block.img_mod(temb).chunk(2, dim=-1)
        txt_mods = block.txt_mod(temb).chunk(2, dim=-1)
        n_img, img_gate1 = modulate(block.img_norm1(img), img_mod1)
        n_txt, txt_gate1 = modulate(block.txt_norm1(txt), txt_mods[0])
        n_neg = neg_mods = nmask = None
        if nag:
            ntemb, nmask = _split_temb(nag.temb, block.dim)
            neg_mods = block.txt_mod(ntemb).chunk(2, dim=-1)
            n_neg, neg_gate1 = modulate(block.txt_norm1(nag.txt), neg_mods[0])
        a_img, a_txt, a_neg = self._attention(block.attn, n_img, n_txt, n_neg, mask, nmask, rope, bp, grid, nag)
        img = img + self.drop_rows(img_gate1 * a_img, bp.keep("attn"))
        n, img_gate2 = modulate(block.img_norm2(img), img_mod2)
        img = img + self.drop_rows(img_gate2 * block.img_mlp(n), bp.keep("ff"))

        def text_update(t, a, gate1, mod2, first):
            t = t + self.drop_rows(gate1 * a, bp.keep("attn", first))
            n, gate2 = modulate(block.txt_norm2(t), mod2)
            return t + self.drop_rows(gate2 * block.txt_mlp(n), bp.keep("ff", first))

        txt = text_update(txt, a_txt, txt_gate1, txt_mods[1], 0)
        neg = text_update(nag.txt, a_neg, neg_gate1, neg_mods[1], nag.pos_start) if nag else None
        if img.dtype == torch.float16:
            img, txt = img.clip(-65504, 65504), txt.clip(-65504, 65504)
            neg = neg.clip(-65504, 65504) if neg is not None else None
        return txt, img, neg

    def _attention(self, attn, x, c, cn, mask, nmask, rope, bp, grid, nag: NagStream | None):
        """QwenDoubleStreamAttnProcessor2_0 with per-row variants, key masks and NAG; tokens are
        [text, image]. Returns (image output, text output, negative text output or None)."""
        if not bp.self_attn and nag is None:
            a_img, a_txt = attn(hidden_states=x, encoder_hidden_states=c, encoder_hidden_states_mask=mask,
                                image_rotary_emb=rope)
            return a_img, a_txt, None
        self.require_processor(attn, QWEN_PROCESSORS, f"layer {self.layers[bp.position].name}")
        head_dim = attn.inner_dim // attn.heads
        unflat = lambda t: t.unflatten(-1, (-1, head_dim))
        rotate = lambda t, f: apply_rotary_emb_qwen(t, f, use_real=False).transpose(1, 2)   # -> (R, H, N, d)
        img_freqs, txt_freqs = rope
        q = attn.norm_q(unflat(ops.blur_queries(attn.to_q(x), bp.self_attn, grid, slice(None))))
        k, v = attn.norm_k(unflat(attn.to_k(x))), unflat(attn.to_v(x))
        q, k, v = rotate(q, img_freqs), rotate(k, img_freqs), v.transpose(1, 2)

        def text_qkv(t, freqs):
            tq = attn.norm_added_q(unflat(attn.add_q_proj(t)))
            tk = attn.norm_added_k(unflat(attn.add_k_proj(t)))
            return rotate(tq, freqs), rotate(tk, freqs), unflat(attn.add_v_proj(t)).transpose(1, 2)

        cq, ck, cv = text_qkv(c, txt_freqs)
        n_txt = c.shape[1]
        q, k, v, image = torch.cat([cq, q], 2), torch.cat([ck, k], 2), torch.cat([cv, v], 2), slice(n_txt, None)
        heads_merged = lambda t: t.transpose(1, 2).flatten(2, 3).to(x.dtype)
        o_neg = None
        if nag is None:
            o = masked_attention(q, k, v, bp.attn, image, mask)
        else:
            o, o_neg = ops.joint_nag_attention(q, k, v, image, bp.attn, nag.pos_start, text_qkv(cn, nag.extra[1]),
                                               bp.nag_attn, nag.step, mask, nmask)
            o_neg = attn.to_add_out(heads_merged(o_neg).contiguous())
        o = heads_merged(o)
        o_txt, o_img = o[:, :n_txt], o[:, n_txt:]
        img = attn.to_out[1](attn.to_out[0](o_img.contiguous()))
        return img, attn.to_add_out(o_txt.contiguous()), o_neg
