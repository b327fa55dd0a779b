"""FLUX.2 (Flux2Transformer2DModel, Flux2Pipeline): the FLUX.1 adapter's layout and terms on the
FLUX.2 block structure.

Blocks: double-stream `transformer_blocks.<i>` by index (`3`, `"0-7"`, part `double`) and
single-stream `single_transformer_blocks.<i>` as `s<i>` (`"s0-s47"`, part `single`), as FLUX.1.
What differs from FLUX.1, and how each term acts here:

- Modulation is shared: the model computes double_stream_modulation_img / _txt and
  single_stream_modulation once from temb = time_guidance_embed(t, guidance) (no pooled
  projection). The packed forward computes them on the base rows (uncond, cond) and gathers them
  per row, so every branch row carries its base row's modulation; the embedded guidance
  (`guidance`) enters temb for every row exactly as the pipeline passes it.
- Rotary ids have 4 axes (t, h, w, l); the image grid (SEG's finite blur) is (max h + 1,
  max w + 1) of img_ids, as Flux2Pipeline._unpack_latents_with_ids reads it. With reference
  images (Flux2Pipeline(image=...)) their tokens follow the latent tokens and count as image
  tokens for PAG / TPG / NAG; a finite SEG blur then has no single grid and is refused.
- Double blocks (Flux2Attention, stock Flux2AttnProcessor): sequence [text, image]; PAG (MM-DiT
  map on the image query rows) and SEG on the image queries, TPG permutes the image tokens (DiT
  residual form, dit.py), SLG "attn" zeroes both streams' attention outputs, "ff" both
  feed-forwards (ff, ff_context).
- Single blocks (Flux2ParallelSelfAttention, stock Flux2ParallelSelfAttnProcessor): one fused
  projection to_qkv_mlp_proj gives q, k, v and the SwiGLU MLP input; to_out projects
  cat([attention, mlp]). PAG / SEG act on the image part of [text, image]; SLG "attn" zeroes the
  attention half entering to_out, "ff" the MLP half (mlp_act_fn's output), "block" bypasses.
- NAG as the FLUX.1 adapter (the NAG authors' FLUX formulation): double blocks carry the negative
  text beside the positive rows' image tokens, single blocks the whole negative sequence
  [negative text, image] from the last double block on; the image tokens' attention output is
  nag_combine(positive, negative). FLUX.2 has no pooled text, so the negative stream is modulated
  by the positive rows' own (shared) modulation.
- CFG: Flux2Pipeline (FLUX.2-dev) is guidance-distilled and has no unconditional branch (its
  `guidance_scale` is the embedded guidance, passed through untouched): a CFG term there is an
  error; NAG is how it takes a negative prompt. S-CFG: no semantic maps (DiT), a clear error.
- kv_cache / kv_cache_mode / num_ref_tokens (Klein KV pipelines) are refused on guided steps;
  joint_attention_kwargs too (as FLUX.1).
"""
from __future__ import annotations

import torch

from .. import ops
from .dit import DiTAdapter
from .flux import FluxAdapter, _ids

FLUX2_PROCESSORS = ("Flux2AttnProcessor", "Flux2KVAttnProcessor")
FLUX2_SINGLE_PROCESSORS = ("Flux2ParallelSelfAttnProcessor", "Flux2KVParallelSelfAttnProcessor")


