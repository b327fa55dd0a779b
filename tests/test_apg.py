"""APG (adaptive projected guidance): the formula against the paper's Algorithm 1 written here and
against diffusers' AdaptiveProjectedGuidance, over several steps of a run (momentum), and its
configuration. The packed runtime against the reference oracle: test_packed_vs_reference.py."""
import pytest
import torch

import guidance_rt as grt
from guidance_rt import presets, spec

from .conftest import guider_prediction
from .tolerance import FORMULA_ULPS, assert_close

SHAPES = [(3, 4, 5, 7), (3, 13, 6)]          # UNet-like latents, FLUX-like token sequences
# one w, or one per sample, alternating between two steps (samples off at some steps: w = 1)
W = [7.0, torch.tensor([[5.0, 1.0, 9.5], [5.0, 3.0, 1.0]])]


def paper_apg(u, c, w, avg, *, eta, norm_threshold, momentum, formulation):
    """Sadat et al. 2024, Algorithm 1, one sample at a time (a sample with w = 1 is not guided:
    its prediction is c and its running average stays). Returns (prediction, new averages,
    whether the clip changed a sample)."""
    preds, averages, clipped = [], [], False
    for b in range(c.shape[0]):
        cb, ub = c[b].reshape(-1), u[b].reshape(-1)
        wb = float(w[b]) if isinstance(w, torch.Tensor) else w
        if wb == 1.0:
            preds.append(cb)
            averages.append(avg[b])
            continue
        diff = cb - ub + momentum * avg[b]
        averages.append(diff)
        if norm_threshold > 0 and float(diff.norm()) > norm_threshold:
            diff = diff * (norm_threshold / float(diff.norm()))
            clipped = True
        cc = float(cb @ cb)
        parallel = (float(diff @ cb) / cc) * cb if cc > 0 else torch.zeros_like(cb)
        update = (diff - parallel) + eta * parallel
        preds.append(cb + (wb - 1) * update if formulation == "paper" else ub + wb * update)
    return torch.stack(preds).reshape(c.shape), torch.stack(averages), clipped


def _run(term, shape, w, steps=4, seed=0):
    """(ours, the paper's, CFG's prediction, c) at each of `steps` steps of one run, each with new
    u, c; and whether the paper's clip changed a sample."""
    g = torch.Generator().manual_seed(seed)
    state, avg = {}, torch.zeros(shape[0], int(torch.tensor(shape[1:]).prod()), dtype=torch.float64)
    fields = dict(eta=term.eta, norm_threshold=term.norm_threshold, momentum=term.momentum,
                  formulation=term.formulation)
    out, any_clipped = [], False
    for step in range(steps):
        c = torch.randn(shape, generator=g, dtype=torch.float64)
        u = c + 0.6 * torch.randn(shape, generator=g, dtype=torch.float64)
        ws = w[step % 2] if isinstance(w, torch.Tensor) else w
        wt = ws.reshape(-1, *[1] * (len(shape) - 1)).double() if isinstance(w, torch.Tensor) else w
        ours = term.guide(u, c, wt, step=step, state=state)
        expected, avg, clipped = paper_apg(u, c, ws, avg, **fields)
        any_clipped |= clipped
        out.append((ours, expected, u + wt * (c - u), c))
    return out, any_clipped


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("w", W, ids=["w", "w-per-sample"])
@pytest.mark.parametrize("formulation", ["paper", "diffusers"])
@pytest.mark.parametrize("eta,momentum", [(0.0, 0.0), (0.0, -0.5), (0.7, 0.3)])
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "no-clip"])
def test_guide_equals_the_papers_algorithm_over_a_run(shape, w, formulation, eta, momentum, clip):
    n = int(torch.tensor(shape[1:]).prod())
    threshold = 0.3 * n ** 0.5 if clip else 0.0     # |d| is about 0.6 sqrt(n): half the samples clip
    term = grt.APG(8.0, eta=eta, norm_threshold=threshold, momentum=momentum, formulation=formulation)
    steps, clipped = _run(term, shape, w)
    assert clipped == clip
    for step, (ours, expected, cfg, c) in enumerate(steps):
        assert_close(ours, expected, ulps=FORMULA_ULPS, effect=expected - cfg, what=f"step {step}")
        if isinstance(w, torch.Tensor):   # a sample with w = 1 gets c exactly
            off = [b for b, wb in enumerate(w[step % 2].tolist()) if wb == 1.0]
            assert torch.equal(ours[off], c[off])


