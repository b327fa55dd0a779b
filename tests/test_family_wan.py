"""Wan 2.x (WanTransformer3DModel / WanPipeline): topology of the presets, the packed runtime
against the independent reference for every term, the per-frame SEG / TPG, guided() on the stock
WanPipeline with one and with two experts (Wan 2.2 A14B), generate's video output."""
import pytest
import torch

import guidance_rt as grt
from guidance_rt import ops, presets
from guidance_rt.families import FAMILIES
from guidance_rt.layers import LayerNotFoundError
from guidance_rt.reference.perturb import tpg_permutation

from .conftest import model_state, packed_and_reference, rel

NAME = "tiny-wan"
TOL = 1e-4       # fp32: packed vs one forward per branch (different op order and batch shapes)
EFFECT = 1e-3    # a term must move the prediction far more than rounding
ALL = dict(start=0.0, stop=1.0)

TERMS = [grt.PAG(layers=10), grt.PAG(beta=0.5, heads=[1], layers="5-6"), grt.SEG(layers=10),
         grt.SEG(sigma=1.0, layers="3-4"), grt.TPG(layers="6-7"), grt.SLG(layers=[9, 10], **ALL),
         grt.SLG(layers=12, skip="attn", **ALL), grt.SLG(layers=20, skip="ff", **ALL),
         grt.SLG(layers=[9, 10], form="cslg", **ALL), grt.NAG(scale=5.0)]


@pytest.fixture(scope="module")
def model():
    return presets.build_model(NAME)


# --- presets ----------------------------------------------------------------------------------

def test_topology_and_full_size_twins():
    small, full = presets.PRESETS[NAME], presets.PRESETS["wan21-1.3b"]
    widths = {"num_attention_heads", "attention_head_dim", "text_dim", "freq_dim", "ffn_dim"}
    assert set(small.config) == set(full.config)
    assert all(small.config[k] == full.config[k] for k in set(full.config) - widths)
    a, b = presets.build_model(NAME, device="meta"), presets.build_model("wan21-1.3b", device="meta")
    assert len(a.blocks) == 30 and [type(m).__name__ for m in a.modules()] == [type(m).__name__ for m in b.modules()]
    assert len(presets.build_model("tiny-wan22", device="meta").blocks) == 40
    assert presets.PRESETS["wan22-a14b"].experts == presets.PRESETS["tiny-wan22"].experts == 2
    # 1.3B: 12 heads of 128; the 14B experts: 40 heads, 40 blocks (the published configs)
    assert (b.blocks[0].attn1.heads, b.config.num_layers, b.config.ffn_dim) == (12, 30, 8960)
    big = presets.build_model("wan22-a14b", device="meta")
    assert (big.blocks[0].attn1.heads, len(big.blocks)) == (40, 40)
    assert sum(p.numel() for p in b.parameters()) == pytest.approx(1.42e9, rel=0.02)
    inp = presets.example_inputs("wan21-1.3b", device="meta")
    assert inp["sample"].shape == (1, 16, 21, 60, 104)          # 480x832, 81 frames
    assert inp["cond"]["encoder_hidden_states"].shape == (1, 512, 4096)


def test_layers_defaults_and_errors(model):
    family = FAMILIES["wan"]
    layers = family.enumerate_layers(model)
    assert [l.name for l in layers] == [str(i) for i in range(30)] and layers[7].path == "blocks.7"
    assert family.default_layers["skip"] == (10,)
    with pytest.raises(LayerNotFoundError, match="0-29|valid"):
        grt.GuidedDenoiser(model, grt.Guidance(grt.CFG(5.0), grt.PAG(layers=30)))
    with pytest.raises(NotImplementedError, match="Wan"):
        grt.GuidedDenoiser(model, grt.Guidance(grt.SCFG()))
    den = grt.GuidedDenoiser(model, grt.Guidance(grt.CFG(5.0), grt.SLG()))   # default block 10
    inp = presets.example_inputs(NAME, seed=1)
    den.adapter.trace = {}
    den(inp["sample"], inp["timestep"], cond=inp["cond"], uncond=inp["uncond"], step=1, num_steps=10)
    assert den.adapter.trace[10] == 2 and den.adapter.trace[11] == 3   # the SLG row skips block 10 only


