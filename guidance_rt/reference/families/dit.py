"""What the MM-DiT families (SD3, FLUX) share in the reference oracle.

- TPG: the block runs on permuted image tokens and its residual update lands on unpermuted
  positions, ``img + (block(P img) - P img)`` (a DiT block alone is permutation equivariant, so
  undoing the permutation would make TPG a no-op). SLG "block" returns both streams' inputs.
- NAG: the positive branch runs sample by sample (batch 1) and the negative text stream is
  carried as a second row of the text stream: a forward hook on ``context_embedder`` appends
  ``context_embedder(negative text)``. The family's joint attention processors run row 0 =
  [image, positive text] and row 1 = [image, negative text], NAG-combine the image parts and give
  each text row its own output. A PAG processor of the reference already installed on a guided
  joint attention (a PAG branch) is absorbed: both Zp and Zn use its MM-DiT map (text part =
  that row's text).
"""
from __future__ import annotations

import torch

from ..hooks import hook, set_processor
from .base import Family, negative_input


class DiTFamily(Family):
    nag_per_sample = True

    def shuffled(self, run, arguments, shuffle):
        image = arguments["hidden_states"]
        permuted = shuffle(image)
        arguments["hidden_states"] = permuted
        text_out, image_out = run()
        # the residual update computed on permuted tokens lands on unpermuted positions
        return text_out, image + (image_out - permuted)

    def skipped(self, block, arguments):
        return arguments["encoder_hidden_states"], arguments["hidden_states"]

    def install_nag(self, stack, model, setting, negative, kwargs, row):
        text = negative_input(negative, "encoder_hidden_states", row)
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

        hook(stack, model.context_embedder, add_negative_stream)
        return self.install_nag_attention(stack, model, setting, negative, kwargs, row, text)

    def install_nag_attention(self, stack, model, setting, negative, kwargs, row, text):
        """The rest of install_nag, once the negative text stream (``text``: its embeddings,
        batch 1) rides beside the positive one."""
        raise NotImplementedError

    def set_nag_processors(self, stack, blocks, pag_class, make) -> list:
        """Every block's joint attention gets ``make(pag)``, ``pag`` being the reference PAG
        processor (a ``pag_class``) it already has, or None."""
        attns = []
        for block in blocks:
            self.check_processor(block.attn, "NAG", (pag_class,))
            pag = block.attn.processor if isinstance(block.attn.processor, pag_class) else None
            set_processor(stack, block.attn, make(pag))
            attns.append(block.attn)
        return attns
