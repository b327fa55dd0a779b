"""Qwen-Image (QwenImageTransformer2DModel / QwenImagePipeline): the packed runtime equals the
sequential reference for every term, with text of different lengths and masks (the negative
prompt's text is longer than the positive one, so the positive rows carry padded, masked keys);
every term changes the prediction; guided(pipe, CFG(s)) equals the stock pipeline's true CFG."""
import pytest
import torch

import guidance_rt as grt
from guidance_rt import presets
from guidance_rt.layers import LayerNotFoundError

from .conftest import model_state, packed_and_reference, rel
from .tolerance import MODEL_ULPS, assert_close

NAME = "tiny-qwenimage"
TOL = 1e-4       # fp32: packed vs one forward per branch
EFFECT = 1e-3
H, W = 8, 12     # latent pixels: a 4x6 token grid (non-square)
WIN = dict(start=0.0, stop=1.0)

TERMS = [grt.PAG(layers=5), grt.PAG(beta=0.4, heads=[1], layers=[5, 6]), grt.SEG(layers=3),
         grt.SEG(sigma=1.0, layers="3-4"), grt.TPG(layers="6-7"), grt.SLG(layers=[18, 19], **WIN),
         grt.SLG(layers=23, skip="attn", **WIN), grt.SLG(layers=10, skip="ff", **WIN),
         grt.SLG(layers=[3, 8], weights=[1.0, 2.0], form="cslg", **WIN)]


