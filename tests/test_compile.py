"""One graph: a guided step's packed forward and formula (GuidedDenoiser.packed_step) has no graph
break on any family, and GuidedDenoiser.compile() gives eager's prediction with one compilation
per step configuration, never a recompilation as scales and timesteps change.

Dynamo traces every block, so the models here are the tiny presets cut to a few blocks of each
kind (the same diffusers classes and code paths at a fraction of the tracing time); Inductor on
CPU compiles C++ kernels, so one small run checks its numbers."""
import os
import shutil

import diffusers
import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import guidance_rt as grt
from guidance_rt import presets

from .tolerance import MODEL_ULPS, assert_close

# family -> (tiny preset, the config keys cut down): blocks of every kind the family has
SMALL = {
    # SDXL's text_time embedding; d0 and u0-u1 at latent / 2, m0 at latent / 2, no attention at
    # latent / 1 (as SDXL's first level)
    "unet": ("tiny-sdxl", dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(8, 16),
                               layers_per_block=1, transformer_layers_per_block=(1, 1), attention_head_dim=(1, 2))),
    # SD3.5: block 0 with dual attention, qk-norm everywhere, block 2 context_pre_only
    "sd3": ("tiny-sd35", dict(num_layers=3, dual_attention_layers=(0,))),
    "flux": ("tiny-flux", dict(num_layers=1, num_single_layers=1)),
    "flux2": ("tiny-flux2", dict(num_layers=1, num_single_layers=1)),
    "qwenimage": ("tiny-qwenimage", dict(num_layers=2)),
    "wan": ("tiny-wan", dict(num_layers=2)),
}
# family -> the layers each kind of perturbation addresses
LAYERS = {"unet": dict(attn="m0", tokens="d0", skip="u1"),
          "sd3": dict(attn=1, tokens=1, skip=[0, 1]),
          "flux": dict(attn=["0", "s0"], tokens=["0", "s0"], skip=["0", "s0"]),
          "flux2": dict(attn=["0", "s0"], tokens=["0", "s0"], skip=["0", "s0"]),
          "qwenimage": dict(attn=1, tokens=1, skip=[0, 1]),
          "wan": dict(attn=1, tokens=1, skip=[0, 1])}


def every_term(family: str) -> grt.Guidance:
    """Every perturbation of the standard set (PAG, SEG with infinite and finite blur, TPG, SLG)
    as the branches of one step, with CFG and with NAG in every block: one explain per family
    keeps the suite's tracing time down, and a break names its line."""
    at = LAYERS[family]
    return grt.Guidance(grt.CFG(5.0), grt.PAG(3.0, layers=at["attn"]), grt.SEG(3.0, layers=at["attn"]),
                        grt.SEG(3.0, sigma=2.0, layers=at["attn"]), grt.TPG(3.0, layers=at["tokens"]),
                        grt.SLG(2.8, layers=at["skip"], start=0.0, stop=1.0), grt.NAG(5.0))


@pytest.fixture(scope="module")
def small_model():
    cache = {}

    def get(family):
        if family not in cache:
            name, cut = SMALL[family]
            preset = presets.get_preset(name)
            model = getattr(diffusers, preset.model_class).from_config({**preset.config, **cut})
            cache[family] = presets.randomize_(model).eval()
        return cache[family]

    return get


def _inputs(model, batch=2, step=None):
    inp = presets.example_inputs(model, batch=batch, height=8, width=8)
    if step is not None:   # a denoising run: the timestep falls step by step
        inp["timestep"] = inp["timestep"] * (1 - step / 8) if inp["timestep"].is_floating_point() \
            else inp["timestep"] - 60 * step
    return inp


def _captured_step(den, inp, step=0, num_steps=4):
    """Call den once and return packed_step's arguments of that call."""
    seen = {}
    real = den.packed_step
    den.packed_step = lambda *a, **k: seen.update(args=a, kwargs=k) or real(*a, **k)
    try:
        den(inp["sample"], inp["timestep"], cond=inp["cond"], uncond=inp["uncond"], negative=inp["negative"],
            step=step, num_steps=num_steps, generator=torch.Generator().manual_seed(0))
    finally:
        del den.packed_step
    return seen["args"], seen["kwargs"]


def _assert_one_graph(den, inp, what):
    args, kwargs = _captured_step(den, inp)
    dynamo.reset()
    explained = dynamo.explain(den.packed_step)(*args, **kwargs)
    reasons = "\n".join(f"- {b.reason} at {b.user_stack[-1] if b.user_stack else '?'}"
                        for b in explained.break_reasons)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, \
        f"{what}: {explained.graph_break_count} graph breaks:\n{reasons}"


@pytest.mark.parametrize("family", list(SMALL))
def test_guided_step_is_one_graph(small_model, family):
    model = small_model(family)
    _assert_one_graph(grt.GuidedDenoiser(model, every_term(family)), _inputs(model), family)


def test_scfg_step_is_one_graph(small_model):
    model = small_model("unet")
    _assert_one_graph(grt.GuidedDenoiser(model, grt.Guidance(grt.SCFG(7.5, R=2))), _inputs(model), "S-CFG")


def test_a_run_compiles_once_per_step_configuration(small_model):
    """Steps whose scales and timestep change reuse one compilation; CFG's window closing is a
    second configuration, compiled once, not a recompilation of the first."""
    model = small_model("sd3")
    guidance = grt.Guidance(grt.CFG(5.0, stop=0.5), grt.PAG(3.0, adaptive_scale=0.002, layers=1))
    eager = grt.GuidedDenoiser(model, guidance)
    counter = CompileCounterWithBackend("eager")
    den = grt.GuidedDenoiser(model, guidance).compile(backend=counter, fullgraph=True)
    dynamo.reset()
    for step in range(4):
        inp = _inputs(model, step=step)
        kw = dict(cond=inp["cond"], uncond=inp["uncond"], step=step, num_steps=4)
        assert torch.equal(den(inp["sample"], inp["timestep"], **kw), eager(inp["sample"], inp["timestep"], **kw))
    assert counter.frame_count == 2, f"{counter.frame_count} compilations for 2 step configurations"


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="Inductor on CPU needs a C++ compiler: no g++ (or $CXX) on PATH")
def test_inductor_step_equals_eager_without_recompiling(small_model):
    """Inductor's compiled step gives eager's prediction within float32 noise at every step of a
    run whose configuration stays the same (PAG's adaptive scale and the timestep change every
    step), from one compilation. The suite's one Inductor compilation: about 50 s of one core
    from a cold cache, most of it compiling C++ kernels."""
    model = small_model("sd3")
    guidance = grt.Guidance(grt.CFG(5.0), grt.PAG(8.0, adaptive_scale=0.004, layers=1))
    eager, plain = grt.GuidedDenoiser(model, guidance), grt.GuidedDenoiser(model, grt.Guidance(grt.CFG(5.0)))
    den = grt.GuidedDenoiser(model, guidance).compile(backend="inductor", fullgraph=True)
    dynamo.reset()
    counters.clear()
    for step in range(4):
        inp = _inputs(model, batch=1, step=step)
        kw = dict(cond=inp["cond"], uncond=inp["uncond"], step=step, num_steps=4)
        expected = eager(inp["sample"], inp["timestep"], **kw)
        assert_close(den(inp["sample"], inp["timestep"], **kw), expected, ulps=MODEL_ULPS,
                     effect=expected - plain(inp["sample"], inp["timestep"], **kw), what=f"step {step}")
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
