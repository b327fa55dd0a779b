"""WanTransformer3DModel (Wan 2.1 / Wan 2.2 text-to-video): the packed forward.

A Wan block (WanTransformerBlock) is not an MM-DiT block: the text never enters the token stream.
It runs self-attention `attn1` over the video tokens (qk rms-norm across heads, 3-D rotary
embedding), cross-attention `attn2` from the video tokens to the UMT5 text, and the feed-forward
`ffn`, modulated by the block's `scale_shift_table` plus the timestep projection (one 6-vector
per row, or per row and token with Wan 2.2 TI2V's per-token timesteps). Blocks are addressed by
index: `blocks.<i>` is layer `i` (`"0-29"`).

Where each term acts:
- PAG / SEG: `attn1`. PAG's map is the identity (the output is V). SEG blurs the queries (the
  output of `to_q`, before the qk-norm and the rotary embedding, as on the other DiTs) on each
  latent frame's own token grid (frames never mix); sigma=inf is the mean over a frame's tokens.
- TPG: the block runs on tokens permuted WITHIN each frame (one permutation per frame, drawn in
  frame order from the layer's generator: Adapter.token_groups), in the DiT residual form
  ``x + (block(P x) - P x)`` (families/dit.py).
- SLG: skip="block" bypasses the block, "attn" zeroes `attn1`'s output, "ff" the `ffn` output.
- NAG: `attn2` of every block: the video queries attend to the positive and to the negative text
  (the negative's own to_k / to_v / norm_k), combined per token before `to_out` (methods.md 5,
  the UNet's attn2 form).
- CFG (APG, CFG-Zero*): WanPipeline calls the transformer twice per step, cond then uncond with
  the negative prompt (true CFG, as FLUX); guided() answers both from one packed forward. Wan 2.2
  A14B's second expert `transformer_2` is guided too (denoiser_attributes), with the pipeline's
  own boundary switch; `guidance_scale_2` is that expert's CFG scale (pipelines.py).
- S-CFG does not apply (no UNet attention maps): a clear error.
"""
from __future__ import annotations

import torch

from .. import ops
from ..layers import Layer
from ..plan import StepPlan
from .base import Adapter

