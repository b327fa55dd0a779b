"""UNet2DConditionModel (SD1.5, SDXL): the packed forward.

Rows fork at the first perturbed BasicTransformerBlock; the skip connections taken before the
fork are computed once and grown with cond-row copies where the up blocks consume them.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import ops
from ..effects import Segment
from ..layers import Layer
from ..plan import StepPlan
from .base import Adapter

UNET_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")
UNSUPPORTED_KWARGS = ("class_labels", "attention_mask", "encoder_attention_mask",
                      "down_intrablock_additional_residuals")


class UNetAdapter(Adapter):
    name = "unet"
    title = "SD1.5/SDXL"
    classes = ("UNet2DConditionModel",)
    pipelines = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusionXLControlNetPipeline")
    denoiser_attribute = "unet"
    by_index = False   # d6, m0, u3: bare integers would be ambiguous
    parts = ("down", "mid", "up")
    default_layers = {"attention": "mid", "tokens": "d6-d23", "skip": "mid"}
    self_attention = "attn1"
    nag_alpha = 0.5
    mean_identical = True
    text_tokens = 77   # CLIP
    semantic_maps = True

    @staticmethod
    def capture_site(layer, block):
        which = "attn2" if getattr(block, "attn2", None) is not None else "attn1"   # cross-attention if any
        return getattr(block, which).to_out[0], f"{layer.path}.{which}.to_out.0", False

    @staticmethod
    def scheduler():
        import diffusers
        return diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                steps_offset=1, timestep_spacing="leading")

    @staticmethod
    def model_input(scheduler, x, t, n):
        return scheduler.scale_model_input(x, t), t.expand(n)

    @staticmethod
    def pipeline_class(config):
        return ("StableDiffusionXLPipeline" if config.get("addition_embed_type") == "text_time"
                else "StableDiffusionPipeline")

    @staticmethod
    def encode_negative(pipe, original_class, kind, text):
        out = original_class.encode_prompt(pipe, prompt=text, device=pipe._execution_device, num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)
        # SD returns (embeds, negative embeds); SDXL also the pooled ones, which NAG does not read
        return {"encoder_hidden_states": out[0]}

    @staticmethod
    def example_step(config, batch, height, width, text_len, t, randn):
        sample = randn(batch, config["in_channels"], height, width)
        timestep = torch.full((batch,), round(t * 999), dtype=torch.long, device=sample.device)
        ctx = config["cross_attention_dim"]
        ctx = ctx[0] if isinstance(ctx, (tuple, list)) else ctx
        if config.get("addition_embed_type") != "text_time":
            return sample, timestep, lambda: {"encoder_hidden_states": randn(batch, text_len, ctx)}
        text_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        # SDXL's (original h, w, crop top, left, target h, w), in image pixels (the VAE's 8x)
        ph, pw = height * 8, width * 8
        time_ids = torch.tensor([ph, pw, 0, 0, ph, pw], dtype=sample.dtype, device=sample.device).repeat(batch, 1)
        return sample, timestep, lambda: {
            "encoder_hidden_states": randn(batch, text_len, ctx),
            "added_cond_kwargs": {"text_embeds": randn(batch, text_dim), "time_ids": time_ids.clone()}}

    def __init__(self, model: nn.Module):
        super().__init__(model)
        cfg = model.config
        if getattr(cfg, "addition_embed_type", None) == "image_hint":
            raise NotImplementedError("UNet addition_embed_type='image_hint' is not supported")
        # position of the first block of every Transformer2DModel
        self.first_position: dict[int, int] = {}
        blocks = {id(b): l.position for l, b in zip(self.layers, self._blocks())}
        for t2d in self._transformers():
            self.first_position[id(t2d)] = blocks[id(t2d.transformer_blocks[0])]
        # every block's resolution level (downsamplings applied before it): TPG's token counts
        self.level: dict[int, int] = {}
        level = 0
        for block in model.down_blocks:
            self._set_level(block, level)
            level += bool(block.downsamplers)
        if model.mid_block is not None:
            self._set_level(model.mid_block, level)
        for block in model.up_blocks:
            self._set_level(block, level)
            level -= bool(block.upsamplers)
        self._sizes: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def _set_level(self, block, level: int):
        for t2d in getattr(block, "attentions", None) or []:
            first = self.first_position[id(t2d)]
            self.level.update((p, level) for p in range(first, first + len(t2d.transformer_blocks)))

    def image_tokens(self, sample, position):
        h, w = self._level_sizes(tuple(sample.shape[-2:]))[self.level[position]]
        return h * w

    def _level_sizes(self, hw: tuple[int, int]) -> list[tuple[int, int]]:
        """The latent size at every resolution level, from the downsamplers' own shape rules
        (run on the meta device); kept for a few sample sizes."""
        if hw not in self._sizes:
            if len(self._sizes) >= 8:
                self._sizes.pop(next(iter(self._sizes)))
            sizes = [hw]
            for block in self.model.down_blocks:
                for down in block.downsamplers or []:
                    x = torch.empty(1, down.channels, *sizes[-1], device="meta")
                    meta = {n: t.to("meta") for n, t in [*down.named_parameters(), *down.named_buffers()]}
                    sizes.append(tuple(torch.func.functional_call(down, meta, (x,)).shape[-2:]))
            self._sizes[hw] = sizes
        return self._sizes[hw]

    def attended(self, bp):
        return ops.qk_segments(bp.self_attn)[0]   # PAG-identity rows need only V

    @staticmethod
    def enumerate_layers(model: nn.Module) -> list[Layer]:
        """Every BasicTransformerBlock, named d<i>, m<i>, u<i> in module order per part (SDXL:
        d0-d23, m0-m9, u0-u35)."""
        out: list[Layer] = []
        parts = [("down", "d", [(f"down_blocks.{i}", b) for i, b in enumerate(model.down_blocks)]),
                 ("mid", "m", [("mid_block", model.mid_block)] if model.mid_block is not None else []),
                 ("up", "u", [(f"up_blocks.{i}", b) for i, b in enumerate(model.up_blocks)])]
        for part, letter, blocks in parts:
            n = 0
            for prefix, block in blocks:
                for j, t2d in enumerate(getattr(block, "attentions", None) or []):
                    for k, tb in enumerate(getattr(t2d, "transformer_blocks", [])):
                        out.append(Layer(f"{letter}{n}", f"{prefix}.attentions.{j}.transformer_blocks.{k}",
                                         part, len(out), tb.attn1.heads))
                        n += 1
        return out

    def output(self, sample, return_dict):
        if not return_dict:
            return (sample,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
        return UNet2DConditionOutput(sample=sample)

    def _transformers(self):
        m = self.model
        for block in list(m.down_blocks) + ([m.mid_block] if m.mid_block is not None else []) + list(m.up_blocks):
            yield from getattr(block, "attentions", None) or []

    def _blocks(self):
        for t2d in self._transformers():
            yield from t2d.transformer_blocks

    # ---------------------------------------------------------------- forward

    def forward(self, plan: StepPlan, sample: torch.Tensor, timestep: torch.Tensor, base: dict, perms,
                negative: dict | None = None, nag=None, extras: dict | None = None):
        """extras["maps"]: S-CFG's SemanticMaps, fed by the blocks on its grids (uncond + cond rows)."""
        m = self.model
        maps = (extras or {}).get("maps")
        for key in UNSUPPORTED_KWARGS:
            if base.get(key) is not None:
                raise NotImplementedError(f"UNet forward argument {key!r} is not supported by guidance-rt")
        cak = base.get("cross_attention_kwargs") or {}
        if cak:
            raise NotImplementedError(f"cross_attention_kwargs {sorted(cak)} are not supported by guidance-rt")
        if getattr(m.up_blocks[0], "s1", None) is not None and getattr(m.up_blocks[0], "b1", None) is not None:
            raise NotImplementedError("FreeU is enabled on this UNet; disable it (unet.disable_freeu())")
        groups = plan.base_rows // plan.batch
        up_factor = 2 ** m.num_upsamplers
        forward_upsample_size = any(d % up_factor for d in sample.shape[-2:])

        if m.config.center_input_sample:
            sample = 2 * sample - 1.0
        # 1. time and conditioning embeddings on the base rows, then one row per layout row
        base_sample = sample[:1].expand(plan.base_rows, *sample.shape[1:])  # shape only, no copy
        t_emb = m.get_time_embed(sample=base_sample, timestep=timestep)
        emb = m.time_embedding(t_emb, base.get("timestep_cond"))
        ehs = base["encoder_hidden_states"]
        aug = m.get_aug_embed(emb=emb, encoder_hidden_states=ehs, added_cond_kwargs=base.get("added_cond_kwargs") or {})
        emb = emb + aug if aug is not None else emb
        if m.time_embed_act is not None:
            emb = m.time_embed_act(emb)
        ehs = m.process_encoder_hidden_states(encoder_hidden_states=ehs,
                                              added_cond_kwargs=base.get("added_cond_kwargs") or {})
        emb, ehs = self.per_row(emb, plan), self.per_row(ehs, plan)
        neg = None
        if nag is not None:   # NAG's negative text for every row (read only on positive rows)
            neg = m.process_encoder_hidden_states(encoder_hidden_states=negative["encoder_hidden_states"],
                                                  added_cond_kwargs=negative.get("added_cond_kwargs") or {})
            neg = neg.index_select(0, plan.sample_index)

        # 2. conv_in is the same for uncond and cond: compute it once per user sample
        h = m.conv_in(sample).repeat(groups, 1, 1, 1)
        res: list[torch.Tensor] = [h]

        def transformer(t2d, h):
            return self._transformer2d(t2d, h, ehs, plan, perms, neg, nag, maps)

        # 3. down
        for block in m.down_blocks:
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            for resnet, t2d in zip(block.resnets, attentions):
                h = resnet(h, emb[: h.shape[0]])
                if t2d is not None:
                    h = transformer(t2d, h)
                res.append(h)
            for down in block.downsamplers or []:
                h = down(h)
                res.append(h)

        controls = base.get("down_block_additional_residuals")
        if controls is not None:
            res = [r + self.per_row(c, plan)[: r.shape[0]] for r, c in zip(res, controls)]

        # 4. mid
        if m.mid_block is not None:
            mb = m.mid_block
            h = mb.resnets[0](h, emb[: h.shape[0]])
            for t2d, resnet in zip(mb.attentions, mb.resnets[1:]):
                h = transformer(t2d, h)
                h = resnet(h, emb[: h.shape[0]])
        mid_control = base.get("mid_block_additional_residual")
        if mid_control is not None:
            h = h + self.per_row(mid_control, plan)[: h.shape[0]]

        # 5. up: skip connections grow to the rows alive now
        upsample_size = None
        for i, block in enumerate(m.up_blocks):
            n = len(block.resnets)
            skips, res = res[-n:], res[:-n]
            if i < len(m.up_blocks) - 1 and forward_upsample_size:
                upsample_size = res[-1].shape[2:]
            attentions = getattr(block, "attentions", None) or [None] * n
            for resnet, t2d in zip(block.resnets, attentions):
                skip = self.grow(skips.pop(), h.shape[0], plan)
                h = resnet(torch.cat([h, skip], dim=1), emb[: h.shape[0]])
                if t2d is not None:
                    h = transformer(t2d, h)
            for up in block.upsamplers or []:
                h = up(h, upsample_size)

        # 6. out
        if m.conv_norm_out is not None:
            h = m.conv_act(m.conv_norm_out(h))
        return m.conv_out(h)

    # ---------------------------------------------------------------- Transformer2DModel

    def _transformer2d(self, t2d, h, ehs, plan: StepPlan, perms, neg=None, nag=None, maps=None):
        first = self.first_position[id(t2d)]
        positions = range(first, first + len(t2d.transformer_blocks))
        touched = [p for p in positions if p in plan.blocks]
        if maps is not None and maps.level(tuple(h.shape[-2:])) is None:
            maps = None
        if not touched and nag is None and maps is None:
            for p in positions:
                self.record(p, h.shape[0])
            return t2d(h, encoder_hidden_states=ehs[: h.shape[0]], return_dict=False)[0]
        if not t2d.is_input_continuous:
            raise NotImplementedError("only continuous-input Transformer2DModel blocks are supported")
        _, _, height, width = h.shape
        residual = h
        x, inner_dim = t2d._operate_on_continuous_inputs(h)
        for p, block in zip(positions, t2d.transformer_blocks):
            bp = plan.block(p)
            if bp.forks:
                x, residual = self.grow(x, bp.rows, plan), self.grow(residual, bp.rows, plan)
            run = bp.run
            xr = run.take(x) if run else x
            er = run.take(ehs[: bp.rows]) if run else ehs[: bp.rows]
            nr = (run.take(neg[: bp.rows]) if run else neg[: bp.rows]) if neg is not None else None
            self.record(p, xr.shape[0])
            xr = self.shuffle(xr, bp, perms)
            if bp.self_attn or bp.skip_attn or bp.skip_ff or nag is not None or maps is not None:
                xr = self._basic_block(block, xr, er, bp, (height, width), nr, nag, plan.pos_start, maps)
            else:
                xr = block(xr, encoder_hidden_states=er)
            x = run.put(x, xr) if run else xr
        return t2d._get_output_for_continuous_inputs(x, residual, x.shape[0], height, width, inner_dim)

    def _basic_block(self, block, x, ehs, bp, grid, neg=None, nag=None, pos_start=0, maps=None):
        """BasicTransformerBlock (layer_norm type, as in SD1.5 / SDXL) with per-row variants."""
        if block.norm_type != "layer_norm" or block.pos_embed is not None or block.only_cross_attention \
                or getattr(block, "_chunk_size", None) is not None:
            raise NotImplementedError(
                f"BasicTransformerBlock with norm_type={block.norm_type!r}, positional embedding, "
                "cross-attention only or chunked feed-forward is not supported on a perturbed layer")
        stat_rows = 2 * maps.batch if maps is not None else 0   # S-CFG reads the uncond + cond rows
        a, qk = self._self_attention(block.attn1, block.norm1(x), bp, grid, stat_rows)
        x = self.drop_rows(a, bp.keep("attn")) + x
        if block.attn2 is not None:
            n = block.norm2(x)
            if nag is None and maps is None:
                a = block.attn2(n, encoder_hidden_states=ehs)
            else:
                a, cross = self._cross_attention(block.attn2, n, ehs, neg, nag, pos_start, bp, stat_rows)
                if maps is not None:
                    maps.add(*qk, cross, grid)
            x = self.drop_rows(a, bp.keep("attn")) + x
        f = block.ff(block.norm3(x))
        return self.drop_rows(f, bp.keep("ff")) + x

    def _cross_attention(self, attn, x, ehs, neg, nag, pos_start, bp, stat_rows=0):
        """attn2 computed here: with NAG on the positive rows (the same queries against the
        positive and the negative text, combined per token before to_out, methods.md section 5),
        and/or returning the head-mean probabilities of the first `stat_rows` rows (S-CFG)."""
        self.require_processor(attn, UNET_PROCESSORS, f"layer {self.layers[bp.position].name}")
        if attn.norm_cross is not None or attn.group_norm is not None or attn.residual_connection:
            raise NotImplementedError("cross-attention with norm_cross, group norm or a residual "
                                      "connection is not supported by NAG / S-CFG")
        heads = attn.heads
        q = attn.to_q(x)

        def split(t):
            return t.view(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2)

        def attend(q, text):
            k, v = split(attn.to_k(text)), split(attn.to_v(text))
            o = ops.sdpa(split(q), k, v)
            return o.transpose(1, 2).reshape(o.shape[0], -1, o.shape[1] * o.shape[-1]).to(q.dtype), k

        z, k = attend(q, ehs)
        cross = None
        if stat_rows:
            qs = split(q[:stat_rows])
            logits = qs.float() @ k[:stat_rows].float().transpose(-1, -2) * attn.scale
            cross = logits.softmax(-1).mean(1)
        if nag is not None:   # both attentions and the combine in the NAG op
            ps = pos_start
            zp = ops.nag_attention(split(q[ps:]), k[ps:], split(attn.to_v(ehs[ps:])), split(attn.to_k(neg[ps:])),
                                   split(attn.to_v(neg[ps:])), nag.phi, nag.tau, nag.alpha, nag.norm)
            zp = zp.transpose(1, 2).reshape(zp.shape[0], -1, zp.shape[1] * zp.shape[-1]).to(q.dtype)
            z = torch.cat([z[:ps], zp])
        return attn.to_out[1](attn.to_out[0](z)), cross

    def _self_attention(self, attn, x, bp, grid, stat_rows=0):
        """attn1 with the plan's row variants; PAG rows compute only V (and to_out). With
        `stat_rows`, also returns the head-split (q, k) of those first rows (S-CFG)."""
        segments = bp.self_attn
        if not segments and not stat_rows:
            return attn(x), None
        segments = segments or (Segment(0, x.shape[0]),)
        self.require_processor(attn, UNET_PROCESSORS, f"layer {self.layers[bp.position].name}")
        if attn.spatial_norm is not None or attn.group_norm is not None or attn.residual_connection \
                or attn.rescale_output_factor != 1.0:
            raise NotImplementedError("self-attention with spatial/group norm or residual connection "
                                      "is not supported on a perturbed layer")
        v = attn.to_v(x)
        qsegs, rows = ops.qk_segments(segments)
        pieces, qk = {}, None
        if qsegs:
            xq = torch.cat([x[r] for r in rows]) if len(rows) > 1 else x[rows[0]]
            vq = torch.cat([v[r] for r in rows]) if len(rows) > 1 else v[rows[0]]
            q = ops.blur_queries(attn.to_q(xq), qsegs, grid, slice(None))
            k = attn.to_k(xq)
            n, heads = xq.shape[0], attn.heads
            split = lambda t: t.view(n, -1, heads, t.shape[-1] // heads).transpose(1, 2)
            q, k, vh = split(q), split(k), split(vq)
            if attn.norm_q is not None:
                q, k = attn.norm_q(q), attn.norm_k(k)
            qk = (q[:stat_rows], k[:stat_rows])   # the base rows come first and are never PAG rows
            o = ops.variant_attention(q, k, vh, bp.attn)
            o = o.transpose(1, 2).reshape(n, -1, heads * vh.shape[-1]).to(q.dtype)
            for s, r in zip(qsegs, rows):
                pieces[r.start] = o[s.rows]
        out = [v[s.rows] if s.variant is not None and s.variant.identity else pieces[s.start] for s in segments]
        out = torch.cat(out) if len(out) > 1 else out[0]
        return attn.to_out[1](attn.to_out[0](out)), qk
