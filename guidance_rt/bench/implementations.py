"""The implementations a run compares, by name: guidance-rt (the packed GuidedDenoiser), the
reference (the sequential oracle, one plain forward per branch, that every row is checked against)
and the diffusers peers of peers.py. run() looks each one up in PREPARE when it builds a row, so a
test can swap one in place.
"""
from __future__ import annotations

from .. import reference
from ..denoiser import GuidedDenoiser
from ..guidance import Guidance
from .peers import prepare_diffusers, prepare_guiders
from .targets import Ctx, Prepared


def prepare_packed(ctx: Ctx, g: Guidance) -> Prepared:
    den = GuidedDenoiser(ctx.target.model, g)

    def fn(inp):
        return den(inp["sample"], inp["timestep"], cond=inp["cond"], uncond=inp["uncond"],
                   negative=inp["negative"], step=ctx.step, num_steps=ctx.steps,
                   generator=ctx.generator())

    return Prepared(fn, extra={"denoiser": den})


def prepare_reference(ctx: Ctx, g: Guidance) -> Prepared:
    def fn(inp):
        return reference.step(ctx.target.model, g, inp["sample"], inp["timestep"], cond=inp["cond"],
                              uncond=inp["uncond"], negative=inp["negative"], step=ctx.step,
                              num_steps=ctx.steps, generator=ctx.generator())

    return Prepared(fn)


PREPARE = {
    "guidance-rt": prepare_packed,
    "reference": prepare_reference,
    "diffusers-pipelines": prepare_diffusers,
    "diffusers-guiders": prepare_guiders,
}
