"""NAG and S-CFG inside the packed forward: against the sequential reference, the switches that
turn them off, S-CFG's memory bound and the pipelines."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import guidance_rt as grt
from guidance_rt import presets

from .conftest import rel
from .test_reference_nag import assert_within_nag_effect, authors_flux_nag

TOL = 1e-4
FAMILIES = {"tiny-sdxl": "mid", "tiny-sd35": 2, "tiny-flux": "s4"}


def _run(model, guidance, inp, **kw):
    args = dict(cond=inp["cond"], uncond=inp["uncond"], negative=inp["negative"], step=0, num_steps=1)
    args.update(kw)
    packed = grt.GuidedDenoiser(model, guidance)(inp["sample"], inp["timestep"],
                                                  generator=torch.Generator().manual_seed(0), **args)
    ref = grt.reference.step(model, guidance, inp["sample"], inp["timestep"],
                             generator=torch.Generator().manual_seed(0), **args)
    return packed, ref


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("config", ["nag", "nag+cfg", "nag+cfg+pag+seg", "nag-l2-tau1"])
def test_nag_matches_reference(tiny_model, name, config):
    model = tiny_model(name)
    inp = presets.example_inputs(name, batch=2, seed=4)
    layer = FAMILIES[name]
    terms = {
        "nag": [grt.NAG(4.0)],
        "nag+cfg": [grt.CFG(5.0), grt.NAG(4.0)],
        "nag+cfg+pag+seg": [grt.CFG(5.0), grt.NAG(4.0), grt.PAG(layers=layer), grt.SEG(sigma=1.0, layers=layer)],
        "nag-l2-tau1": [grt.NAG(4.0, norm=2, tau=1.0)],
    }[config]
    packed, ref = _run(model, grt.Guidance(*terms), inp)
    assert torch.isfinite(packed).all()
    assert rel(packed, ref) < TOL
    without = [t for t in terms if not isinstance(t, grt.NAG)]
    off, _ = _run(model, grt.Guidance(*without), inp)
    assert rel(packed, off) > 1e-3, "NAG did not change the prediction"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_nag_switches_off(tiny_model, name):
    model = tiny_model(name)
    inp = presets.example_inputs(name, batch=1, seed=5)
    off, _ = _run(model, grt.Guidance(grt.CFG(5.0)), inp)
    for nag in (grt.NAG(4.0, alpha=0.0), grt.NAG(1.0), grt.NAG(4.0, start=0.5)):
        packed, _ = _run(model, grt.Guidance(grt.CFG(5.0), nag), inp)
        assert torch.equal(packed, off), nag
    loose, _ = _run(model, grt.Guidance(grt.NAG(4.0, tau=1e9)), inp)
    tight, _ = _run(model, grt.Guidance(grt.NAG(4.0, tau=1.0)), inp)
    # the norm matters where the clip is active
    l2, _ = _run(model, grt.Guidance(grt.NAG(4.0, norm=2, tau=1.0)), inp)
    l1, _ = _run(model, grt.Guidance(grt.NAG(4.0, norm=1, tau=1.0)), inp)
    assert rel(loose, tight) > 1e-4 and rel(l1, l2) > 1e-4


def test_nag_zero_norm_is_finite():
    zp = torch.zeros(1, 3, 8)
    zn = torch.randn(1, 3, 8)
    from guidance_rt import ops
    out = ops.nag_combine(zp, zn, 4.0, 2.5, 0.5, 1)
    assert torch.isfinite(out).all()


def test_nag_needs_a_negative(tiny_model):
    model = tiny_model("tiny-sdxl")
    inp = presets.example_inputs("tiny-sdxl")
    den = grt.GuidedDenoiser(model, grt.Guidance(grt.NAG(4.0)))
    with pytest.raises(ValueError, match="NAG is active but negative is None"):
        den(inp["sample"], inp["timestep"], cond=inp["cond"], step=0, num_steps=1)
    pipe = presets.build_pipeline("tiny-sdxl")
    with pytest.raises(ValueError, match="nag_negative_prompt"):
        with grt.guided(pipe, grt.Guidance(grt.NAG(4.0))):
            pass


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_nag_through_the_pipeline(name):
    pipe = presets.build_pipeline(name)
    run = lambda: pipe(["a cat", "a dog"], num_inference_steps=2, output_type="latent",
                       generator=torch.Generator().manual_seed(0)).images
    with grt.guided(pipe, grt.Guidance(grt.NAG(4.0)), nag_negative_prompt="blurry, ugly"):
        nag = run()
    with grt.guided(pipe, grt.Guidance()):
        plain = run()
    assert torch.isfinite(nag).all() and rel(nag, plain) > 1e-3


def _other_pooled(negative):
    """The negative with only its pooled projection replaced (3x a fresh draw)."""
    pooled = negative["pooled_projections"]
    fresh = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(11), dtype=pooled.dtype)
    return {**negative, "pooled_projections": 3.0 * fresh}


def test_flux_nag_follows_the_authors_with_the_negative_pooled_projection(tiny_model):
    """FLUX NAG's negative stream is modulated by the negative pooled projection's temb (the NAG
    authors' FLUX code): the runtime equals the oracle written from their code
    (test_reference_nag.authors_flux_nag) and the reference oracle to a small fraction of NAG's
    effect, with a negative pooled projection that differs from the positive one; changing only
    that projection moves the prediction clearly, and the runtime follows."""
    model = tiny_model("tiny-flux")
    inp = presets.example_inputs("tiny-flux", batch=2, seed=4)
    sample, t, cond = inp["sample"], inp["timestep"], inp["cond"]
    assert (inp["negative"]["pooled_projections"] - cond["pooled_projections"]).abs().min() > 0
    setting = grt.reference.NAGSetting(phi=4.0, tau=2.5, alpha=0.25, norm=2)    # the authors' defaults
    den = grt.GuidedDenoiser(model, grt.Guidance(grt.NAG(4.0, tau=2.5, alpha=0.25, norm=2)))
    with torch.no_grad():
        plain = model(sample, timestep=t, **cond, return_dict=False)[0]
    got = {}
    for key, negative in (("given", inp["negative"]), ("other", _other_pooled(inp["negative"]))):
        got[key] = den(sample, t, cond=cond, negative=negative, step=0, num_steps=1)
        with torch.no_grad():
            oracle = authors_flux_nag(model, setting, sample, t, cond, negative)
            reference = grt.reference.nag_forward(model, setting, negative, sample, t, cond)
        assert_within_nag_effect(got[key], oracle, plain)
        assert_within_nag_effect(got[key], reference, plain)
    assert (got["other"] - got["given"]).norm() > 0.05 * (got["given"] - plain).norm()


def test_flux_nag_negative_sequence_through_forks_skips_and_shuffles(tiny_model):
    """The negative sequence of the single blocks grows with branches forked in a double block
    (PAG) and in a single one (TPG), follows the run subsets of a skipped block (SLG) and the
    attention-only skip, and has its image tokens shuffled with TPG's rows: packed == reference."""
    model = tiny_model("tiny-flux")
    inp = presets.example_inputs("tiny-flux", batch=2, seed=8)
    terms = [grt.CFG(5.0), grt.PAG(2.0, layers="3"), grt.TPG(0.5, layers="s2"),
             grt.SLG(1.0, layers="s5", start=0.0), grt.SLG(1.0, layers="s3", skip="attn", start=0.0)]
    packed, reference = _run(model, grt.Guidance(*terms, grt.NAG(4.0)), inp)
    without, _ = _run(model, grt.Guidance(*terms), inp)
    assert_within_nag_effect(packed, reference, without)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd35"])
def test_sd3_nag_ignores_the_negative_pooled_projection(tiny_model, name):
    """The NAG authors' SD3 pipeline modulates the negative text with the positive pooled
    projection's temb (it concatenates the positive one again for the NAG rows): the negative's
    own pooled projection changes nothing, in the runtime and in the reference."""
    model = tiny_model(name)
    inp = presets.example_inputs(name, batch=2, seed=4)
    guidance = grt.Guidance(grt.CFG(5.0), grt.NAG(4.0))
    packed, reference = _run(model, guidance, inp)
    packed_other, reference_other = _run(model, guidance, {**inp, "negative": _other_pooled(inp["negative"])})
    assert torch.equal(packed, packed_other) and torch.equal(reference, reference_other)


class _LargestSquare(TorchDispatchMode):
    """Records every tensor produced whose two largest dimensions are both >= n."""

    def __init__(self, n):
        super().__init__()
        self.n, self.hits = n, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and sum(s >= self.n for s in t.shape) >= 2:
                self.hits.append((str(func), tuple(t.shape)))
        return out


def test_scfg_never_materialises_the_1024_token_attention_map(tiny_model):
    """Tiny SDXL on a 64x64 latent with R=2: S-CFG's maps come from the 32x32 (1024-token) level."""
    model = tiny_model("tiny-sdxl")
    inp = presets.example_inputs("tiny-sdxl", height=64, width=64)
    den = grt.GuidedDenoiser(model, grt.Guidance(grt.SCFG(7.5, R=2)))
    with _LargestSquare(1024) as seen:
        out = den(inp["sample"], inp["timestep"], cond=inp["cond"], uncond=inp["uncond"], step=0, num_steps=1)
    assert torch.isfinite(out).all()
    assert seen.hits == []


def test_scfg_errors():
    with pytest.raises(NotImplementedError, match="UNet models"):
        grt.GuidedDenoiser(presets.build_model("tiny-sd3"), grt.Guidance(grt.SCFG()))
    with pytest.raises(ValueError, match="at most one CFG"):
        grt.Guidance(grt.CFG(), grt.SCFG())


@pytest.mark.parametrize("name,shape", [("tiny-sd15", (16, 16)), ("tiny-sd15", (16, 24)), ("tiny-sdxl", (16, 16))])
@pytest.mark.parametrize("completion", ["code", "paper"])
def test_scfg_matches_brute_force_reference(tiny_model, name, shape, completion):
    model = tiny_model(name)
    inp = presets.example_inputs(name, batch=2, height=shape[0], width=shape[1], seed=6)
    term = grt.SCFG(7.5, completion=completion)
    den = grt.GuidedDenoiser(model, grt.Guidance(term, grt.PAG(layers="mid")))
    kw = dict(cond=inp["cond"], uncond=inp["uncond"], step=0, num_steps=1)
    packed = den(inp["sample"], inp["timestep"], **kw)
    ref = grt.reference.step(model, grt.Guidance(term, grt.PAG(layers="mid")), inp["sample"], inp["timestep"], **kw)
    assert rel(packed, ref) < TOL
    brute = grt.reference.scfg_rate(model, term, inp["sample"], inp["timestep"], cond=inp["cond"], uncond=inp["uncond"])
    assert den.last_rate.shape == brute.rate.shape
    assert (den.last_rate.double() - brute.rate).abs().max() < 1e-4
    cfg = grt.GuidedDenoiser(model, grt.Guidance(grt.CFG(7.5), grt.PAG(layers="mid")))(inp["sample"], inp["timestep"], **kw)
    assert rel(packed, cfg) > 1e-3
