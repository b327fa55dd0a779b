"""CFG-Zero*: the formula against the paper's written here, the denoiser against diffusers'
ClassifierFreeZeroStarGuidance over a run (zero-init steps included, which run no forward), and its
configuration. The packed runtime against the reference oracle: test_packed_vs_reference.py."""
import contextlib

import pytest
import torch

import guidance_rt as grt
from guidance_rt import presets, spec

from .conftest import guider_prediction
from .tolerance import FORMULA_ULPS, MODEL_ULPS, assert_close


def paper_cfg_zero_star(u, c, w):
    """Fan et al. 2025: s* = <v_c, v_u> / |v_u|^2 (+1e-8, the authors' code), then
    v = s* v_u + w (v_c - s* v_u); one sample at a time."""
    out = []
    for b in range(c.shape[0]):
        cb, ub = c[b].reshape(-1), u[b].reshape(-1)
        wb = float(w[b]) if isinstance(w, torch.Tensor) else w
        s = float(cb @ ub) / (float(ub @ ub) + 1e-8)
        out.append(s * ub + wb * (cb - s * ub))
    return torch.stack(out).reshape(c.shape)


@pytest.mark.parametrize("shape", [(3, 4, 5, 7), (3, 13, 6)], ids=str)
@pytest.mark.parametrize("w", [4.0, torch.tensor([4.0, 1.0, 7.5])], ids=["w", "w-per-sample"])
def test_guide_equals_the_paper(shape, w):
    g = torch.Generator().manual_seed(1)
    c = torch.randn(shape, generator=g, dtype=torch.float64)
    u = 0.8 * c + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)   # s* far from 1
    u[2] = 0.0                                                                  # |u| = 0: s* = 0
    wt = w.reshape(-1, *[1] * (len(shape) - 1)).double() if isinstance(w, torch.Tensor) else w
    ours = grt.CFGZeroStar(4.0).guide(u, c, wt, step=3, state={})
    expected = paper_cfg_zero_star(u, c, w)
    assert_close(ours, expected, ulps=FORMULA_ULPS, effect=expected - (u + wt * (c - u)))
    assert_close(ours[2], wt[2] * c[2] if isinstance(w, torch.Tensor) else w * c[2])
    if isinstance(w, torch.Tensor):
        assert_close(ours[1], c[1])


@contextlib.contextmanager
def counting_forwards(model):
    """The number of module calls inside the model (however the adapter drives its blocks)."""
    calls = [0]

    def count(*_):
        calls[0] += 1

    handles = [m.register_forward_pre_hook(count) for m in model.modules()]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def test_denoiser_matches_diffusers_guider_and_zero_steps_run_no_forward(tiny_model):
    """A 4-step run on SD3 (flow matching, the method's target) with 2 zero-init steps: diffusers'
    guider fed with the reference's plain uncond / cond forwards gives the same predictions, zeros
    included, and our zero steps run no module of the model."""
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    name, steps = "tiny-sd3", 4
    model = tiny_model(name)
    term = grt.CFGZeroStar(4.0, zero_init_steps=2)
    den = grt.GuidedDenoiser(model, grt.Guidance(term))
    cfg = grt.GuidedDenoiser(model, grt.Guidance(grt.CFG(4.0)))
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=2)
    for step in range(steps):
        inp = presets.example_inputs(name, batch=2, height=8, width=6, seed=step)
        kw = dict(cond=inp["cond"], uncond=inp["uncond"], step=step, num_steps=steps)
        with counting_forwards(model) as calls:
            ours = den(inp["sample"], inp["timestep"], **kw)
        u, c = (b.prediction for b in grt.reference.branch_predictions(
            model, grt.Guidance(grt.CFG(4.0)), inp["sample"], inp["timestep"], **kw))
        theirs = guider_prediction(guider, step, steps, inp["timestep"], c, u)
        if step < 2:
            assert calls[0] == 0 and torch.equal(ours, torch.zeros_like(c)) and torch.equal(theirs, ours)
        else:
            assert calls[0] > 0
            plain = cfg(inp["sample"], inp["timestep"], **kw)
            assert_close(ours, theirs, ulps=MODEL_ULPS, effect=ours - plain, what=f"step {step}")


def test_spec_and_errors():
    """(Round trips: test_spec.SPECS.)"""
    g = spec.parse_spec("cfgzero=4:zero_init_steps=2")
    assert g.terms[0] == grt.CFGZeroStar(4.0, zero_init_steps=2)
    assert spec.format_spec(g) == "cfgzero=4:zero_init_steps=2"
    assert spec.from_dict({"terms": [{"type": "CFGZeroStar", "scale": 4}]}) == grt.Guidance(grt.CFGZeroStar(4.0))
    for text, fragment in [("cfgzero:zero_init_steps=-1", "zero_init_steps must be an integer >= 0"),
                           ("cfgzero:zero_init_steps=1.5", "zero_init_steps must be an integer >= 0"),
                           ("cfgzero:zero_init_steps=true", "zero_init_steps must be an integer >= 0"),
                           ("cfgzero:eta=1", "cfgzero has no option 'eta'")]:
        with pytest.raises(spec.SpecError, match=fragment):
            spec.parse_spec(text)
    with pytest.raises(ValueError, match="at most one CFG term.*got APG, CFGZeroStar"):
        grt.Guidance(grt.APG(5.0), grt.CFGZeroStar(4.0))
    assert [grt.CFGZeroStar(zero_init_steps=2).zero_prediction(i) for i in range(4)] == [True, True, False, False]
