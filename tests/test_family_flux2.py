"""FLUX.2 (Flux2Transformer2DModel / Flux2Pipeline): every term packed equals the sequential
reference and changes the output; layers, presets, the stock pipeline under guided(), errors."""
import pytest
import torch

import guidance_rt as grt
from guidance_rt import presets
from guidance_rt.families import enumerate_layers, resolve_layers
from guidance_rt.layers import LayerNotFoundError

from .conftest import model_state, packed_and_reference, rel

NAME = "tiny-flux2"
TOL = 1e-4       # fp32: packed vs one forward per branch (different op order and batch shapes)
EFFECT = 1e-3    # a term must move the prediction far more than rounding
H, W, TEXT = 8, 10, 8   # latent pixels (4x5 image tokens, non-square), text tokens

TERMS = [grt.PAG(layers=2), grt.PAG(beta=0.5, heads=[1], layers="s4"), grt.SEG(layers="s3"),
         grt.SEG(sigma=1.0, layers=[3, "s2"]), grt.TPG(layers=[4, "s5"]), grt.SLG(layers=[3, 4]),
         grt.SLG(layers=[2, "s6"], skip="attn"), grt.SLG(layers=["s11", 5], skip="ff"),
         grt.SLG(2.0, layers=[3, "s10"], form="cslg"), grt.NAG(5.0), grt.NAG(4.0, alpha=0.5, tau=1.5)]


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model(NAME)


@pytest.fixture(scope="module")
def inp():
    return presets.example_inputs(NAME, batch=1, height=H, width=W, text_len=TEXT, seed=1)


@pytest.fixture(scope="module")
def plain(model, inp):
    packed, ref = packed_and_reference(model, grt.Guidance(), inp)
    assert rel(packed, ref) < TOL
    return packed


@pytest.mark.parametrize("index", range(len(TERMS)), ids=[repr(t)[:60] for t in TERMS])
def test_each_term_matches_reference_and_changes_output(model, inp, plain, index):
    term = TERMS[index]
    term = type(term)(**{**term.__dict__, "start": 0.0, "stop": 1.0})
    packed, ref = packed_and_reference(model, grt.Guidance(term), inp)
    assert torch.isfinite(packed).all()
    assert rel(packed, ref) < TOL
    assert rel(packed, plain) > EFFECT, f"{term!r} does not change the prediction"


@pytest.mark.parametrize("cfg", [grt.CFG(4.0), grt.APG(4.0), grt.CFGZeroStar(4.0, zero_init_steps=0)], ids=["cfg", "apg", "cfg0"])
def test_cfg_place_terms(model, inp, plain, cfg):
    """The model has no CFG in Flux2Pipeline, but the denoiser runs an uncond row given one
    (FLUX.2 base models)."""
    packed, ref = packed_and_reference(model, grt.Guidance(cfg), inp)
    assert rel(packed, ref) < TOL and rel(packed, plain) > EFFECT


def test_all_terms_together_batch_2(model):
    x = presets.example_inputs(NAME, batch=2, height=H, width=W, text_len=TEXT, seed=7)
    g = grt.Guidance(grt.CFG(4.0, rescale=0.7), grt.PAG(layers="s4"), grt.SEG(sigma=1.0, layers=[3, "s2"]),
                     grt.TPG(layers=[4, "s5"]), grt.SLG(layers="s10", skip="attn", start=0.0, stop=1.0),
                     grt.NAG(5.0))
    packed, ref = packed_and_reference(model, g, x, seed=2)
    assert rel(packed, ref) < TOL


