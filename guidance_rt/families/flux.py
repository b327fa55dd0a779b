"""FluxTransformer2DModel (FLUX.1): the packed forward over double- and single-stream blocks."""
from __future__ import annotations

import weakref

import torch
from diffusers.models.embeddings import apply_rotary_emb

from .. import ops
from ..layers import Layer
from .dit import DiTAdapter, NagStream

FLUX_PROCESSORS = ("FluxAttnProcessor",)


def pack_flux_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): 2x2 patches, row-major, as FluxPipeline packs them."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_flux_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W); height/width in latent pixels."""
    b, _, c4 = packed.shape
    x = packed.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def flux_image_ids(height: int, width: int, *, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """img_ids (H/2 * W/2, 3) = (0, row, col) per packed token; height/width in latent pixels."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def flux_grid(img_ids: torch.Tensor) -> tuple[int, int]:
    """(rows, cols) of the packed latent grid; img_ids is row-major (_prepare_latent_image_ids)."""
    return int(img_ids[:, 1].max()) + 1, int(img_ids[:, 2].max()) + 1


def _ids(t: torch.Tensor) -> torch.Tensor:
    return t[0] if t.ndim == 3 else t


class FluxAdapter(DiTAdapter):
    """FLUX.1: double-stream blocks by index (`3`, `"0-18"`, part `double`) and single-stream
    blocks as `s<i>` (`"s0-s37"`, part `single`)."""

    name = "flux"
    title = "FLUX"
    classes = ("FluxTransformer2DModel",)
    pipelines = ("FluxPipeline",)
    parts = ("double", "single")
    default_layers = {"attention": "1", "tokens": "1", "skip": (7, 8, 9)}
    unbatched = ("txt_ids", "img_ids")
    nag_alpha = 0.25
    text_tokens = 512   # T5
    cfg_argument = "true_cfg_scale"
    uncond_call = True
    sigma_timesteps = True
    default_guidance = ""   # FLUX.1-dev is guidance-distilled: no CFG by default

    @staticmethod
    def latent_multiple(config):
        return 2

    @staticmethod
    def capture_site(layer, block):
        if layer.part == "single":   # no to_out: the attention's output holds [text, image] tokens
            return block.attn, f"{layer.path}.attn (output, image tokens; no to_out)", True
        return DiTAdapter.capture_site(layer, block)

    @staticmethod
    def model_input(scheduler, x, t, n):
        return x, (t / 1000).expand(n).to(x.dtype)   # FluxPipeline passes sigma

    @staticmethod
    def pipeline_class(config):
        return "FluxPipeline"

    @staticmethod
    def encode_negative(pipe, original_class, kind, text):
        embeds, pooled, ids = original_class.encode_prompt(pipe, prompt=text, prompt_2=None,
                                                           device=pipe._execution_device, num_images_per_prompt=1)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": ids}

    guidance_default = 3.5   # the stock pipeline's embedded guidance_scale (FLUX.1-dev)
    image_ids = staticmethod(flux_image_ids)

    @staticmethod
    def text_inputs(config, batch, text_len, randn, device, dtype) -> dict:
        """example_step's text arguments besides the embeddings: pooled CLIP and txt_ids."""
        return {"pooled_projections": randn(batch, config["pooled_projection_dim"]),
                "txt_ids": torch.zeros(text_len, 3, device=device, dtype=dtype)}

    @classmethod
    def example_step(cls, config, batch, height, width, text_len, t, randn):
        sample = pack_flux_latents(randn(batch, config["in_channels"] // 4, height, width))
        device, dtype = sample.device, sample.dtype
        timestep = torch.full((batch,), t, dtype=dtype, device=device)
        img_ids = cls.image_ids(height, width, device=device, dtype=dtype)

        def branch():
            kw = {"encoder_hidden_states": randn(batch, text_len, config["joint_attention_dim"]),
                  **cls.text_inputs(config, batch, text_len, randn, device, dtype), "img_ids": img_ids.clone()}
            if config.get("guidance_embeds"):
                kw["guidance"] = torch.full((batch,), cls.guidance_default, device=device, dtype=dtype)
            return kw

        return sample, timestep, branch

    def __init__(self, model):
        super().__init__(model)
        self._grids: dict[int, tuple] = {}   # id(img_ids) -> (weak reference, grid)

    @staticmethod
    def enumerate_layers(model) -> list[Layer]:
        double = [Layer(str(i), f"transformer_blocks.{i}", "double", i, b.attn.heads)
                  for i, b in enumerate(model.transformer_blocks)]
        return double + [Layer(f"s{i}", f"single_transformer_blocks.{i}", "single", len(double) + i, b.attn.heads)
                         for i, b in enumerate(model.single_transformer_blocks)]

    def output_shape(self, sample):
        return (*sample.shape[:-1], self.model.out_channels)

    def image_tokens(self, sample, position):
        return sample.shape[1]

    def host_inputs(self, plan, cond):
        """The token grid, where a finite SEG blur needs it: read from img_ids once per tensor (a
        device sync), and kept for the few tensors a run uses."""
        if not any(s.variant is not None and s.variant.blur and not s.variant.mean
                   for bp in plan.blocks.values() for s in bp.self_attn):
            return {"grid": None}
        ids = cond["img_ids"]
        hit = self._grids.get(id(ids))
        if hit is None or hit[0]() is not ids:
            if len(self._grids) >= 8:
                self._grids.pop(next(iter(self._grids)))
            hit = self._grids[id(ids)] = (weakref.ref(ids), flux_grid(_ids(ids)))
        return {"grid": hit[1]}

    def forward(self, plan, sample, timestep, base: dict, perms, negative: dict | None = None, nag=None,
                extras=None, grid=None):
        m = self.model
        if (base.get("joint_attention_kwargs") or {}):
            raise NotImplementedError("joint_attention_kwargs (IP-Adapter) are not supported by guidance-rt")
        for key in ("controlnet_block_samples", "controlnet_single_block_samples"):
            if base.get(key) is not None:
                raise NotImplementedError(f"FLUX {key} (ControlNet) is not supported by guidance-rt yet")
        groups = plan.base_rows // plan.batch
        img = m.x_embedder(sample).repeat(groups, 1, 1)
        dtype = img.dtype
        t = timestep.to(dtype) * 1000
        guidance = base.get("guidance")
        g = guidance.to(dtype) * 1000 if guidance is not None else None

        def embed(rows, pooled):   # time_text_embed of the base rows `rows`
            times = (t[rows],) if g is None else (t[rows], g[rows])
            return m.time_text_embed(*times, pooled)

        temb = self.per_row(embed(slice(None), base["pooled_projections"]), plan)
        txt = m.context_embedder(base["encoder_hidden_states"])
        img_ids = _ids(base["img_ids"])
        rope = m.pos_embed(torch.cat((_ids(base["txt_ids"]), img_ids), dim=0))
        ntxt = neg_rope = ntemb = neg_image = None
        if nag is not None:
            if negative.get("pooled_projections") is None:
                raise ValueError("FLUX NAG needs the negative prompt's pooled_projections in `negative`: "
                                 "its time embedding modulates the negative stream")
            ntxt = m.context_embedder(negative["encoder_hidden_states"])
            neg_rope = m.pos_embed(torch.cat((_ids(negative["txt_ids"]), img_ids), dim=0))
            # as the NAG authors' FLUX code: the negative stream is modulated by the time embedding
            # of the negative pooled projection (same timestep and guidance as the cond rows), one
            # row per positive row of the layout (cond, then each branch)
            ntemb = embed(plan.cond_rows, negative["pooled_projections"])
            ntemb = ntemb.repeat((plan.total_rows - plan.pos_start) // plan.batch, 1)
            neg_image = slice(ntxt.shape[1], None)

        n_double = len(m.transformer_blocks)
        img, txt, ntxt = self.run_blocks(m.transformer_blocks, 0, img, txt, temb, rope, plan, perms, grid,
                                         ntxt=ntxt, nag=nag, nag_extra=neg_rope, ntemb=ntemb)
        if nag is not None:
            # single blocks carry the whole negative sequence [negative text, image]: its image
            # tokens start as the positive rows' and then follow their own (negative) modulation
            ntxt = torch.cat([ntxt, img[plan.pos_start:]], dim=1)
        img, _, _ = self.run_blocks(m.single_transformer_blocks, n_double, img, txt, temb, rope, plan,
                                    perms, grid, ntxt=ntxt, nag=nag, nag_extra=neg_rope, ntemb=ntemb,
                                    nag_image=neg_image)
        return m.proj_out(m.norm_out(img, temb[: img.shape[0]]))

    def stock_block(self, block, img, txt, temb, rope):
        return block(hidden_states=img, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rope)

    def own_block(self, block, img, txt, temb, rope, bp, grid, nag: NagStream | None):
        if hasattr(block, "norm1_context"):
            return self._double_block(block, img, txt, temb, rope, bp, grid, nag)
        return self._single_block(block, img, txt, temb, rope, bp, grid, nag)

    @staticmethod
    def _clip(x):
        return x.clip(-65504, 65504) if x is not None and x.dtype == torch.float16 else x

    def _double_block(self, block, img, txt, temb, rope, bp, grid, nag):
        n_img, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(img, emb=temb)
        n_txt, *mods = block.norm1_context(txt, emb=temb)
        n_neg, *neg_mods = block.norm1_context(nag.txt, emb=nag.temb) if nag else (None,)
        a_img, a_txt, a_neg = self._attention(block.attn, n_img, n_txt, n_neg, rope, bp, grid, nag)
        img = img + self.drop_rows(gate_msa.unsqueeze(1) * a_img, bp.keep("attn"))
        n = block.norm2(img) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        img = img + self.drop_rows(gate_mlp.unsqueeze(1) * block.ff(n), bp.keep("ff"))

        txt, neg = self.text_streams(block, bp, txt, a_txt, mods, nag, a_neg, neg_mods)
        txt, neg = self._clip(txt), self._clip(neg)
        return txt, img, neg

    def _single_block(self, block, img, txt, temb, rope, bp, grid, nag):
        n_txt_tokens = txt.shape[1]
        x = torch.cat([txt, img], dim=1)
        n, gate = block.norm(x, emb=temb)
        mlp = self.drop_rows(block.act_mlp(block.proj_mlp(n)), bp.keep("ff"))
        n_neg = None
        if nag:   # nag.txt: the whole negative sequence [text, image], with the negative temb
            n_neg, neg_gate = block.norm(nag.txt, emb=nag.temb)
        a, _, a_neg = self._attention(block.attn, n, None, n_neg, rope, bp, grid, nag, image_start=n_txt_tokens)
        a = self.drop_rows(a, bp.keep("attn"))
        x = self._clip(x + gate.unsqueeze(1) * block.proj_out(torch.cat([a, mlp], dim=2)))
        neg = None
        if nag:
            ps = nag.pos_start
            neg_mlp = self.drop_rows(block.act_mlp(block.proj_mlp(n_neg)), bp.keep("ff", ps))
            a_neg = self.drop_rows(a_neg, bp.keep("attn", ps))
            neg = self._clip(nag.txt + neg_gate.unsqueeze(1) * block.proj_out(torch.cat([a_neg, neg_mlp], dim=2)))
        return x[:, :n_txt_tokens], x[:, n_txt_tokens:], neg

    def _attention(self, attn, x, c, cn, rope, bp, grid, nag, image_start=0):
        """FluxAttnProcessor with per-row variants and NAG; tokens are [text, image].
        Double blocks: x = image tokens, c = text, cn: the negative text (normed), for the positive
        rows, which attends with their image tokens. Single blocks: x = [text, image], c = None,
        cn: the negative sequence [text, image] (normed), with image tokens of its own. Returns
        (image or whole-sequence output, text output, negative text or sequence output)."""
        if not bp.self_attn and nag is None:
            if c is None:
                return attn(hidden_states=x, image_rotary_emb=rope), None, None
            a_img, a_txt = attn(hidden_states=x, encoder_hidden_states=c, image_rotary_emb=rope)
            return a_img, a_txt, None
        self.require_processor(attn, FLUX_PROCESSORS, f"layer {self.layers[bp.position].name}")
        if attn.fused_projections:
            raise NotImplementedError("fused QKV projections are not supported on a perturbed layer")
        unflat = lambda t: t.unflatten(-1, (-1, attn.head_dim))
        rotate = lambda t, r: apply_rotary_emb(t, r, sequence_dim=1).transpose(1, 2)   # -> (R, H, N, d)
        q = attn.norm_q(unflat(ops.blur_queries(attn.to_q(x), bp.self_attn, grid, slice(image_start, None))))
        k, v = attn.norm_k(unflat(attn.to_k(x))), unflat(attn.to_v(x))
        if c is not None:   # double block: text projections of their own, text first
            text_q, text_k, text_v = self._text_qkv(attn, c)
            q, k, v = torch.cat([text_q, q], 1), torch.cat([text_k, k], 1), torch.cat([text_v, v], 1)
        n_txt = q.shape[1] - (x.shape[1] - image_start)      # text tokens in the sequence
        image = slice(n_txt, None)
        q, k, v = rotate(q, rope), rotate(k, rope), v.transpose(1, 2)
        o_neg = None
        if nag is not None and c is not None:
            # double block: the negative text beside the positive rows' image tokens, whose rotary
            # embedding is the positive one (same image ids), so their keys are shared
            n_neg = cn.shape[1]
            neg_rope = tuple(f[:n_neg] for f in nag.extra)
            nq, nk, nv = self._text_qkv(attn, cn)
            o, o_neg = ops.joint_nag_attention(q, k, v, image, bp.attn, nag.pos_start,
                                               (rotate(nq, neg_rope), rotate(nk, neg_rope), nv.transpose(1, 2)),
                                               bp.nag_attn, nag.step)
            o_neg = o_neg.transpose(1, 2).flatten(2, 3).to(x.dtype)
        else:
            o = ops.variant_attention(q, k, v, bp.attn, image)
        o = o.transpose(1, 2).flatten(2, 3).to(x.dtype)
        if nag is not None and c is None:
            # single block (the NAG authors'): the negative sequence carries image tokens of its own
            # (its modulation differs), so nothing of its attention is shared with the positive rows
            ps, s = nag.pos_start, nag.step
            n_neg = cn.shape[1] - (x.shape[1] - image_start)
            nq = attn.norm_q(unflat(ops.blur_queries(attn.to_q(cn), bp.pos_attn, grid, slice(n_neg, None))))
            nk, nv = attn.norm_k(unflat(attn.to_k(cn))), unflat(attn.to_v(cn))
            on = ops.variant_attention(rotate(nq, nag.extra), rotate(nk, nag.extra), nv.transpose(1, 2),
                                       bp.nag_attn, slice(n_neg, None))
            on = on.transpose(1, 2).flatten(2, 3).to(x.dtype)
            guided = ops.nag_combine(o[ps:, image], on[:, n_neg:], s.phi, s.tau, s.alpha, s.norm)
            o = torch.cat([o[:ps], torch.cat([o[ps:, :n_txt], guided], 1)])
            # both sequences' image tokens get the combined output
            o_neg = torch.cat([on[:, :n_neg], guided], 1)
        if c is None:
            return o, None, o_neg
        o_txt, o_img = o[:, :n_txt], o[:, n_txt:]
        o_neg = attn.to_add_out(o_neg.contiguous()) if o_neg is not None else None
        return attn.to_out[1](attn.to_out[0](o_img.contiguous())), attn.to_add_out(o_txt.contiguous()), o_neg

    @staticmethod
    def _text_qkv(attn, c):
        unflat = lambda t: t.unflatten(-1, (-1, attn.head_dim))
        return (attn.norm_added_q(unflat(attn.add_q_proj(c))), attn.norm_added_k(unflat(attn.add_k_proj(c))),
                unflat(attn.add_v_proj(c)))
