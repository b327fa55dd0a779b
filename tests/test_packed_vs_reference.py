"""The packed GuidedDenoiser equals the sequential reference (written from methods.md) for every
term alone and all together, on every preset family, and every term really changes the output."""
import pytest
import torch

import guidance_rt as grt
from guidance_rt import presets

from .conftest import rel
from .tolerance import MODEL_ULPS, assert_close

TOL = 1e-4       # fp32: packed vs one forward per branch (different op order and batch shapes)
EFFECT = 1e-3    # a term must move the prediction far more than rounding

# per preset: (latent h, w) non-square, and a set of terms addressing real layer names
TERMS = {
    "tiny-sd15": [grt.PAG(layers="mid"), grt.PAG(beta=0.5, heads=[0], layers="u3-u5"),
                  grt.SEG(layers="mid"), grt.SEG(sigma=1.5, layers="u3"),
                  grt.TPG(layers="d2-d5"), grt.SLG(layers="u4", start=0.0, stop=1.0),
                  grt.SLG(layers="d1", skip="attn", start=0.0, stop=1.0),
                  grt.SLG(layers="u6", skip="ff", start=0.0, stop=1.0)],
    "tiny-sdxl": [grt.PAG(layers="mid"), grt.PAG(adaptive_scale=0.002, layers="mid"),
                  grt.SEG(layers="mid"), grt.SEG(sigma=2.0, layers="u30-u35"),
                  grt.TPG(layers="d6-d23"), grt.SLG(layers=["u3", "u4"], start=0.0, stop=1.0)],
    "tiny-sd3": [grt.PAG(layers=5), grt.PAG(beta=0.3, layers=[5, 6]), grt.SEG(layers=3),
                 grt.SEG(sigma=1.0, layers="3-4"), grt.TPG(layers="6-7"),
                 grt.SLG(layers=[7, 8, 9]), grt.SLG(layers=23, skip="attn"), grt.SLG(layers=10, skip="ff")],
    "tiny-sd35": [grt.PAG(layers=2), grt.SEG(sigma=1.0, layers=4), grt.TPG(layers=5),
                  grt.SLG(layers=[7, 8, 9]), grt.SLG(layers=1, skip="attn")],
    "tiny-flux": [grt.PAG(layers=2), grt.PAG(layers="s4"), grt.SEG(layers="s3"),
                  grt.SEG(sigma=1.0, layers=[3, "s2"]), grt.TPG(layers=[4, "s5"]),
                  grt.SLG(layers=[7, 8, 9]), grt.SLG(layers="s10", skip="attn"),
                  grt.SLG(layers=["s11", 12], skip="ff")],
}
SHAPE = {"tiny-flux": (16, 20)}
CFG_SCALE = {"tiny-flux": None}   # FLUX.1-dev is guidance-distilled: no CFG row by default


def _run(model, guidance, inp, step=0, num_steps=1, seed=0):
    kw = dict(cond=inp["cond"], uncond=inp["uncond"], step=step, num_steps=num_steps)
    packed = grt.GuidedDenoiser(model, guidance)(inp["sample"], inp["timestep"],
                                                  generator=torch.Generator().manual_seed(seed), **kw)
    ref = grt.reference.step(model, guidance, inp["sample"], inp["timestep"],
                             generator=torch.Generator().manual_seed(seed), **kw)
    return packed, ref


def _cfg(name):
    return [] if CFG_SCALE.get(name, 5.0) is None else [grt.CFG(5.0)]


CASES = [(name, i) for name, terms in TERMS.items() for i in range(len(terms))]


@pytest.mark.parametrize("name,index", CASES, ids=[f"{n}-{TERMS[n][i]!r}"[:80] for n, i in CASES])
def test_each_term_matches_reference_and_changes_output(tiny_model, name, index):
    model = tiny_model(name)
    h, w = SHAPE.get(name, (16, 24))
    inp = presets.example_inputs(name, batch=1, height=h, width=w, seed=index)
    term = TERMS[name][index]
    term = type(term)(**{**term.__dict__, "start": 0.0, "stop": 1.0})
    base = grt.Guidance(*_cfg(name))
    packed, ref = _run(model, grt.Guidance(*_cfg(name), term), inp)
    assert torch.isfinite(packed).all()
    assert rel(packed, ref) < TOL
    plain, plain_ref = _run(model, base, inp)
    assert rel(plain, plain_ref) < TOL
    assert rel(packed, plain) > EFFECT, f"{term!r} does not change the prediction"