# --- packed vs reference ----------------------------------------------------------------------

@pytest.mark.parametrize("index", range(len(TERMS)), ids=[repr(t)[:48] for t in TERMS])
def test_each_term_matches_reference_and_changes_output(model, index):
    inp = presets.example_inputs(NAME, seed=index)
    base = grt.Guidance(grt.CFG(5.0))
    packed, ref = packed_and_reference(model, grt.Guidance(grt.CFG(5.0), TERMS[index]), inp)
    assert torch.isfinite(packed).all()
    assert rel(packed, ref) < TOL
    plain, plain_ref = packed_and_reference(model, base, inp)
    assert rel(plain, plain_ref) < TOL
    assert rel(packed, plain) > EFFECT, f"{TERMS[index]!r} does not change the prediction"


def test_all_terms_together_batch_2(model):
    inp = presets.example_inputs(NAME, batch=2, seed=7)
    g = grt.Guidance(grt.CFG(4.0, rescale=0.7), grt.PAG(layers=11), grt.SEG(sigma=1.0, layers=4),
                     grt.TPG(layers=6), grt.SLG(layers=[9, 10], **ALL), grt.NAG(scale=4.0))
    packed, ref = packed_and_reference(model, g, inp)
    assert rel(packed, ref) < TOL
    plain = grt.GuidedDenoiser(model, grt.Guidance(grt.CFG(4.0, rescale=0.7)))(
        inp["sample"], inp["timestep"], cond=inp["cond"], uncond=inp["uncond"], step=0, num_steps=1)
    assert rel(packed, plain) > EFFECT


def test_per_token_timesteps_wan22_ti2v(model):
    """Wan 2.2 TI2V's expand_timesteps: one timestep per latent token, (batch, tokens)."""
    inp = presets.example_inputs(NAME, batch=2, seed=3)
    t = torch.rand(2, 3 * 4 * 4, generator=torch.Generator().manual_seed(1)) * 1000
    g = grt.Guidance(grt.CFG(5.0), grt.SLG(layers=10, **ALL), grt.TPG(layers=5), grt.NAG(4.0))
    packed, ref = packed_and_reference(model, g, dict(inp, timestep=t))
    assert rel(packed, ref) < TOL
    flat, _ = packed_and_reference(model, g, dict(inp, timestep=t[:, :1].expand_as(t).contiguous()))
    assert rel(packed, flat) > EFFECT


# --- per-frame SEG and TPG ----------------------------------------------------------------------

