"""What guidance-rt's packed forward really runs, the ground of the floor column: the FLOPs of a
GuidedDenoiser call (torch.utils.flop_counter, with the SDPA formula for the CPU flash kernel it
has none for) and the rows its blocks run (the adapter's trace).
"""
from __future__ import annotations

import contextlib

import torch

from ..denoiser import GuidedDenoiser
from ..guidance import Guidance


def _cpu_sdpa_flops():
    """FlopCounterMode has no formula for the CPU flash kernel: the SDPA formula on its shapes."""
    from torch.utils import flop_counter as fc

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return {}

    def formula(query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query, key, value)

    return {op: formula}


def count_flops(model, guidance: Guidance, inp: dict, step: int, steps: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    den = GuidedDenoiser(model, guidance, check_inputs=False)
    with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_flops()) as counter, torch.no_grad():
        den(inp["sample"], inp["timestep"], cond=inp["cond"], uncond=inp["uncond"],
            negative=inp["negative"], step=step, num_steps=steps, generator=torch.Generator().manual_seed(0))
    return int(counter.get_total_flops())


def _block_rows(den, inp, ctx) -> int | None:
    try:
        den.adapter.trace = {}
        with torch.no_grad():
            den(inp["sample"], inp["timestep"], cond=inp["cond"], uncond=inp["uncond"],
                negative=inp["negative"], step=ctx.step, num_steps=ctx.steps, generator=ctx.generator())
        return int(sum(den.adapter.trace.values()))
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            den.adapter.trace = None