def test_clip_inactive_above_the_norm_and_zero_c_guarded():
    """A threshold above every |d| changes nothing; c = 0 (nothing to project on) gives a finite
    prediction with no parallel part."""
    shape = (3, 4, 5, 7)
    plain, _ = _run(grt.APG(8.0, norm_threshold=0.0), shape, 8.0, steps=1)
    high, _ = _run(grt.APG(8.0, norm_threshold=1e6), shape, 8.0, steps=1)
    assert torch.equal(plain[0][0], high[0][0])
    u = torch.randn(shape, dtype=torch.float64)
    c = torch.zeros(shape, dtype=torch.float64)
    ours = grt.APG(8.0, norm_threshold=0.0, eta=0.5).guide(u, c, 8.0, step=0, state={})
    assert torch.isfinite(ours).all()
    assert_close(ours, 7.0 * (c - u))


def _diffusers_guider(term: grt.APG):
    """diffusers' guider for the same APG: the paper's form is its original formulation at w - 1."""
    from diffusers.guiders import AdaptiveProjectedGuidance

    paper = term.formulation == "paper"
    return AdaptiveProjectedGuidance(
        guidance_scale=term.scale - 1 if paper else term.scale, use_original_formulation=paper,
        adaptive_projected_guidance_momentum=term.momentum, adaptive_projected_guidance_rescale=term.norm_threshold,
        eta=term.eta)


@pytest.mark.parametrize("formulation", ["paper", "diffusers"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_diffusers_guider_over_a_run(formulation, dtype):
    """Same u, c step after step as the modular pipelines feed diffusers' guider (its momentum
    buffer is made at step 0 and updated at every step), both formulations."""
    term = grt.APG(6.0, eta=0.3, norm_threshold=8.0, momentum=-0.5, formulation=formulation)
    guider = _diffusers_guider(term)
    g = torch.Generator().manual_seed(3)
    state, steps = {}, 5
    for step in range(steps):
        c = torch.randn(2, 4, 6, 5, generator=g).to(dtype)
        u = c + 0.5 * torch.randn(2, 4, 6, 5, generator=g).to(dtype)
        theirs = guider_prediction(guider, step, steps, torch.tensor([999 - step]), c, u)
        ours = term.guide(u, c, term.scale, step=step, state=state)
        assert ours.dtype == dtype
        assert_close(ours, theirs, ulps=FORMULA_ULPS, effect=theirs - (u + term.scale * (c - u)),
                     what=f"step {step}")


def test_overlapping_runs_on_one_denoiser_keep_their_own_momentum(tiny_model):
    """Two runs interleaved step by step through one denoiser, each with its own state (as
    guided() does for overlapping pipeline calls), equal each run alone."""
    model = tiny_model("tiny-sd15")
    den = grt.GuidedDenoiser(model, grt.Guidance(grt.APG(6.0, momentum=-0.5, norm_threshold=4.0)))
    runs = [[presets.example_inputs("tiny-sd15", height=8, width=6, seed=10 * r + i) for i in range(2)]
            for r in range(2)]

    def step(inp, i, **kw):
        return den(inp["sample"], inp["timestep"], cond=inp["cond"], uncond=inp["uncond"], step=i,
                   num_steps=2, **kw)

    alone = [[step(inp, i) for i, inp in enumerate(run)] for run in runs]   # the denoiser's own state
    states = [{}, {}]
    for i in range(2):
        for r, run in enumerate(runs):
            assert torch.equal(step(run[i], i, state=states[r]), alone[r][i])


def test_spec_and_errors():
    """(Round trips: test_spec.SPECS.)"""
    assert spec.parse_spec("apg=5:eta=0.5").terms[0] == grt.APG(5.0, eta=0.5)
    assert spec.format_spec(grt.Guidance(grt.APG(5.0, momentum=-0.5))) == "apg=5:momentum=-0.5"
    for text, fragment in [("apg:norm_threshold=-1", "norm_threshold must be >= 0"),
                           ("apg:momentum=2", "momentum must be <= 1"),
                           ("apg:eta=inf", "eta must be finite"),
                           ("apg:formulation=original", "formulation must be 'paper' or 'diffusers'"),
                           ("apg:momentun=0.5", "apg has no option 'momentun'")]:
        with pytest.raises(spec.SpecError, match=fragment):
            spec.parse_spec(text)
    with pytest.raises(spec.SpecError, match="at most one CFG term.*got CFG, APG") as info:
        spec.parse_spec("cfg=5 pag=3@mid apg=5")
    assert str(info.value).splitlines()[-1].strip() == "^^^^^"      # under apg=5
    with pytest.raises(ValueError, match="at most one CFG term"):
        grt.Guidance(grt.APG(5.0), grt.CFG(5.0))