def test_tpg_permutes_within_frames_as_the_reference_draws(model):
    inp = presets.example_inputs(NAME)
    den = grt.GuidedDenoiser(model, grt.Guidance(grt.TPG(layers="6-7")))
    plan = den._entry(1, False, den.branch_scales(0, 1, inp["timestep"])[1], False, torch.device("cpu"))[0]
    perms = den._permutations(plan, torch.Generator().manual_seed(3), inp["sample"])
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(3)))
    per_frame = 16   # 8x8 latent, patch 2: 4x4 tokens in each of 3 frames
    for layer in den.layers_of[0]:
        p = perms.at(layer.position)[0]
        assert torch.equal(p, tpg_permutation(seed, layer, 48, "cpu", groups=3))
        assert torch.equal(p // per_frame, torch.arange(48) // per_frame)   # no token leaves its frame
        assert not torch.equal(p, torch.arange(48))


def test_seg_blurs_each_frame_alone():
    from guidance_rt.effects import AttnVariant, Segment
    q = torch.randn(2, 3 * 4 * 5, 6, generator=torch.Generator().manual_seed(0))
    for sigma in (1.0, float("inf")):
        seg = Segment(0, 2, AttnVariant(blur=sigma))
        out = ops.blur_queries(q, (seg,), (3, 4, 5), slice(None))
        for f in range(3):
            frame = slice(f * 20, (f + 1) * 20)
            alone = ops.blur_queries(q[:, frame], (seg,), (4, 5), slice(None))
            assert torch.allclose(out[:, frame], alone, atol=1e-6)


# --- guided() on the stock WanPipeline ----------------------------------------------------------

CALL = dict(prompt="a cat", negative_prompt="blurry", height=64, width=64, num_frames=9, num_inference_steps=2,
            max_sequence_length=16, output_type="latent")


def _video(pipe, **kw):
    return pipe(**{**CALL, **kw}, generator=torch.Generator().manual_seed(0)).frames


def test_guided_pipeline_cfg_equals_stock_and_terms_apply():
    pipe = presets.build_pipeline(NAME)
    stock = _video(pipe, guidance_scale=5.0)
    before = (type(pipe), dict(pipe.config), model_state(pipe.transformer))
    with grt.guided(pipe, grt.Guidance(grt.CFG(5.0))):
        assert rel(_video(pipe), stock) < TOL
    with grt.guided(pipe, grt.Guidance(grt.CFG(5.0), grt.SLG(layers=10, **ALL), grt.NAG(5.0)),
                    nag_negative_prompt="ugly"):
        assert rel(_video(pipe), stock) > EFFECT
        with pytest.raises(ValueError, match="guidance_scale"):
            _video(pipe, guidance_scale=3.0)
    with grt.guided(pipe):   # the call's own arguments
        assert rel(_video(pipe, guidance_scale=5.0), stock) < TOL
    no_negative = _video(pipe, negative_prompt=None, guidance_scale=5.0)
    with grt.guided(pipe, grt.Guidance(grt.CFG(5.0))):   # no negative prompt: WanPipeline's ""
        assert rel(_video(pipe, negative_prompt=None), no_negative) < TOL
    assert (type(pipe), dict(pipe.config), model_state(pipe.transformer)) == before


def test_two_experts_both_guided_with_guidance_scale_2():
    pipe = presets.build_pipeline("tiny-wan22")
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == 0.875
    stock = _video(pipe, guidance_scale=5.0, guidance_scale_2=3.0)
    before = [model_state(m) for m in (pipe.transformer, pipe.transformer_2)]
    rows = {}
    hooks = [m.blocks[0].register_forward_pre_hook(lambda mod, a, m=m: rows.setdefault(id(m), []).append(a[0].shape[0]))
             for m in (pipe.transformer, pipe.transformer_2)]
    try:
        with grt.guided(pipe, grt.Guidance(grt.CFG(5.0))):
            got = _video(pipe, guidance_scale_2=3.0)
    finally:
        for h in hooks:
            h.remove()
    assert rel(got, stock) < TOL   # expert 2 at guidance_scale_2, expert 1 at the Guidance's 5
    # each expert ran one packed forward (uncond + cond rows) per step of its own
    assert rows[id(pipe.transformer)] == [2] and rows[id(pipe.transformer_2)] == [2]
    with grt.guided(pipe, grt.Guidance(grt.SLG(layers=10, **ALL))):
        with pytest.raises(ValueError, match="guidance_scale_2.*no CFG term"):
            _video(pipe, guidance_scale_2=3.0)
    assert [model_state(m) for m in (pipe.transformer, pipe.transformer_2)] == before


def test_generate_writes_an_animated_png_with_its_settings(tmp_path):
    from guidance_rt import generate
    pipe = presets.build_pipeline(NAME)
    s = generate.Settings(preset=NAME, prompt="a cat", steps=1, guidance="cfg=5 slg=3@10")
    s = generate.finish(s, pipe)
    assert (s.width, s.height) == (64, 64)
    frames = generate.generate(pipe, s, grt.spec.parse_spec(s.guidance))[0]
    assert len(frames) == 9 and frames[0].size == (64, 64)
    path = generate.save(frames, s, str(tmp_path / "v.png"))
    from PIL import Image
    with Image.open(path) as im:
        assert im.is_animated and im.n_frames == 9
    assert generate.read_settings(path).guidance == "cfg=5 slg=3@10"