def test_layers_defaults_and_errors(model):
    layers = enumerate_layers(model)
    assert len(model.transformer_blocks) == 8 and len(model.single_transformer_blocks) == 48
    assert [layer.name for layer in layers[6:10]] == ["6", "7", "s0", "s1"]
    assert layers[-1].path == "single_transformer_blocks.47" and layers[-1].part == "single"
    assert [layer.name for layer in resolve_layers(model, None, "SLG")] == ["3", "4"]
    assert [layer.name for layer in resolve_layers(model, None, "PAG")] == ["1"]
    assert len(resolve_layers(model, "single")) == 48
    with pytest.raises(LayerNotFoundError, match="s0-s47"):
        resolve_layers(model, "s48")
    with pytest.raises(LayerNotFoundError, match="0-7"):
        resolve_layers(model, 8)
    with pytest.raises((ValueError, NotImplementedError), match="Flux2Transformer2DModel"):
        grt.GuidedDenoiser(model, grt.Guidance(grt.SCFG()))
    x = presets.example_inputs(NAME, height=H, width=W, text_len=TEXT)
    assert x["sample"].shape == (1, 20, 128) and x["cond"]["img_ids"].shape == (20, 4)
    assert x["cond"]["encoder_hidden_states"].shape == (1, TEXT, 48) and "pooled_projections" not in x["cond"]
    den = grt.GuidedDenoiser(model, grt.Guidance(grt.PAG(layers=2)))
    with pytest.raises(NotImplementedError, match="kv_cache"):
        den(x["sample"], x["timestep"], cond={**x["cond"], "kv_cache_mode": "cached"}, step=0, num_steps=1)


def test_presets_are_topology_faithful():
    small, full = presets.PRESETS[NAME], presets.PRESETS["flux2-dev"]
    assert set(small.config) == set(full.config) and small.latent_channels == full.latent_channels == 32
    widths = {"attention_head_dim", "num_attention_heads", "joint_attention_dim", "timestep_guidance_channels",
              "axes_dims_rope"}
    assert all(small.config[k] == full.config[k] for k in set(full.config) - widths)
    meta = presets.build_model("flux2-dev", device="meta", dtype=torch.bfloat16)
    assert meta.inner_dim == 6144 and meta.context_embedder.in_features == 15360
    assert sum(p.numel() for p in meta.parameters()) == pytest.approx(32.2e9, rel=0.02)
    x = presets.example_inputs("flux2-dev", device="meta")
    assert x["sample"].shape == (1, 4096, 128) and x["cond"]["encoder_hidden_states"].shape == (1, 512, 15360)


def test_guided_stock_pipeline():
    pipe = presets.build_pipeline(NAME)
    model = pipe.transformer
    before = model_state(model)
    kw = dict(prompt="a cat", num_inference_steps=2, max_sequence_length=16, height=64, width=80,
              output_type="latent")
    stock = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    with grt.guided(pipe, grt.Guidance()):   # nothing to guide: the stock prediction, guidance_scale kept
        same = pipe(generator=torch.Generator().manual_seed(0), guidance_scale=4.0, **kw).images
    assert rel(same, stock) < TOL
    g = grt.Guidance(grt.NAG(5.0), grt.PAG(layers="s4"), grt.SLG(layers=[3, 4], start=0.0, stop=1.0))
    with grt.guided(pipe, g, nag_negative_prompt="blurry"):
        guided = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert guided.shape == stock.shape == (1, 4 * 5, 128) and rel(guided, stock) > EFFECT
    with grt.guided(pipe):   # the call's own arguments
        by_args = pipe(generator=torch.Generator().manual_seed(0), pag_scale=3.0, pag_applied_layers="s4", **kw).images
    assert rel(by_args, stock) > EFFECT
    with pytest.raises(ValueError, match="no classifier-free guidance"):
        with grt.guided(pipe, grt.Guidance(grt.CFG(4.0))):
            pipe(**kw)
    assert model_state(model) == before and type(pipe).__name__ == "Flux2Pipeline"
    assert rel(pipe(generator=torch.Generator().manual_seed(0), **kw).images, stock) == 0


def test_layer_finding_runs(model):
    from guidance_rt import analysis as A

    r = A.find_layers(model, A.load_pairs()[:1], mode="cosine", steps=1, progress=False)
    assert len(r.layers) == 56 and min(s.cosine for s in r.layers) < 0.999
