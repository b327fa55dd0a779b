"""What the MM-DiT adapters (SD3, FLUX) share: the block loop over the token streams.

Both streams (image tokens, text tokens) fork together. TPG on a DiT block: the block runs on
permuted image tokens and its residual update lands on the unpermuted stream,
``img_out = img + (block(P img) - P img)``, the DiT analogue of the UNet form in which the
Transformer2DModel's outer residual is added unpermuted (a DiT block alone is permutation
equivariant, so undoing the permutation would make TPG a no-op).

With NAG a third stream runs beside them: the negative prompt's text tokens, one row per
positive row (cond and branches), updated by every block like the positive text; the blocks'
joint attention combines the image tokens' positive and negative attention (methods.md 5). The
stream is modulated by its own temb where the family has one (FLUX: from the negative pooled
projection; SD3: the positive rows'), and may carry image tokens of its own after its text (FLUX
single blocks), which TPG shuffles like the positive image tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..plan import StepPlan
from .base import Adapter


@dataclass
class NagStream:
    """NAG's negative stream of one block call (rows: the positive rows that run it)."""

    txt: torch.Tensor       # the negative text (FLUX single blocks: the sequence [text, image])
    temb: torch.Tensor      # the time embedding that modulates it
    pos_start: int          # first positive row among the rows that run the block
    step: object            # denoiser.NagStep
    extra: object = None    # family data (FLUX: the negative sequence's rotary embedding)


class DiTAdapter(Adapter):
    def prepare(self, plan: StepPlan) -> None:
        super().prepare(plan)
        if plan.nag:   # the negative stream's joint attention: the positive rows' segments
            for bp in plan.blocks.values():
                bp.nag_attn = ops.attention_runs(bp.pos_attn, self.layers[bp.position].heads, plan.device,
                                                 self.mean_identical)

    def stock_block(self, block, img, txt, temb, extra):
        raise NotImplementedError

    def own_block(self, block, img, txt, temb, extra, bp, grid, nag: NagStream | None):
        """Returns (txt, img, negative txt or None)."""
        raise NotImplementedError

    def text_streams(self, block, bp, txt, a_txt, mods, nag: NagStream | None, a_neg=None, neg_mods=None):
        """The second half of a joint block for the text stream (and NAG's negative one): gated
        attention output, then the gated context feed-forward (diffusers' block order)."""
        def update(t, a, mods, skip_attn, skip_ff):
            c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = mods
            t = t + self.drop_rows(c_gate_msa.unsqueeze(1) * a, skip_attn)
            n = block.norm2_context(t) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
            return t + self.drop_rows(c_gate_mlp.unsqueeze(1) * block.ff_context(n), skip_ff)

        txt = update(txt, a_txt, mods, bp.keep("attn"), bp.keep("ff"))
        if not nag:
            return txt, None
        ps = nag.pos_start
        return txt, update(nag.txt, a_neg, neg_mods, bp.keep("attn", ps), bp.keep("ff", ps))

    def run_blocks(self, blocks, offset, img, txt, temb, extra, plan: StepPlan, perms, grid,
                   controls=None, ntxt=None, nag=None, nag_extra=None, ntemb=None, nag_image=None):
        """Run a block list whose first block has execution position `offset`. `temb` holds every
        layout row; `ntxt` (with NAG) holds the positive rows only, `ntemb` its temb for every
        positive row of the layout (None: the positive rows' own), `nag_image` the image tokens
        inside `ntxt` (None: text only)."""
        ps = plan.pos_start
        for i, block in enumerate(blocks):
            p = offset + i
            bp = plan.block(p)
            if bp.plain and nag is None:
                rows = img.shape[0]
                self.record(p, rows)
                txt, img = self.stock_block(block, img, txt, temb[:rows], extra)
            else:
                rows, run = bp.rows, bp.run
                if bp.forks:
                    img, txt = self.grow(img, rows, plan), self.grow(txt, rows, plan)
                    ntxt = self.grow(ntxt, rows - ps, plan, cond=slice(0, plan.batch))
                ir = run.take(img) if run else img
                tr = run.take(txt) if (run and txt is not None) else txt
                te = run.take(temb[:rows]) if run else temb[:rows]
                self.record(p, ir.shape[0])
                shuffled = self.shuffle(ir, bp, perms)
                stream = None
                if nag is not None:
                    nr = bp.run_pos.take(ntxt) if run else ntxt
                    ne = te[ps:]
                    if ntemb is not None:
                        ne = bp.run_pos.take(ntemb[:rows - ps]) if run else ntemb[:rows - ps]
                    nr_shuffled = self.shuffle(nr, bp, perms, nag_image, first=ps) if nag_image else nr
                    stream = NagStream(nr_shuffled, ne, ps, nag, nag_extra)
                if nag is not None or bp.self_attn or bp.skip_attn or bp.skip_ff:
                    tr_out, ir_out, nr_out = self.own_block(block, shuffled, tr, te, extra, bp, grid, stream)
                else:
                    tr_out, ir_out = self.stock_block(block, shuffled, tr, te, extra)
                    nr_out = None
                if bp.shuffle:  # exact zero on rows that were not shuffled
                    ir_out = ir_out + (ir - shuffled)
                    if nr_out is not None and nag_image:
                        nr_out = nr_out + (nr - nr_shuffled)
                img = run.put(img, ir_out) if run else ir_out
                if txt is not None and tr_out is not None:
                    txt = run.put(txt, tr_out) if run else tr_out
                elif not run:
                    txt = tr_out
                if nr_out is not None:
                    ntxt = bp.run_pos.put(ntxt, nr_out) if run else nr_out
            if controls is not None:
                img = controls(i, block, img)
        return img, txt, ntxt