@pytest.mark.parametrize("name", list(TERMS))
@pytest.mark.parametrize("batch", [1, 2])
def test_all_terms_together(tiny_model, name, batch):
    model = tiny_model(name)
    h, w = SHAPE.get(name, (16, 24))
    inp = presets.example_inputs(name, batch=batch, height=h, width=w, seed=7)
    terms = TERMS[name]
    pick = [next(t for t in terms if isinstance(t, cls)) for cls in (grt.PAG, grt.SEG, grt.TPG, grt.SLG)]
    pick = [type(t)(**{**t.__dict__, "start": 0.0, "stop": 1.0}) for t in pick]
    guidance = grt.Guidance(grt.CFG(4.0, rescale=0.7), *pick)
    packed, ref = _run(model, guidance, inp, seed=batch)
    assert rel(packed, ref) < TOL


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_windows_inside_and_outside(tiny_model, name):
    """SLG 0.01-0.2 and CFG 0-0.5 over 10 steps: step 0 (SLG off), 1 (both on), 2 (SLG off by the
    half-open window), 6 (CFG off)."""
    model = tiny_model(name)
    inp = presets.example_inputs(name, batch=1, seed=3)
    layers = {"tiny-sdxl": "mid"}.get(name, [7, 8, 9])
    guidance = grt.Guidance(grt.CFG(5.0, stop=0.5), grt.SLG(2.8, layers=layers, start=0.01, stop=0.2),
                            grt.PAG(3.0, layers=layers[0] if isinstance(layers, list) else layers, start=0.5))
    outs = {}
    for step in (0, 1, 2, 6):
        packed, ref = _run(model, guidance, inp, step=step, num_steps=10)
        assert rel(packed, ref) < TOL, step
        outs[step] = packed
    only_cfg = grt.GuidedDenoiser(model, grt.Guidance(grt.CFG(5.0)))
    kw = dict(cond=inp["cond"], uncond=inp["uncond"], num_steps=10)
    assert torch.equal(outs[0], only_cfg(inp["sample"], inp["timestep"], step=0, **kw))
    assert torch.equal(outs[2], only_cfg(inp["sample"], inp["timestep"], step=2, **kw))
    assert rel(outs[1], outs[0]) > EFFECT


@pytest.mark.parametrize("term", [grt.PAG(scale=0.0, layers="mid"), grt.SEG(scale=0.0, layers="mid"),
                                  grt.TPG(scale=0.0), grt.SLG(scale=0.0, layers="mid"),
                                  grt.PAG(scale=3.0, layers="mid", start=0.5)])
def test_scale_zero_or_outside_window_is_off_and_adds_no_row(tiny_model, term):
    model = tiny_model("tiny-sdxl")
    inp = presets.example_inputs("tiny-sdxl", batch=2, seed=1)
    kw = dict(cond=inp["cond"], uncond=inp["uncond"], step=0, num_steps=4)
    den = grt.GuidedDenoiser(model, grt.Guidance(grt.CFG(5.0), term))
    den.adapter.trace = {}
    out = den(inp["sample"], inp["timestep"], **kw)
    off = grt.GuidedDenoiser(model, grt.Guidance(grt.CFG(5.0)))(inp["sample"], inp["timestep"], **kw)
    assert torch.equal(out, off)
    assert set(den.adapter.trace.values()) == {4}   # uncond + cond rows only


def test_tpg_reproducible_with_generator(tiny_model):
    model = tiny_model("tiny-sdxl")
    inp = presets.example_inputs("tiny-sdxl", seed=2)
    guidance = grt.Guidance(grt.CFG(5.0), grt.TPG(layers="d6-d23"))
    den = grt.GuidedDenoiser(model, guidance)
    kw = dict(cond=inp["cond"], uncond=inp["uncond"], step=0, num_steps=1)
    a = den(inp["sample"], inp["timestep"], generator=torch.Generator().manual_seed(1), **kw)
    b = den(inp["sample"], inp["timestep"], generator=torch.Generator().manual_seed(1), **kw)
    c = den(inp["sample"], inp["timestep"], generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b)
    assert rel(a, c) > EFFECT


