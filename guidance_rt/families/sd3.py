"""SD3Transformer2DModel (SD3, SD3.5 with dual attention and qk-norm): the packed forward."""
from __future__ import annotations

import torch

from .. import ops
from ..layers import Layer
from .dit import DiTAdapter, NagStream

SD3_PROCESSORS = ("JointAttnProcessor2_0",)


class SD3Adapter(DiTAdapter):
    """SD3 / SD3.5: the joint blocks of `transformer_blocks`, by index (`7`, `"7"`, `"7-9"`)."""

    name = "sd3"
    title = "SD3"
    classes = ("SD3Transformer2DModel",)
    pipelines = ("StableDiffusion3Pipeline",)
    default_layers = {"attention": "1", "tokens": "1", "skip": (7, 8, 9)}
    nag_alpha = 0.125
    mean_identical = True   # qk-norm keeps a mean-blurred row's image queries identical
    text_tokens = 77 + 256   # CLIP + T5
    default_guidance = "cfg=4"

    @staticmethod
    def latent_multiple(config):
        return config.get("patch_size", 1)

    @staticmethod
    def latent_limit(config):
        grid = config.get("pos_embed_max_size")
        return grid * config.get("patch_size", 1) if grid else None

    @staticmethod
    def pipeline_class(config):
        return "StableDiffusion3Pipeline"

    @staticmethod
    def encode_negative(pipe, original_class, kind, text):
        embeds, _, pooled, _ = original_class.encode_prompt(
            pipe, prompt=text, prompt_2=None, prompt_3=None, device=pipe._execution_device, num_images_per_prompt=1,
            do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    @staticmethod
    def example_step(config, batch, height, width, text_len, t, randn):
        sample = randn(batch, config["in_channels"], height, width)
        timestep = torch.full((batch,), t * 1000.0, dtype=torch.float32, device=sample.device)
        return sample, timestep, lambda: {
            "encoder_hidden_states": randn(batch, text_len, config["joint_attention_dim"]),
            "pooled_projections": randn(batch, config["pooled_projection_dim"])}

    @staticmethod
    def enumerate_layers(model) -> list[Layer]:
        return [Layer(str(i), f"transformer_blocks.{i}", "joint", i, b.attn.heads)
                for i, b in enumerate(model.transformer_blocks)]

    def output_shape(self, sample):
        return (sample.shape[0], self.model.out_channels, *sample.shape[2:])

    def image_tokens(self, sample, position):
        patch = self.model.config.patch_size
        return (sample.shape[-2] // patch) * (sample.shape[-1] // patch)

    def forward(self, plan, sample, timestep, base: dict, perms, negative: dict | None = None, nag=None,
                extras=None):
        m = self.model
        if (base.get("joint_attention_kwargs") or {}):
            raise NotImplementedError("joint_attention_kwargs (IP-Adapter) are not supported by guidance-rt")
        groups = plan.base_rows // plan.batch
        height, width = sample.shape[-2:]
        patch = m.config.patch_size
        # the patch embedding depends on the sample only: once per user sample
        img = m.pos_embed(sample).contiguous().repeat(groups, 1, 1)
        temb = self.per_row(m.time_text_embed(timestep, base["pooled_projections"]), plan)
        txt = m.context_embedder(base["encoder_hidden_states"])
        ntxt = m.context_embedder(negative["encoder_hidden_states"]) if nag is not None else None

        controls = base.get("block_controlnet_hidden_states")
        add_control = None
        if controls is not None:
            interval = len(m.transformer_blocks) / len(controls)

            def add_control(i, block, x):
                if block.context_pre_only:
                    return x
                return x + self.per_row(controls[int(i / interval)], plan)[: x.shape[0]]

        img, _, _ = self.run_blocks(m.transformer_blocks, 0, img, txt, temb, None, plan, perms,
                                    (height // patch, width // patch), add_control, ntxt, nag)
        img = m.proj_out(m.norm_out(img, temb[: img.shape[0]]))
        h, w = height // patch, width // patch
        img = img.reshape(img.shape[0], h, w, patch, patch, m.out_channels)
        img = torch.einsum("nhwpqc->nchpwq", img)
        return img.reshape(img.shape[0], m.out_channels, h * patch, w * patch)

    def stock_block(self, block, img, txt, temb, extra):
        return block(hidden_states=img, encoder_hidden_states=txt, temb=temb)

    def own_block(self, block, img, txt, temb, extra, bp, grid, nag: NagStream | None):
        """JointTransformerBlock with per-row variants and NAG (mirrors diffusers' block)."""
        if getattr(block, "_chunk_size", None) is not None:
            raise NotImplementedError("chunked feed-forward is not supported on a perturbed layer")
        if block.use_dual_attention:
            n_img, gate_msa, shift_mlp, scale_mlp, gate_mlp, n_img2, gate_msa2 = block.norm1(img, emb=temb)
        else:
            n_img, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(img, emb=temb)

        def text_norm(t, emb):
            if block.context_pre_only:
                return block.norm1_context(t, emb), None
            n, *mods = block.norm1_context(t, emb=emb)
            return n, mods

        n_txt, mods = text_norm(txt, temb)
        n_neg, neg_mods = text_norm(nag.txt, nag.temb) if nag else (None, None)
        a_img, a_txt, a_neg = self._joint_attention(block.attn, n_img, n_txt, n_neg, bp, grid, nag)
        img = img + self.drop_rows(gate_msa.unsqueeze(1) * a_img, bp.keep("attn"))
        if block.use_dual_attention:
            a2 = block.attn2(hidden_states=n_img2)
            img = img + self.drop_rows(gate_msa2.unsqueeze(1) * a2, bp.keep("attn"))
        n = block.norm2(img) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        img = img + self.drop_rows(gate_mlp.unsqueeze(1) * block.ff(n), bp.keep("ff"))
        if block.context_pre_only:
            return None, img, None

        txt, neg = self.text_streams(block, bp, txt, a_txt, mods, nag, a_neg, neg_mods)
        return txt, img, neg

    def _joint_attention(self, attn, x, c, cn, bp, grid, nag: NagStream | None):
        """JointAttnProcessor2_0 with per-row variants and NAG; tokens are [image, text]."""
        if not bp.self_attn and nag is None:
            a_img, a_txt = attn(hidden_states=x, encoder_hidden_states=c)
            return a_img, a_txt, None
        self.require_processor(attn, SD3_PROCESSORS, f"layer {self.layers[bp.position].name}")
        n_img, heads = x.shape[1], attn.heads
        q = ops.blur_queries(attn.to_q(x), bp.self_attn, grid, slice(None))
        k, v = attn.to_k(x), attn.to_v(x)
        head_dim = k.shape[-1] // heads
        split = lambda t: t.view(t.shape[0], -1, heads, head_dim).transpose(1, 2)
        merge = lambda t: t.transpose(1, 2).reshape(t.shape[0], -1, heads * head_dim).to(q.dtype)
        q, k, v = split(q), split(k), split(v)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)

        def text_qkv(t):
            tq, tk, tv = split(attn.add_q_proj(t)), split(attn.add_k_proj(t)), split(attn.add_v_proj(t))
            if attn.norm_added_q is not None:
                tq = attn.norm_added_q(tq)
            if attn.norm_added_k is not None:
                tk = attn.norm_added_k(tk)
            return tq, tk, tv

        image = slice(0, n_img)
        cq, ck, cv = text_qkv(c)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        o_neg = None
        if nag is None:
            o = ops.variant_attention(q, k, v, bp.attn, image)
        else:
            o, o_neg = ops.joint_nag_attention(q, k, v, image, bp.attn, nag.pos_start, text_qkv(cn), bp.nag_attn,
                                               nag.step)
            o_neg = merge(o_neg)
        o = merge(o)
        o_img, o_txt = o[:, :n_img], o[:, n_img:]
        if not attn.context_pre_only:
            o_txt = attn.to_add_out(o_txt)
            o_neg = attn.to_add_out(o_neg) if o_neg is not None else None
        return attn.to_out[1](attn.to_out[0](o_img)), o_txt, o_neg