def _inputs(batch=1, seed=0, lengths=(10, 6, 7)):
    """Uncond, cond and NAG-negative text of different lengths (uncond longest)."""
    inp = presets.example_inputs(NAME, batch=batch, height=H, width=W, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    for key, n in zip(("uncond", "cond", "negative"), lengths):
        inp[key]["encoder_hidden_states"] = torch.randn(batch, n, 32, generator=g)
    return inp


@pytest.fixture(scope="module")
def plain(tiny_model):
    model = tiny_model(NAME)
    inp = _inputs()
    packed, ref = packed_and_reference(model, grt.Guidance(grt.CFG(4.0)), inp)
    return inp, packed, ref


def test_cfg_matches_reference(plain):
    inp, packed, ref = plain
    assert packed.shape == inp["sample"].shape
    assert rel(packed, ref) < TOL


@pytest.mark.parametrize("index", range(len(TERMS)), ids=[repr(t)[:60] for t in TERMS])
def test_each_term_matches_reference_and_changes_output(tiny_model, plain, index):
    model = tiny_model(NAME)
    inp, base, _ = plain
    term = TERMS[index]
    term = type(term)(**{**term.__dict__, **WIN})
    packed, ref = packed_and_reference(model, grt.Guidance(grt.CFG(4.0), term), inp)
    assert torch.isfinite(packed).all()
    assert rel(packed, ref) < TOL
    assert rel(packed, base) > EFFECT, f"{term!r} does not change the prediction"


def test_nag_and_all_terms_batch_with_masks(tiny_model, plain):
    """Batch 2 with per-sample text masks (padded prompts, as the pipeline gives a batch of
    prompts), NAG's negative text of its own length and mask, every term at once."""
    model = tiny_model(NAME)
    inp = _inputs(batch=2, seed=3, lengths=(9, 7, 5))
    for key, valid in (("cond", (7, 4)), ("negative", (5, 3))):
        n = inp[key]["encoder_hidden_states"].shape[1]
        mask = torch.arange(n)[None] < torch.tensor(valid)[:, None]
        inp[key]["encoder_hidden_states_mask"] = mask
        inp[key]["encoder_hidden_states"] = inp[key]["encoder_hidden_states"] * mask[..., None]
    nag_only = grt.Guidance(grt.CFG(4.0), grt.NAG(4.0))
    everything = grt.Guidance(grt.CFG(4.0), grt.NAG(4.0), grt.PAG(layers=5, **WIN), grt.SEG(layers=3, **WIN),
                              grt.TPG(layers=6, **WIN), grt.SLG(layers=[18, 19], **WIN))
    base, base_ref = packed_and_reference(model, grt.Guidance(grt.CFG(4.0)), inp)
    assert rel(base, base_ref) < TOL
    for guidance in (nag_only, everything):
        packed, ref = packed_and_reference(model, guidance, inp)
        assert rel(packed, ref) < TOL
        assert rel(packed, base) > EFFECT


def test_padding_is_exact(tiny_model):
    """A padded, masked text gives the model's own prediction (the runtime's text padding)."""
    model = tiny_model(NAME)
    inp = _inputs()
    cond = inp["cond"]
    padded = dict(cond, encoder_hidden_states=torch.cat([cond["encoder_hidden_states"], torch.randn(1, 3, 32)], 1),
                  encoder_hidden_states_mask=torch.tensor([[True] * 6 + [False] * 3]))
    with torch.no_grad():
        a = model(inp["sample"], timestep=inp["timestep"], **cond, return_dict=False)[0]
        b = model(inp["sample"], timestep=inp["timestep"], **padded, return_dict=False)[0]
    assert_close(b, a, ulps=MODEL_ULPS)


def test_errors_name_the_family(tiny_model):
    model = tiny_model(NAME)
    with pytest.raises(NotImplementedError, match="QwenImageTransformer2DModel"):
        grt.GuidedDenoiser(model, grt.Guidance(grt.SCFG(5.0)))
    with pytest.raises(LayerNotFoundError, match="59"):
        grt.GuidedDenoiser(model, grt.Guidance(grt.PAG(layers=60)))
    edit = type(model)(num_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                       axes_dims_rope=(4, 6, 6), zero_cond_t=True)   # Qwen-Image-Edit-2509's flag
    with pytest.raises(NotImplementedError, match="zero_cond_t"):
        grt.GuidedDenoiser(edit, grt.Guidance(grt.CFG(4.0)))


def test_layers_and_defaults(tiny_model):
    model = tiny_model(NAME)
    from guidance_rt.families import enumerate_layers, resolve_layers
    layers = enumerate_layers(model)
    assert len(layers) == 60 and layers[59].path == "transformer_blocks.59"
    assert [layer.position for layer in resolve_layers(model, None, "SLG")] == list(range(18, 24))


@pytest.fixture(scope="module")
def pipe():
    return presets.build_pipeline(NAME)


PIPE_KW = dict(prompt="a red cat", negative_prompt="blurry, low quality", num_inference_steps=2,
               output_type="latent", height=64, width=64)


def test_guided_cfg_equals_stock_true_cfg(pipe):
    """guided(pipe, CFG(s)) == the stock pipeline with true_cfg_scale=s (its per-token renorm
    included); the pipeline and the model are unchanged afterwards."""
    before = model_state(pipe.transformer)
    cls = type(pipe)
    stock = pipe(**PIPE_KW, true_cfg_scale=4.0, generator=torch.Generator().manual_seed(0)).images
    with grt.guided(pipe, grt.Guidance(grt.CFG(4.0))):
        out = pipe(**PIPE_KW, generator=torch.Generator().manual_seed(0)).images
        with pytest.raises(ValueError, match="true_cfg_scale"):
            pipe(**PIPE_KW, true_cfg_scale=3.0)
    plain = pipe(**dict(PIPE_KW, negative_prompt=None), true_cfg_scale=1.0,
                 generator=torch.Generator().manual_seed(0)).images
    assert type(pipe) is cls and model_state(pipe.transformer) == before
    assert rel(out, stock) < TOL
    assert rel(stock, plain) > EFFECT


def test_guided_pipeline_nag_pag(pipe):
    guidance = grt.Guidance(grt.CFG(4.0), grt.PAG(layers=5), grt.NAG(4.0))
    with grt.guided(pipe, guidance, nag_negative_prompt="ugly"):
        # prompts of different lengths: the pipeline pads them and passes a text mask
        out = pipe(**dict(PIPE_KW, prompt=["a red cat", "a dog on a long sandy beach"],
                          negative_prompt=["blurry", "low quality"]),
                   generator=torch.Generator().manual_seed(0)).images
    assert out.shape[0] == 2 and torch.isfinite(out).all()


def test_tiny_preset_keeps_the_topology(tiny_model):
    """tiny-qwenimage is qwen-image's module tree (60 dual-stream blocks) with tiny widths."""
    from guidance_rt.preset_configs import PRESETS
    tiny = tiny_model(NAME)
    full = presets.build_model("qwen-image", device="meta")
    kinds = lambda m: [(n, type(x).__name__) for n, x in m.named_modules()]
    assert kinds(tiny) == kinds(full) and len(tiny.transformer_blocks) == 60
    assert PRESETS[NAME].latent_channels == PRESETS["qwen-image"].latent_channels == 16
    inp = presets.example_inputs(NAME)
    assert inp["sample"].shape == (1, 64, 64) and inp["cond"]["img_shapes"] == [[(1, 8, 8)]]