@pytest.mark.parametrize("name,layers", [("tiny-flux", [3, 8, 6, 10, 14]), ("tiny-sd3", [7, 8, 9])])
def test_cslg_forms_and_multi_skip(tiny_model, name, layers):
    """CSLG (methods.md 6): the FLUX form p + s (c - p) without uncond, the SD3 form
    u + w (c - u) + (s - 1)(c - p), and weighted multi-skip, all in one packed forward."""
    model = tiny_model(name)
    inp = presets.example_inputs(name, batch=2, seed=8)
    s, weights = 3.0, tuple(float(i + 1) for i in range(len(layers)))
    kw = dict(cond=inp["cond"], uncond=inp["uncond"], step=0, num_steps=1)
    branches = grt.reference.branch_predictions(model, grt.Guidance(grt.CFG(4.0)), inp["sample"], inp["timestep"], **kw)
    u, c = (b.prediction.double() for b in branches)
    singles = []
    for layer in layers:
        g = grt.Guidance(grt.SLG(1.0, layers=[layer], start=0.0, stop=1.0))
        singles.append(grt.reference.branch_predictions(model, g, inp["sample"], inp["timestep"], **kw)[1].prediction.double())
    p_multi = sum(a * p for a, p in zip(weights, singles)) / sum(weights)
    cases = {
        "flux-form": (grt.Guidance(grt.SLG(s, layers=layers, start=0.0, stop=1.0, form="cslg", weights=weights)),
                      p_multi + s * (c - p_multi)),
        "sd3-form": (grt.Guidance(grt.CFG(4.0), grt.SLG(s, layers=layers, start=0.0, stop=1.0, form="cslg", weights=weights)),
                     u + 4.0 * (c - u) + (s - 1) * (c - p_multi)),
    }
    for label, (guidance, expected) in cases.items():
        den = grt.GuidedDenoiser(model, guidance)
        den.adapter.trace = {}
        packed = den(inp["sample"], inp["timestep"], **kw)
        ref = grt.reference.step(model, guidance, inp["sample"], inp["timestep"], **kw)
        assert rel(packed, expected.float()) < TOL, label
        assert rel(ref, expected.float()) < TOL, label
        base = 2 * 2 if guidance.cfg else 2
        total = base + 2 * len(layers)                    # one row group per single-layer skip
        assert max(den.adapter.trace.values()) == total
        assert den.adapter.trace[max(layers)] == total - 2   # only that layer's rows skip it
    with pytest.raises(ValueError, match="weights has 2 entries"):
        grt.GuidedDenoiser(model, grt.Guidance(grt.SLG(layers=layers, weights=(1.0, 2.0))))
    with pytest.raises(ValueError, match="positive"):
        grt.SLG(layers=layers, weights=(1.0, -1.0))


# terms in CFG's place with their own formula, each with a perturbation term (and NAG with APG on
# FLUX): APG with momentum and an active clip, CFG-Zero* with a zero-init step
CFG_PLACE = [grt.APG(6.0, eta=0.3, norm_threshold=4.0, momentum=-0.5), grt.CFGZeroStar(4.0, zero_init_steps=1)]
WITH = {"tiny-sd15": [grt.PAG(3.0, layers="mid")], "tiny-sd3": [grt.SLG(2.8, layers=[7, 8, 9], start=0.0)],
        "tiny-flux": [grt.PAG(2.0, layers="s4")]}


@pytest.mark.parametrize("name", list(WITH))
@pytest.mark.parametrize("term", CFG_PLACE, ids=lambda t: type(t).__name__)
def test_cfg_place_terms_over_a_run(tiny_model, name, term):
    """Two steps of one run (APG's momentum carried by the denoiser and by the reference's
    state): packed equals the reference to whole-model rounding, far below the change from
    plain CFG at the same scale."""
    model = tiny_model(name)
    others = WITH[name] + ([grt.NAG(4.0)] if name == "tiny-flux" and isinstance(term, grt.APG) else [])
    guidance = grt.Guidance(term, *others)
    den = grt.GuidedDenoiser(model, guidance)
    plain = grt.GuidedDenoiser(model, grt.Guidance(grt.CFG(term.scale), *others))
    state, steps = {}, 2
    for step in range(steps):
        inp = presets.example_inputs(name, batch=2, height=8, width=6, seed=step)
        kw = dict(cond=inp["cond"], uncond=inp["uncond"], negative=inp["negative"], step=step, num_steps=steps)
        packed = den(inp["sample"], inp["timestep"], **kw)
        ref = grt.reference.step(model, guidance, inp["sample"], inp["timestep"], state=state, **kw)
        if term.zero_prediction(step):
            assert torch.equal(packed, torch.zeros_like(ref)) and torch.equal(ref, packed)
            continue
        cfg = plain(inp["sample"], inp["timestep"], **kw)
        assert_close(packed, ref, ulps=MODEL_ULPS, effect=ref - cfg, what=f"step {step}")
    assert "apg_average" in state if isinstance(term, grt.APG) else not state
