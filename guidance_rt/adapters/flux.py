"""FluxTransformer2DModel (FLUX.1): the packed forward over double- and single-stream blocks."""
from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ..attention import mmdit_identity_map, query_variants, variant_attention
from ..plan import BLUR
from .dit import DiTAdapter

FLUX_PROCESSORS = ("FluxAttnProcessor",)


def flux_grid(img_ids: torch.Tensor) -> tuple[int, int]:
    """(rows, cols) of the packed latent grid; img_ids is row-major (_prepare_latent_image_ids)."""
    return int(img_ids[:, 1].max()) + 1, int(img_ids[:, 2].max()) + 1


class FluxAdapter(DiTAdapter):
    family = "flux"

    def forward(self, plan, sample, timestep, base: dict, perms):
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
        if guidance is not None:
            temb = m.time_text_embed(t, guidance.to(dtype) * 1000, base["pooled_projections"])
        else:
            temb = m.time_text_embed(t, base["pooled_projections"])
        temb = self.per_row(temb, plan)
        txt = m.context_embedder(base["encoder_hidden_states"])
        txt_ids, img_ids = base["txt_ids"], base["img_ids"]
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        rope = m.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        needs_grid = any(s.mode == BLUR for bp in plan.blocks.values() for s in bp.self_attn)
        grid = flux_grid(img_ids) if needs_grid else None

        n_double = len(m.transformer_blocks)
        img, txt = self.run_blocks(m.transformer_blocks, 0, img, txt, temb, rope, plan, perms, grid)
        img, txt = self.run_blocks(m.single_transformer_blocks, n_double, img, txt, temb, rope, plan,
                                   perms, grid)
        return m.proj_out(m.norm_out(img, temb[: img.shape[0]]))

    def stock_block(self, block, img, txt, temb, rope):
        return block(hidden_states=img, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rope)

    def own_block(self, block, img, txt, temb, rope, bp, grid):
        if hasattr(block, "norm1_context"):
            return self._double_block(block, img, txt, temb, rope, bp, grid)
        return self._single_block(block, img, txt, temb, rope, bp, grid)

    def _double_block(self, block, img, txt, temb, rope, bp, grid):
        n_img, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(img, emb=temb)
        n_txt, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(txt, emb=temb)
        a_img, a_txt = self._attention(block.attn, n_img, n_txt, rope, bp, grid)
        img = img + self.drop_rows(gate_msa.unsqueeze(1) * a_img, bp.skip_attn)
        n = block.norm2(img) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        img = img + self.drop_rows(gate_mlp.unsqueeze(1) * block.ff(n), bp.skip_ff)
        txt = txt + self.drop_rows(c_gate_msa.unsqueeze(1) * a_txt, bp.skip_attn)
        n = block.norm2_context(txt) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        txt = txt + self.drop_rows(c_gate_mlp.unsqueeze(1) * block.ff_context(n), bp.skip_ff)
        if txt.dtype == torch.float16:
            txt = txt.clip(-65504, 65504)
        return txt, img

    def _single_block(self, block, img, txt, temb, rope, bp, grid):
        n_txt_tokens = txt.shape[1]
        x = torch.cat([txt, img], dim=1)
        n, gate = block.norm(x, emb=temb)
        mlp = self.drop_rows(block.act_mlp(block.proj_mlp(n)), bp.skip_ff)
        a = self.drop_rows(self._attention(block.attn, n, None, rope, bp, grid, image_start=n_txt_tokens),
                           bp.skip_attn)
        x = x + gate.unsqueeze(1) * block.proj_out(torch.cat([a, mlp], dim=2))
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        return x[:, :n_txt_tokens], x[:, n_txt_tokens:]

    def _attention(self, attn, x, c, rope, bp, grid, image_start=0):
        """FluxAttnProcessor with per-row variants; tokens are [text, image]."""
        if not bp.self_attn:
            if c is None:
                return attn(hidden_states=x, image_rotary_emb=rope)
            return attn(hidden_states=x, encoder_hidden_states=c, image_rotary_emb=rope)
        self.require_processor(attn, FLUX_PROCESSORS, f"layer {self.layers[bp.position].name}")
        if attn.fused_projections:
            raise NotImplementedError("fused QKV projections are not supported on a perturbed layer")
        q = query_variants(attn.to_q(x), bp.self_attn, grid, slice(image_start, None))
        k, v = attn.to_k(x), attn.to_v(x)
        unflat = lambda t: t.unflatten(-1, (-1, attn.head_dim))
        q, k, v = attn.norm_q(unflat(q)), attn.norm_k(unflat(k)), unflat(v)
        n_txt = 0
        if c is not None:
            n_txt = c.shape[1]
            cq = attn.norm_added_q(unflat(attn.add_q_proj(c)))
            ck = attn.norm_added_k(unflat(attn.add_k_proj(c)))
            cv = unflat(attn.add_v_proj(c))
            q, k, v = torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1)
        q = apply_rotary_emb(q, rope, sequence_dim=1)
        k = apply_rotary_emb(k, rope, sequence_dim=1)
        image = slice(n_txt + image_start, None)
        o = variant_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bp.self_attn,
                              mmdit_identity_map(image))
        o = o.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if c is None:
            return o
        o_txt, o_img = o[:, :n_txt], o[:, n_txt:]
        return attn.to_out[1](attn.to_out[0](o_img.contiguous())), attn.to_add_out(o_txt.contiguous())
