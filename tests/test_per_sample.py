"""Per-sample Guidances (comparison grids): one packed forward for a batch whose samples differ in
scales and step windows equals the sequential reference run on every sample with its own
Guidance; Guidances that differ in anything else are refused with the field named."""
import dataclasses

import pytest
import torch

import guidance_rt as grt
from guidance_rt import presets

from .conftest import model_state, rel
from .tolerance import MODEL_ULPS, assert_close

TOL = 1e-4

# per preset: three Guidances with one structure; scales differ, one is 0 (branch unused by that
# sample), windows differ (a term off for one sample at some steps)
CASES = {
    "tiny-sd15": [
        grt.Guidance(grt.CFG(5.0), grt.PAG(3.0, layers="mid"), grt.TPG(2.0, layers="d2-d5"),
                     grt.SLG(1.0, layers="u4", start=0.0, stop=1.0)),
        grt.Guidance(grt.CFG(7.5), grt.PAG(0.0, layers="mid"), grt.TPG(1.0, layers="d2-d5"),
                     grt.SLG(2.0, layers="u4", start=0.0, stop=0.5)),
        grt.Guidance(grt.CFG(2.0), grt.PAG(1.5, layers="mid"), grt.TPG(3.0, layers="d2-d5"),
                     grt.SLG(0.5, layers="u4", start=0.5, stop=1.0)),
    ],
    "tiny-sd3": [
        grt.Guidance(grt.CFG(4.0, rescale=0.5), grt.SEG(2.0, layers=3), grt.SLG(2.8, layers=[7, 8, 9], form="cslg")),
        grt.Guidance(grt.CFG(6.0, rescale=0.5), grt.SEG(0.5, layers=3), grt.SLG(1.5, layers=[7, 8, 9], form="cslg")),
        grt.Guidance(grt.CFG(3.0, rescale=0.5), grt.SEG(4.0, layers=3), grt.SLG(0.0, layers=[7, 8, 9], form="cslg")),
    ],
    "tiny-sdxl": [   # S-CFG: a per-pixel CFG map whose clamp depends on each sample's w
        grt.Guidance(grt.SCFG(5.0, R=2), grt.PAG(2.0, layers="mid")),
        grt.Guidance(grt.SCFG(9.0, R=2), grt.PAG(3.0, layers="mid")),
        grt.Guidance(grt.SCFG(3.0, R=2), grt.PAG(1.0, layers="mid")),
    ],
}


def _sample(args, b: int, batch: int):
    """Sample b of batched forward arguments (nested dicts too)."""
    if isinstance(args, dict):
        return {k: _sample(v, b, batch) for k, v in args.items()}
    if isinstance(args, torch.Tensor) and args.dim() and args.shape[0] == batch:
        return args[b:b + 1]
    return args


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("step", [0, 1])
def test_per_sample_guidances_equal_the_reference_per_sample(tiny_model, name, step):
    model = tiny_model(name)
    guidances = CASES[name]
    n = len(guidances)
    h, w = (16, 12) if name == "tiny-sdxl" else (8, 6)
    inp = presets.example_inputs(name, batch=n, height=h, width=w, seed=2)
    kw = dict(step=step, num_steps=2)
    before = model_state(model)
    packed = grt.GuidedDenoiser(model, guidances)(inp["sample"], inp["timestep"], cond=inp["cond"],
                                                  uncond=inp["uncond"], generator=torch.Generator().manual_seed(5), **kw)
    assert model_state(model) == before
    for b, g in enumerate(guidances):
        ref = grt.reference.step(model, g, inp["sample"][b:b + 1], inp["timestep"][b:b + 1],
                                 cond=_sample(inp["cond"], b, n), uncond=_sample(inp["uncond"], b, n),
                                 generator=torch.Generator().manual_seed(5), **kw)
        assert rel(packed[b:b + 1], ref) < TOL, f"sample {b}"
    # the samples' guidances really differ: the same Guidance for all gives other predictions
    same = grt.GuidedDenoiser(model, guidances[0])(inp["sample"], inp["timestep"], cond=inp["cond"],
                                                   uncond=inp["uncond"], generator=torch.Generator().manual_seed(5), **kw)
    assert rel(packed[0], same[0]) < TOL
    assert rel(packed[1:], same[1:]) > 1e-3