def flux2_image_ids(height: int, width: int, *, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """img_ids (H/2 * W/2, 4) = (t=0, row, col, l=0) per packed token, as
    Flux2Pipeline._prepare_latent_ids; height/width in VAE latent pixels."""
    h, w = torch.arange(height // 2), torch.arange(width // 2)
    ids = torch.cartesian_prod(torch.arange(1), h, w, torch.arange(1))
    return ids.to(device=device, dtype=dtype)


def flux2_text_ids(n: int, *, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """txt_ids (n, 4) = (0, 0, 0, l), as Flux2Pipeline._prepare_text_ids."""
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(n))
    return ids.to(device=device, dtype=dtype)


class Flux2Adapter(FluxAdapter):
    """FLUX.2: double-stream blocks by index (`3`, `"0-7"`, part `double`) and single-stream blocks
    as `s<i>` (`"s0-s47"`, part `single`)."""

    name = "flux2"
    title = "FLUX.2"
    classes = ("Flux2Transformer2DModel",)
    pipelines = ("Flux2Pipeline",)
    # PAG / SEG / TPG: block 1, as FLUX.1. SLG: no published FLUX.2 layers were found (searched
    # community workflows, issues and the diffusers / BFL sources, 2026-12); FLUX.1's [7, 8, 9]
    # (ComfyUI's SkipLayerGuidanceDiT default, the SD3.5 layers) sit at depth 7/19..9/19 of the
    # double stack, which on FLUX.2's 8 double blocks rounds to blocks 3 and 4.
    default_layers = {"attention": "1", "tokens": "1", "skip": (3, 4)}
    unbatched = ("txt_ids", "img_ids")
    nag_alpha = 0.25       # as FLUX.1 (the NAG authors' FLUX setting)
    text_tokens = 512      # Flux2Pipeline's max_sequence_length (Mistral)
    cfg_argument = None    # guidance-distilled: no CFG in Flux2Pipeline (guidance_scale is embedded)
    uncond_call = False
    default_guidance = ""

    @staticmethod
    def capture_site(layer, block):
        if layer.part == "single":   # fused: attn's output is to_out(cat[attention, mlp]) of [text, image]
            return block.attn, f"{layer.path}.attn (output: fused attention + MLP projection, image tokens)", True
        return DiTAdapter.capture_site(layer, block)

    @staticmethod
    def pipeline_class(config):
        return "Flux2Pipeline"

    @staticmethod
    def encode_negative(pipe, original_class, kind, text):
        embeds, ids = original_class.encode_prompt(pipe, prompt=text, device=pipe._execution_device,
                                                   num_images_per_prompt=1)
        return {"encoder_hidden_states": embeds, "txt_ids": ids}

    guidance_default = 4.0   # Flux2Pipeline's guidance_scale
    image_ids = staticmethod(flux2_image_ids)

    @staticmethod
    def text_inputs(config, batch, text_len, randn, device, dtype) -> dict:
        return {"txt_ids": flux2_text_ids(text_len, device=device, dtype=dtype)}   # no pooled text

    def host_inputs(self, plan, cond):
        out = super().host_inputs(plan, cond)
        if out["grid"] is not None:
            ids = _ids(cond["img_ids"])
            rows, cols = out["grid"]
            if rows * cols != ids.shape[0]:
                raise NotImplementedError(f"FLUX.2 SEG with a finite blur needs the image tokens to be one "
                                          f"{rows}x{cols} grid; img_ids hold {ids.shape[0]} tokens (reference "
                                          "images?): use an infinite blur (sigma=inf) or no reference images")
        return out

    def forward(self, plan, sample, timestep, base: dict, perms, negative: dict | None = None, nag=None,
                extras=None, grid=None):
        m = self.model
        if base.get("joint_attention_kwargs") or {}:
            raise NotImplementedError("joint_attention_kwargs are not supported by guidance-rt")
        if base.get("kv_cache") is not None or base.get("kv_cache_mode") is not None or base.get("num_ref_tokens"):
            raise NotImplementedError("FLUX.2 kv_cache / kv_cache_mode / num_ref_tokens (Klein KV reference "
                                      "caching) are not supported on guided steps")
        groups = plan.base_rows // plan.batch
        img = m.x_embedder(sample).repeat(groups, 1, 1)
        dtype = img.dtype
        t = timestep.to(dtype) * 1000
        guidance = base.get("guidance")
        g = guidance.to(dtype) * 1000 if guidance is not None else None
        temb = m.time_guidance_embed(t, g)
        # shared modulations, computed once on the base rows and gathered per row
        double = self.per_row(torch.cat([m.double_stream_modulation_img(temb),
                                         m.double_stream_modulation_txt(temb)], dim=-1), plan)
        single = self.per_row(m.single_stream_modulation(temb), plan)
        temb = self.per_row(temb, plan)
        txt = m.context_embedder(base["encoder_hidden_states"])
        img_ids = _ids(base["img_ids"])
        rope = self._rope(_ids(base["txt_ids"]), img_ids)
        ntxt = neg_rope = neg_image = None
        if nag is not None:
            ntxt = m.context_embedder(negative["encoder_hidden_states"])
            neg_rope = self._rope(_ids(negative["txt_ids"]), img_ids)
            neg_image = slice(ntxt.shape[1], None)

        n_double = len(m.transformer_blocks)
        img, txt, ntxt = self.run_blocks(m.transformer_blocks, 0, img, txt, double, rope, plan, perms, grid,
                                         ntxt=ntxt, nag=nag, nag_extra=neg_rope)
        if nag is not None:   # the negative sequence [negative text, image], as FLUX.1
            ntxt = torch.cat([ntxt, img[plan.pos_start:]], dim=1)
        img, _, _ = self.run_blocks(m.single_transformer_blocks, n_double, img, txt, single, rope, plan,
                                    perms, grid, ntxt=ntxt, nag=nag, nag_extra=neg_rope, nag_image=neg_image)
        return m.proj_out(m.norm_out(img, temb[: img.shape[0]]))

    def _rope(self, txt_ids, img_ids):
        """The model's concat_rotary_emb: pos_embed of the text and image ids, text first."""
        t, i = self.model.pos_embed(txt_ids), self.model.pos_embed(img_ids)
        return torch.cat([t[0], i[0]], dim=0), torch.cat([t[1], i[1]], dim=0)

    def stock_block(self, block, img, txt, mod, rope):
        if hasattr(block, "norm1_context"):
            d = img.shape[-1]
            return block(hidden_states=img, encoder_hidden_states=txt, temb_mod_img=mod[:, :6 * d],
                         temb_mod_txt=mod[:, 6 * d:], image_rotary_emb=rope)
        return block(hidden_states=img, encoder_hidden_states=txt, temb_mod=mod, image_rotary_emb=rope,
                     split_hidden_states=True)

    def own_block(self, block, img, txt, mod, rope, bp, grid, nag):
        if hasattr(block, "norm1_context"):
            return self._double2(block, img, txt, mod, rope, bp, grid, nag)
        return self._single2(block, img, txt, mod, rope, bp, grid, nag)

    def _double2(self, block, img, txt, mod, rope, bp, grid, nag):
        attn = block.attn
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, *c = mod.chunk(12, dim=-1)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c
        n_img = block.norm1(img) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        n_txt = block.norm1_context(txt) * (1 + c_scale_msa[:, None]) + c_shift_msa[:, None]
        mods = (c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp)
        n_neg = neg_mods = None
        if nag:
            nc = nag.temb.chunk(12, dim=-1)[6:]
            n_neg = block.norm1_context(nag.txt) * (1 + nc[1][:, None]) + nc[0][:, None]
            neg_mods = (nc[2], nc[3], nc[4], nc[5])
        if not bp.self_attn and nag is None:
            a_img, a_txt = attn(hidden_states=n_img, encoder_hidden_states=n_txt, image_rotary_emb=rope)
            a_neg = None
        else:
            self.require_processor(attn, FLUX2_PROCESSORS, f"layer {self.layers[bp.position].name}")
            if attn.fused_projections:
                raise NotImplementedError("fused QKV projections are not supported on a perturbed layer")
            text = self._text_qkv(attn, n_txt)
            neg = self._text_qkv(attn, n_neg) if nag else None
            o, o_neg = self._joint(attn, (attn.to_q(n_img), attn.to_k(n_img), attn.to_v(n_img)), 0, text, neg,
                                   rope, bp, grid, nag)
            n_txt_tokens = n_txt.shape[1]
            a_img = attn.to_out[1](attn.to_out[0](o[:, n_txt_tokens:].contiguous()))
            a_txt = attn.to_add_out(o[:, :n_txt_tokens].contiguous())
            a_neg = attn.to_add_out(o_neg.contiguous()) if o_neg is not None else None
        img = img + self.drop_rows(gate_msa[:, None] * a_img, bp.keep("attn"))
        n = block.norm2(img) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        img = img + self.drop_rows(gate_mlp[:, None] * block.ff(n), bp.keep("ff"))
        txt, neg = self.text_streams(block, bp, txt, a_txt, mods, nag, a_neg, neg_mods)
        return self._clip(txt), img, self._clip(neg)

    def _single2(self, block, img, txt, mod, rope, bp, grid, nag):
        attn = block.attn
        self.require_processor(attn, FLUX2_SINGLE_PROCESSORS, f"layer {self.layers[bp.position].name}")
        n_txt_tokens = txt.shape[1]
        x = torch.cat([txt, img], dim=1)
        shift, scale, gate = mod.chunk(3, dim=-1)

        def project(seq, shift, scale, keep_ff):
            n = block.norm(seq) * (1 + scale[:, None]) + shift[:, None]
            h = attn.to_qkv_mlp_proj(n)
            qkv, mlp = h.split([3 * attn.inner_dim, h.shape[-1] - 3 * attn.inner_dim], dim=-1)
            return qkv.chunk(3, dim=-1), self.drop_rows(attn.mlp_act_fn(mlp), keep_ff)

        qkv, mlp = project(x, shift, scale, bp.keep("ff"))
        neg_qkv = neg_mlp = None
        if nag:   # nag.txt: the whole negative sequence [text, image]
            ns, nsc, ngate = nag.temb.chunk(3, dim=-1)
            neg_qkv, neg_mlp = project(nag.txt, ns, nsc, bp.keep("ff", nag.pos_start))
        o, o_neg = self._joint(attn, qkv, n_txt_tokens, None, neg_qkv, rope, bp, grid, nag)
        o = self.drop_rows(o, bp.keep("attn"))
        x = self._clip(x + gate[:, None] * attn.to_out(torch.cat([o, mlp], dim=2)))
        neg = None
        if nag:
            o_neg = self.drop_rows(o_neg, bp.keep("attn", nag.pos_start))
            neg = self._clip(nag.txt + ngate[:, None] * attn.to_out(torch.cat([o_neg, neg_mlp], dim=2)))
        return x[:, :n_txt_tokens], x[:, n_txt_tokens:], neg

    def _joint(self, attn, qkv, image_start, text, neg, rope, bp, grid, nag):
        """Flux2 attention with per-row variants and NAG, heads merged, before any output
        projection. `qkv`: flat projections of x, whose image tokens start at `image_start`;
        `text`: the double block's text (q, k, v) (normed, per head), placed first; `neg`: with
        NAG, the double block's negative text (q, k, v) (normed) or the single block's negative
        sequence's flat projections. Returns (output of [text, image], negative output or None:
        the negative text's (double) or the whole negative sequence's (single))."""
        from diffusers.models.embeddings import apply_rotary_emb

        unflat = lambda t: t.unflatten(-1, (-1, attn.head_dim))
        rotate = lambda t, r: apply_rotary_emb(t, r, sequence_dim=1).transpose(1, 2)   # -> (R, H, N, d)
        q, k, v = qkv
        n_x = q.shape[1]
        q = attn.norm_q(unflat(ops.blur_queries(q, bp.self_attn, grid, slice(image_start, None))))
        k, v = attn.norm_k(unflat(k)), unflat(v)
        if text is not None:
            q, k, v = (torch.cat([a, b], 1) for a, b in zip(text, (q, k, v)))
        n_txt = q.shape[1] - (n_x - image_start)
        image = slice(n_txt, None)
        q, k, v = rotate(q, rope), rotate(k, rope), v.transpose(1, 2)
        heads_merged = lambda t: t.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if nag is not None and text is not None:
            # double block: the negative text beside the positive rows' image tokens (same image
            # ids, so the same rotary embedding): their keys are shared
            nq, nk, nv = neg
            neg_rope = tuple(f[:nq.shape[1]] for f in nag.extra)
            o, o_neg = ops.joint_nag_attention(q, k, v, image, bp.attn, nag.pos_start,
                                               (rotate(nq, neg_rope), rotate(nk, neg_rope), nv.transpose(1, 2)),
                                               bp.nag_attn, nag.step)
            return heads_merged(o), heads_merged(o_neg)
        o = heads_merged(ops.variant_attention(q, k, v, bp.attn, image))
        if nag is None:
            return o, None
        # single block (the NAG authors'): the negative sequence's own tokens, SEG's queries
        # included; its image tokens differ from the positive ones, so nothing is shared
        ps, s = nag.pos_start, nag.step
        nq, nk, nv = neg
        n_neg = nq.shape[1] - (n_x - image_start)
        nq = attn.norm_q(unflat(ops.blur_queries(nq, bp.pos_attn, grid, slice(n_neg, None))))
        nk, nv = attn.norm_k(unflat(nk)), unflat(nv)
        on = heads_merged(ops.variant_attention(rotate(nq, nag.extra), rotate(nk, nag.extra), nv.transpose(1, 2),
                                                bp.nag_attn, slice(n_neg, None)))
        guided = ops.nag_combine(o[ps:, image], on[:, n_neg:], s.phi, s.tau, s.alpha, s.norm)
        o = torch.cat([o[:ps], torch.cat([o[ps:, :n_txt], guided], 1)])
        # both sequences' image tokens get the combined output
        o_neg = torch.cat([on[:, :n_neg], guided], 1)
        return o, o_neg