WAN_PROCESSORS = ("WanAttnProcessor",)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on (R, N, H, d) with interleaved pairs (WanAttnProcessor's form)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(x)


class WanAdapter(Adapter):
    """Wan 2.x: the blocks of `blocks`, by index (`10`, `"9-10"`)."""

    name = "wan"
    title = "Wan"
    classes = ("WanTransformer3DModel",)
    pipelines = ("WanPipeline",)
    denoiser_attributes = ("transformer_2",)          # Wan 2.2 A14B's low-noise expert
    expert_cfg_arguments = {"transformer_2": "guidance_scale_2"}
    self_attention = "attn1"
    # SLG: block 10 is the default of the community's Wan SLG nodes (kijai/ComfyUI-WanVideoWrapper
    # WanVideoSLG and kijai/ComfyUI-KJNodes SkipLayerGuidanceWanVideo: blocks "10"; users report
    # 9 and 10 on 1.3B and 14B, r/StableDiffusion "Dramatically enhance the quality of Wan 2.1
    # using skip layer guidance"). No PAG / SEG / TPG layer has been published for Wan: the same
    # block.
    default_layers = {"attention": "10", "tokens": "10", "skip": (10,)}
    nag_alpha = 0.25      # NAG authors' Wan 2.1 setting (nag_alpha=0.25, nag_tau=2.5)
    text_tokens = 512     # WanPipeline pads the UMT5 text to max_sequence_length=512
    default_guidance = "cfg=5"
    cfg_argument = "guidance_scale"
    uncond_call = True
    cfg_needs_negative = False    # WanPipeline's negative prompt defaults to ""
    uncond_encoding = 0           # its one encode_prompt call returns (positive, negative)
    token_timesteps = True        # Wan 2.2 TI2V (expand_timesteps): one timestep per latent token
    batch_argument = "num_videos_per_prompt"
    pipeline_output = "frames"
    default_pixels = (832, 480)   # WanPipeline's default size (480p)

    @staticmethod
    def enumerate_layers(model) -> list[Layer]:
        return [Layer(str(i), f"blocks.{i}", "block", i, b.attn1.heads) for i, b in enumerate(model.blocks)]

    @staticmethod
    def latent_multiple(config):
        return tuple(config.get("patch_size", (1, 2, 2)))[1]

    @staticmethod
    def pipeline_class(config):
        return "WanPipeline"

    @staticmethod
    def encode_negative(pipe, original_class, kind, text):
        # WanPipeline's default max_sequence_length (encode_prompt's own default is 226)
        embeds, _ = original_class.encode_prompt(pipe, prompt=text, negative_prompt=None,
                                                 do_classifier_free_guidance=False, num_videos_per_prompt=1,
                                                 max_sequence_length=512, device=pipe._execution_device)
        return {"encoder_hidden_states": embeds.to(pipe.transformer.dtype if pipe.transformer is not None
                                                   else pipe.transformer_2.dtype)}

    @staticmethod
    def uncond_arguments(arguments, encoded):
        # WanPipeline.encode_prompt returns (prompt embeds, negative prompt embeds) in one call
        negative = encoded[1]
        if negative is None:
            raise ValueError("WanPipeline encoded no negative prompt but the Guidance has a CFG term")
        return dict(arguments, encoder_hidden_states=negative.to(arguments["encoder_hidden_states"].dtype))

    @staticmethod
    def example_step(config, batch, height, width, text_len, t, randn, frames=1):
        sample = randn(batch, config["in_channels"], frames, height, width)
        timestep = torch.full((batch,), t * 1000.0, dtype=torch.float32, device=sample.device)
        return sample, timestep, lambda: {"encoder_hidden_states": randn(batch, text_len, config["text_dim"])}

    @staticmethod
    def capture_site(layer, block):
        return block.attn1.to_out[0], f"{layer.path}.attn1.to_out.0", False

    def _grid(self, sample: torch.Tensor) -> tuple[int, int, int]:
        pt, ph, pw = self.model.config.patch_size
        return sample.shape[2] // pt, sample.shape[3] // ph, sample.shape[4] // pw

    def image_tokens(self, sample, position):
        f, h, w = self._grid(sample)
        return f * h * w

    def token_groups(self, sample, position):
        return self._grid(sample)[0]

    # ---------------------------------------------------------------- the step

    def forward(self, plan: StepPlan, sample, timestep, base: dict, perms, negative: dict | None = None,
                nag=None, extras=None):
        m = self.model
        if base.get("attention_kwargs") or {}:
            raise NotImplementedError("attention_kwargs are not supported by guidance-rt")
        if base.get("encoder_hidden_states_image") is not None or m.condition_embedder.image_embedder is not None:
            raise NotImplementedError("Wan image-to-video (encoder_hidden_states_image) is not supported by guidance-rt")
        grid = self._grid(sample)
        groups = plan.base_rows // plan.batch
        rope = m.rope(sample)
        # the patch embedding depends on the sample only: once per user sample
        x = m.patch_embedding(sample).flatten(2).transpose(1, 2).contiguous().repeat(groups, 1, 1)
        ts = timestep.reshape(plan.base_rows, -1)          # (rows, 1), or (rows, tokens): Wan 2.2 TI2V
        seq = ts.shape[1] if ts.shape[1] > 1 else None
        temb, proj, text, _ = m.condition_embedder(ts.flatten() if seq else ts[:, 0], base["encoder_hidden_states"],
                                                   None, timestep_seq_len=seq)
        proj = proj.unflatten(2, (6, -1)) if seq else proj.unflatten(1, (6, -1))
        temb, proj, text = self.per_row(temb, plan), self.per_row(proj, plan), self.per_row(text, plan)
        neg = None
        if nag is not None:   # the negative text for every row (read only on the positive rows)
            if m.blocks[0].attn2.add_k_proj is not None:
                raise NotImplementedError("NAG on Wan image-to-video cross-attention is not supported")
            neg = m.condition_embedder.text_embedder(negative["encoder_hidden_states"])
            neg = neg.index_select(0, plan.sample_index)

        for p, block in enumerate(m.blocks):
            bp = plan.block(p)
            if bp.plain and nag is None:
                rows = x.shape[0]
                self.record(p, rows)
                x = block(x, text[:rows], proj[:rows], rope)
                continue
            rows, run = bp.rows, bp.run
            if bp.forks:
                x = self.grow(x, rows, plan)
            take = (lambda t: run.take(t[:rows])) if run else (lambda t: t[:rows])
            xr, tr, pr = (run.take(x) if run else x), take(text), take(proj)
            nr = take(neg) if neg is not None else None
            self.record(p, xr.shape[0])
            shuffled = self.shuffle(xr, bp, perms)
            if nag is not None or bp.self_attn or bp.skip_attn or bp.skip_ff:
                out = self._block(block, shuffled, tr, pr, rope, bp, grid, nr, nag, plan.pos_start)
            else:
                out = block(shuffled, tr, pr, rope)
            if bp.shuffle:   # the residual update lands on the unpermuted tokens; exact on other rows
                out = out + (xr - shuffled)
            x = run.put(x, out) if run else out

        if temb.ndim == 3:   # per-token (Wan 2.2 TI2V)
            shift, scale = (m.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (m.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (m.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = m.proj_out(x)
        pt, ph, pw = m.config.patch_size
        f, h, w = grid
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def _block(self, block, x, text, proj, rope, bp, grid, neg, nag, pos_start):
        """WanTransformerBlock with per-row variants and NAG (mirrors diffusers' block)."""
        if proj.ndim == 4:
            mods = (block.scale_shift_table.unsqueeze(0) + proj.float()).chunk(6, dim=2)
            mods = [t.squeeze(2) for t in mods]
        else:
            mods = (block.scale_shift_table + proj.float()).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = mods
        n = (block.norm1(x.float()) * (1 + scale_msa) + shift_msa).type_as(x)
        a = self._self_attention(block.attn1, n, rope, bp, grid)
        x = (x.float() + self.drop_rows(a * gate_msa, bp.keep("attn"))).type_as(x)
        n = block.norm2(x.float()).type_as(x)
        if nag is None:
            a = block.attn2(n, text, None, None)
        else:
            a = self._cross_attention(block.attn2, n, text, neg, nag, pos_start, bp)
        x = x + a
        n = (block.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        f = block.ffn(n)
        return (x.float() + self.drop_rows(f.float() * c_gate, bp.keep("ff"))).type_as(x)

    def _check(self, attn, bp):
        self.require_processor(attn, WAN_PROCESSORS, f"layer {self.layers[bp.position].name}")
        if getattr(attn, "fused_projections", False):
            raise NotImplementedError("fused QKV projections are not supported on a perturbed layer")

    def _self_attention(self, attn, x, rope, bp, grid):
        """attn1 (WanAttnProcessor) with the plan's row variants."""
        if not bp.self_attn:
            return attn(x, None, None, rope)
        self._check(attn, bp)
        q = attn.norm_q(ops.blur_queries(attn.to_q(x), bp.self_attn, grid, slice(None)))
        k, v = attn.norm_k(attn.to_k(x)), attn.to_v(x)
        heads = lambda t: t.unflatten(2, (attn.heads, -1))
        q, k, v = _rotate(heads(q), *rope), _rotate(heads(k), *rope), heads(v)
        o = ops.variant_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bp.attn)
        o = o.transpose(1, 2).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](o))

    def _cross_attention(self, attn, x, text, neg, nag, pos_start, bp):
        """attn2 (WanAttnProcessor, text only) with NAG on the positive rows: the same queries
        against the positive and the negative text, combined per token before to_out."""
        self._check(attn, bp)
        split = lambda t: t.unflatten(2, (attn.heads, -1)).transpose(1, 2)
        q = split(attn.norm_q(attn.to_q(x)))
        k, v = split(attn.norm_k(attn.to_k(text))), split(attn.to_v(text))
        ps = pos_start
        parts = []
        if ps:
            parts.append(ops.sdpa(q[:ps], k[:ps], v[:ps]))
        kn, vn = split(attn.norm_k(attn.to_k(neg[ps:]))), split(attn.to_v(neg[ps:]))
        parts.append(ops.nag_attention(q[ps:], k[ps:], v[ps:], kn, vn, nag.phi, nag.tau, nag.alpha, nag.norm))
        o = torch.cat(parts) if len(parts) > 1 else parts[0]
        o = o.transpose(1, 2).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](o))