def test_one_row_per_branch_for_all_samples(tiny_model):
    """The packed batch has the rows one Guidance would have: per-sample scales add none."""
    model = tiny_model("tiny-sd15")
    den = grt.GuidedDenoiser(model, CASES["tiny-sd15"])
    w, active = den.branch_scales(0, 2, torch.tensor([500]))
    assert w == [5.0, 7.5, 2.0]
    assert [t for _, t, _ in active] == list(CASES["tiny-sd15"][0].perturbations)
    assert dict((type(t).__name__, s) for _, t, s in active)["SLG"] == [1.0, 2.0, 0.0]
    plan = den.plan(3, True, active)
    assert plan.total_rows == 3 * (2 + 3)
    # a term whose scale is 0 for every sample adds no row
    off = [g.replace(1, scale=0.0) for g in CASES["tiny-sd15"]]
    _, active = grt.GuidedDenoiser(model, off).branch_scales(0, 2, torch.tensor([500]))
    assert "PAG" not in [type(t).__name__ for _, t, _ in active]


def test_per_sample_guidances_that_cannot_share_a_forward_are_errors(tiny_model):
    model = tiny_model("tiny-sd15")
    before = model_state(model)
    base = grt.Guidance(grt.CFG(5.0), grt.SEG(layers="mid"))
    for other, msg in [(grt.Guidance(grt.CFG(5.0), grt.SEG(sigma=2.0, layers="mid")), r"SEG\.sigma"),
                       (grt.Guidance(grt.CFG(5.0), grt.SEG(layers="u3")), r"SEG\.layers"),
                       (grt.Guidance(grt.CFG(5.0)), r"terms \['CFG'\] instead of \['CFG', 'SEG'\]"),
                       (grt.Guidance(grt.CFG(5.0, rescale=0.3), grt.SEG(layers="mid")), r"CFG\.rescale")]:
        with pytest.raises(ValueError, match=msg):
            grt.GuidedDenoiser(model, [base, other])
    nag = grt.Guidance(grt.NAG(4.0))
    with pytest.raises(ValueError, match=r"NAG\.scale"):
        grt.GuidedDenoiser(model, [nag, grt.Guidance(grt.NAG(5.0))])
    with pytest.raises(ValueError, match="empty list"):
        grt.GuidedDenoiser(model, [])
    with pytest.raises(TypeError, match="list of them"):
        grt.GuidedDenoiser(model, [base, "cfg=5"])
    inp = presets.example_inputs("tiny-sd15", batch=2, height=8, width=8)
    with pytest.raises(ValueError, match="3 per-sample Guidances but the sample batch is 2"):
        grt.GuidedDenoiser(model, [base] * 3)(inp["sample"], inp["timestep"], cond=inp["cond"],
                                               uncond=inp["uncond"], step=0, num_steps=1)
    assert model_state(model) == before


@pytest.mark.parametrize("term", [grt.APG(momentum=-0.5, norm_threshold=4.0), grt.CFGZeroStar()],
                         ids=lambda t: type(t).__name__)
def test_per_sample_cfg_place_terms_over_a_run(tiny_model, term):
    """APG / CFG-Zero* with per-sample scales and windows over a 2-step run: a sample whose term
    is off in a step (w = 1) gets c, and APG's momentum of that sample starts at its own first
    guided step, as in the reference run of that sample alone."""
    model = tiny_model("tiny-sd15")
    windows = [(6.0, 0.0, 1.0), (4.0, 0.5, 1.0), (8.0, 0.0, 0.5)]   # on-on, off-on, on-off
    guidances = [grt.Guidance(dataclasses.replace(term, scale=w, start=a, stop=b), grt.PAG(s, layers="mid"))
                 for (w, a, b), s in zip(windows, (3.0, 1.0, 0.0))]
    den = grt.GuidedDenoiser(model, guidances)
    states = [{} for _ in guidances]
    for step in range(2):
        inp = presets.example_inputs("tiny-sd15", batch=3, height=8, width=6, seed=step)
        kw = dict(step=step, num_steps=2)
        packed = den(inp["sample"], inp["timestep"], cond=inp["cond"], uncond=inp["uncond"], **kw)
        for b, g in enumerate(guidances):
            ref = grt.reference.step(model, g, inp["sample"][b:b + 1], inp["timestep"][b:b + 1],
                                     cond=_sample(inp["cond"], b, 3), uncond=_sample(inp["uncond"], b, 3),
                                     state=states[b], **kw)
            assert_close(packed[b:b + 1], ref, ulps=MODEL_ULPS, what=f"step {step} sample {b}")
