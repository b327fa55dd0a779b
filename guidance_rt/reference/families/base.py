"""What the reference oracle asks of a model family. Each family module declares, on a Family
subclass: the stock attention processors its re-implementations stand in for, its PAG and NAG
processors, NAG's default alpha, and how its blocks are perturbed (which attention PAG / SEG
replace, where the image tokens' grid comes from, how a block is skipped or runs on shuffled
tokens). The shared modules (perturb, nag, scfg) know no family by name.

Written from shared/methods.md like the rest of the oracle: nothing here comes from the runtime's
family adapters (guidance_rt.families), whose layer addressing alone the oracle uses.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ClassVar

import torch
import torch.nn as nn

from ...layers import Layer
from ...methods import PAG
from ..attention import NAGSetting


class Family:
    # every family declares these three
    name: ClassVar[str]                                # the runtime's name for it (model_family)
    # the stock processors the reference's re-implementations stand in for (checked before
    # installing one)
    stock_processors: ClassVar[tuple[str, ...]]
    nag_alpha: ClassVar[float]                         # NAG's alpha when the term leaves it None
    # NAG's positive forward runs one sample at a time (the negative text rides as a second row)
    nag_per_sample: ClassVar[bool] = False
    unbatched: ClassVar[tuple[str, ...]] = ()          # forward kwargs whose 2-D form has no batch
    # S-CFG: its blocks' self- and cross-attention maps can be recorded (see grid_path), also
    # through these processors besides the stock ones
    semantic_maps: ClassVar[bool] = False
    semantic_map_processors: ClassVar[tuple[type, ...]] = ()
    # its pipeline's true CFG rescales the guided prediction per token (last dim) to the cond
    # prediction's norm whenever the uncond branch runs (oracle.step)
    cfg_renorm: ClassVar[bool] = False

    def check_processor(self, attn: nn.Module, what: str, allowed: tuple[type, ...] = ()) -> None:
        """``attn`` runs a stock processor (or one of ``allowed``) on unfused projections."""
        processor = attn.processor
        if isinstance(processor, allowed):
            return
        name = type(processor).__name__
        if name not in self.stock_processors:
            raise ValueError(f"reference {what}: expects the stock attention processor "
                             f"({' / '.join(self.stock_processors)}), found {name}")
        if getattr(attn, "fused_projections", False):
            raise ValueError(f"reference {what}: fused qkv projections are not supported")

    # ------------------------------------------------------------------ perturbations

    def attention(self, block: nn.Module) -> nn.Module:
        """The block's attention that PAG and SEG perturb."""
        return block.attn

    def pag_processor(self, term: PAG, attn: nn.Module, layer: Layer, inputs):
        """The PAG processor replacing ``attn``'s; ``inputs`` is the branch's BranchInputs."""
        raise NotImplementedError

    def image_grid(self, stack: contextlib.ExitStack, inputs,
                   layer: Layer) -> Callable[[], tuple[int, int]]:
        """(rows, cols) of the image tokens at ``layer``, row-major, as a function read during
        the forward (a family may learn it only then, through a hook installed on ``stack``);
        (frames, rows, cols) for video tokens, frame-major: SEG blurs each frame on its own."""
        raise NotImplementedError

    def queries(self, attn: nn.Module) -> tuple[nn.Module, slice | None]:
        """The module whose output holds ``attn``'s queries (SEG hooks it), and their columns
        there (None: all of its output)."""
        return attn.to_q, None

    def token_groups(self, inputs, layer: Layer) -> int:
        """TPG: the equal consecutive groups of image tokens each permuted within itself (video
        frames); 1: one permutation of all of them."""
        return 1

    def text_before_image(self, layer: Layer) -> bool:
        """Whether the queries of ``layer``'s attention start with text tokens."""
        return False

    def shuffled(self, run: Callable, arguments: dict, shuffle: Callable):
        """TPG: the block's output when its image tokens (``arguments["hidden_states"]``) are
        shuffled by ``shuffle``; ``run()`` runs the stock block on ``arguments``."""
        raise NotImplementedError

    def shuffled_in(self, inputs, layer: Layer, run: Callable, arguments: dict, shuffle: Callable):
        """TPG at ``layer`` of the branch ``inputs`` (BranchInputs): ``shuffled`` unless a family
        needs the branch's inputs to find a block's image tokens."""
        return self.shuffled(run, arguments, shuffle)

    def skipped(self, block: nn.Module, arguments: dict):
        """SLG skip="block": the block's output when it is bypassed, from its call's arguments."""
        raise NotImplementedError

    def skipped_sublayers(self, block: nn.Module, layer: Layer, skip: str) -> list:
        """SLG skip="attn" / "ff": the modules made to output zeros (None entries are absent)."""
        raise NotImplementedError

    def install_skip(self, stack: contextlib.ExitStack, block: nn.Module, layer: Layer, skip: str) -> None:
        """SLG skip="attn" / "ff" on ``stack``: by default ``skipped_sublayers`` output zeros."""
        from ..hooks import hook, return_zeros

        for module in self.skipped_sublayers(block, layer, skip):
            if module is not None:
                hook(stack, module, return_zeros)

    # --------------------------------------------------------------------------- NAG

    def install_nag(self, stack: contextlib.ExitStack, model: nn.Module, setting: NAGSetting,
                    negative: dict, kwargs: dict, row: int | None) -> list[nn.Module]:
        """Install NAG on ``stack`` for one positive forward (kwargs ``kwargs``; ``row`` picks
        the negative's row when ``nag_per_sample``); returns the guided attention modules."""
        raise NotImplementedError

    # --------------------------------------------------------------------------- S-CFG

    def grid_path(self, layer: Layer) -> str:
        """The module whose input feature map (B, C, h, w) has ``layer``'s token grid."""
        raise NotImplementedError


def negative_input(negative: dict, key: str, row: int | None) -> torch.Tensor:
    """NAG's negative kwarg ``key``; with ``row``, that row (a batch-1 negative serves every row)."""
    value = negative.get(key) if negative is not None else None
    if value is None:
        raise ValueError(f"NAG needs the negative prompt's {key} in `negative`")
    if row is not None:
        value = value[row:row + 1] if value.shape[0] > 1 else value
    return value
