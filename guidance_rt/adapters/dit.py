"""What the MM-DiT adapters (SD3, FLUX) share: the block loop over two token streams.

Both streams (image tokens, text tokens) fork together. TPG on a DiT block: the block runs on
permuted image tokens and its residual update lands on the unpermuted stream,
``img_out = img + (block(P img) - P img)``, the DiT analogue of the UNet form in which the
Transformer2DModel's outer residual is added unpermuted (a DiT block alone is permutation
equivariant, so undoing the permutation would make TPG a no-op).
"""
from __future__ import annotations

import torch

from ..plan import StepPlan
from .base import Adapter


class DiTAdapter(Adapter):
    def stock_block(self, block, img, txt, temb, extra):
        raise NotImplementedError

    def own_block(self, block, img, txt, temb, extra, bp, grid):
        raise NotImplementedError

    def run_blocks(self, blocks, offset, img, txt, temb, extra, plan: StepPlan, perms, grid, controls=None):
        """Run a block list whose first block has execution position `offset`.
        `temb` and the tensors in `extra` that are per-row hold every layout row."""
        for i, block in enumerate(blocks):
            p = offset + i
            bp = plan.blocks.get(p)
            if bp is None:
                rows = img.shape[0]
                self.record(p, rows)
                txt, img = self.stock_block(block, img, txt, temb[:rows], extra)
            else:
                if bp.forks:
                    img, txt = self.grow(img, bp.rows, plan), self.grow(txt, bp.rows, plan)
                run = bp.run
                ir = run.take(img) if run else img
                tr = run.take(txt) if (run and txt is not None) else txt
                te = run.take(temb[: bp.rows]) if run else temb[: bp.rows]
                self.record(p, ir.shape[0])
                shuffled = self.shuffle(ir, bp, perms)
                if bp.self_attn or bp.skip_attn or bp.skip_ff:
                    tr_out, ir_out = self.own_block(block, shuffled, tr, te, extra, bp, grid)
                else:
                    tr_out, ir_out = self.stock_block(block, shuffled, tr, te, extra)
                if bp.shuffle:  # exact zero on rows that were not shuffled
                    ir_out = ir_out + (ir - shuffled)
                img = run.put(img, ir_out) if run else ir_out
                if txt is not None and tr_out is not None:
                    txt = run.put(txt, tr_out) if run else tr_out
                elif not run:
                    txt = tr_out
            if controls is not None:
                img = controls(i, block, img)
        return img, txt
