"""No silent no-op: every term field is checked against the model when the GuidedDenoiser (or
guided) is built, and non-finite conditioning or a non-finite guided prediction is an error
naming what is wrong, never a NaN result."""
import pytest
import torch

import guidance_rt as grt
from guidance_rt import presets
from guidance_rt.families import resolve_layers

from .conftest import model_state



@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sd3", "tiny-flux"])
@pytest.mark.parametrize("heads", [(99,), (0, 7)])
def test_pag_heads_beyond_the_layer_are_an_error(tiny_model, name, heads):
    model = tiny_model(name)
    before = model_state(model)
    n = min(layer.heads for layer in resolve_layers(model, None, "PAG"))
    assert n <= 4   # so head 7 is out of range on every tiny preset
    guidance = grt.Guidance(grt.CFG(4.0), grt.PAG(scale=3.0, beta=0.5, heads=heads))
    with pytest.raises(ValueError, match=rf"PAG \(term 1\)\.heads: head {max(heads)} does not exist in layer "
                                         rf".* which has {n} heads; valid: 0-{n - 1}"):
        grt.GuidedDenoiser(model, guidance)
    assert model_state(model) == before
    grt.GuidedDenoiser(model, grt.Guidance(grt.PAG(heads=(n - 1,))))   # the last head is valid


def test_pag_heads_error_through_guided_leaves_the_pipeline_as_it_was():
    pipe = presets.build_pipeline("tiny-sd15", seed=0)
    cls, before = type(pipe), model_state(pipe.unet)
    with pytest.raises(ValueError, match=r"PAG \(term 0\)\.heads: head 99 does not exist"):
        with grt.guided(pipe, grt.Guidance(grt.PAG(heads=99))):
            pass
    assert type(pipe) is cls and model_state(pipe.unet) == before


def _poisoned(inp: dict, where: str, key: str, value: float) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in inp.items()}
    t = out[where][key].clone()
    t.view(-1)[t.numel() // 2] = value
    out[where][key] = t
    return out


@pytest.mark.parametrize("name,where,key", [
    ("tiny-sdxl", "cond", "encoder_hidden_states"),
    ("tiny-sd3", "cond", "pooled_projections"),
    ("tiny-sd3", "uncond", "encoder_hidden_states"),
    ("tiny-flux", "cond", "pooled_projections"),
    ("tiny-flux", "negative", "encoder_hidden_states"),
])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_conditioning_is_named(tiny_model, name, where, key, value):
    model = tiny_model(name)
    inp = _poisoned(presets.example_inputs(name, batch=2), where, key, value)
    terms = [grt.CFG(4.0)] if where == "uncond" else [grt.NAG(scale=3.0)] if where == "negative" else []
    den = grt.GuidedDenoiser(model, grt.Guidance(*terms, grt.PAG(scale=2.0)))
    with pytest.raises(grt.NonFiniteError, match=rf"^{where}\['{key}'\] contains NaN or Inf values$"):
        den(inp["sample"], inp["timestep"], cond=inp["cond"], uncond=inp["uncond"], negative=inp["negative"],
            step=0, num_steps=1)


@pytest.mark.parametrize("guidance,term", [
    (grt.Guidance(grt.CFG(scale=1e308)), r"CFG\(scale=1e\+308\)"),
    (grt.Guidance(grt.CFG(scale=4.0), grt.PAG(scale=-1e300, layers="mid")), r"PAG \(term 1, scale -1e\+300\)"),
])
def test_a_scale_that_overflows_names_the_step_and_term(tiny_model, guidance, term):
    model = tiny_model("tiny-sd15")
    inp = presets.example_inputs("tiny-sd15", batch=1)
    den = grt.GuidedDenoiser(model, guidance)
    with pytest.raises(grt.NonFiniteError, match=rf"^step 2: {term} makes the guided prediction non-finite"):
        den(inp["sample"], inp["timestep"], cond=inp["cond"], uncond=inp["uncond"], step=2, num_steps=5)
    # a large but representable scale stays finite and is accepted
    ok = grt.GuidedDenoiser(model, grt.Guidance(grt.CFG(scale=1e4)))
    assert torch.isfinite(ok(inp["sample"], inp["timestep"], cond=inp["cond"], uncond=inp["uncond"],
                             step=2, num_steps=5)).all()


def test_a_non_finite_model_output_names_the_branch(tiny_model):
    """NaN made inside the forward (a NaN weight in m0's value projection, which every row
    uses) names the first rows it reached instead of returning a NaN prediction."""
    model = presets.build_model("tiny-sd15")
    v = model.mid_block.attentions[0].transformer_blocks[0].attn1.to_v
    inp = presets.example_inputs("tiny-sd15", batch=1)
    with torch.no_grad():
        v.weight[0, 0] = float("nan")
    den = grt.GuidedDenoiser(model, grt.Guidance(grt.PAG(scale=2.0, layers="mid")))
    with pytest.raises(grt.NonFiniteError, match=r"step 0: the model's prediction for the cond rows is not finite"):
        den(inp["sample"], inp["timestep"], cond=inp["cond"], step=0, num_steps=1)


def test_seg_sigma_that_blurs_nothing_is_an_error():
    """sigma <= 1/6 gives ceil(6 sigma) <= 1, a 1-tap kernel: the query is unchanged."""
    for sigma in (1e-300, 0.1, 1 / 6):
        with pytest.raises(ValueError, match=r"SEG.sigma must be > 1/6 \(smaller gives a 1-tap kernel"):
            grt.SEG(sigma=sigma)
    grt.SEG(sigma=0.17)   # ceil(1.02) = 2: a 3-tap kernel


def test_adaptive_pag_on_flux_is_an_error(tiny_model):
    model = tiny_model("tiny-flux")
    with pytest.raises(ValueError, match=r"PAG \(term 0\)\.adaptive_scale must be 0 on FLUX"):
        grt.GuidedDenoiser(model, grt.Guidance(grt.PAG(adaptive_scale=0.001)))
    grt.GuidedDenoiser(tiny_model("tiny-sd3"), grt.Guidance(grt.PAG(adaptive_scale=0.001)))   # timestep 0..1000
