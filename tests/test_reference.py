"""Tests of the sequential reference oracle (guidance_rt.reference), on tiny random models, CPU.

The oracle is what the packed runtime is tested against, so it is checked here against
independent sources: plain forwards, diffusers' own rescale / PAG processor / skip_layers, a
brute-force Gaussian sum, and behavioural properties of the perturbed attention maps.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import guidance_rt as grt
from guidance_rt import reference as ref
from guidance_rt.methods import PerturbationTerm

from .tolerance import MODEL_ULPS, assert_close

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel  # noqa: E402

B = 2
H_LAT, W_LAT = 8, 12            # non-square latents; UNet / SD3 token grid 4 x 6
FLUX_GRID = (4, 6)
N_TEXT = 5


# --------------------------------------------------------------------------------- tiny models


def _randomize(model, seed=0):
    """Every parameter random normal (no zero-initialised gate can hide a perturbation). Norm
    weights around 1 and q/k projections a little larger so that attention maps are sharp."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight") and p.ndim == 1:
                p.copy_(1.0 + 0.3 * x)
            elif re.search(r"(to_q|to_k|add_q_proj|add_k_proj)\.weight$", name):
                p.copy_(x * 2.0 / p.shape[1] ** 0.5)
            else:
                p.copy_(x * 0.2)
    return model.eval()


def tiny_unet():
    # SDXL-like: down_blocks.1 d0-d1, mid m0-m1, up_blocks.0 u0-u3
    return _randomize(UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 16,
        cross_attention_dim=16, norm_num_groups=4))


def tiny_sd3(dual=False):
    return _randomize(SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=16,
        pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16,
        dual_attention_layers=(0, 1, 2) if dual else (), qk_norm="rms_norm" if dual else None))


def tiny_flux():
    return _randomize(FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=16, pooled_projection_dim=16,
        guidance_embeds=True, axes_dims_rope=(2, 2, 4)))


def flux_img_ids(h, w):
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def make_inputs(family, seed=1):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    if family == "unet":
        sample, t = r(B, 4, H_LAT, W_LAT), torch.tensor(500.0)

        def kw():
            return dict(encoder_hidden_states=r(B, N_TEXT, 16),
                        added_cond_kwargs=dict(text_embeds=r(B, 16), time_ids=r(B, 6)))
    elif family in ("sd3", "sd35"):
        sample, t = r(B, 4, H_LAT, W_LAT), torch.full((B,), 500.0)

        def kw():
            return dict(encoder_hidden_states=r(B, N_TEXT, 16), pooled_projections=r(B, 16))
    else:
        h, w = FLUX_GRID
        sample, t = r(B, h * w, 8), torch.full((B,), 0.5)
        img_ids, txt_ids = flux_img_ids(h, w), torch.zeros(N_TEXT, 3)

        def kw():
            return dict(encoder_hidden_states=r(B, N_TEXT, 16), pooled_projections=r(B, 16),
                        img_ids=img_ids, txt_ids=txt_ids, guidance=torch.full((B,), 3.5))
    cond, uncond = kw(), kw()
    return sample, t, cond, uncond


MODELS = {}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: threads only add contention on a shared machine (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def get(family):
    if family not in MODELS:
        build = {"unet": tiny_unet, "sd3": tiny_sd3, "sd35": lambda: tiny_sd3(dual=True),
                 "flux": tiny_flux}[family]
        MODELS[family] = build()
    return MODELS[family]


# a layer of each family that every term can act on (FLUX: a double and a single block)
LAYERS = {"unet": ["d1", "m0"], "sd3": ["1", "2"], "sd35": ["1", "2"], "flux": ["1", "s0"]}
FAMILIES = list(LAYERS)


def forward(model, sample, t, kwargs):
    with torch.no_grad():
        return model(sample, timestep=t, **kwargs, return_dict=False)[0]


def run(family, guidance, *, gen_seed=0, **over):
    model = get(family)
    sample, t, cond, uncond = make_inputs(family)
    args = dict(cond=cond, uncond=uncond, step=0, num_steps=10,
                generator=torch.Generator().manual_seed(gen_seed))
    args.update(over)
    return ref.step(model, guidance, sample, t, **args)


def branches(family, guidance, gen_seed=0, **over):
    model = get(family)
    sample, t, cond, uncond = make_inputs(family)
    args = dict(cond=cond, uncond=uncond, step=0, num_steps=10,
                generator=torch.Generator().manual_seed(gen_seed))
    args.update(over)
    return ref.branch_predictions(model, guidance, sample, t, **args)


def term_cases(family):
    layers = LAYERS[family]
    return [
        grt.PAG(scale=3.0, layers=layers),
        grt.PAG(scale=3.0, layers=layers, beta=0.5, heads=(0, 2)),
        grt.SEG(scale=3.0, layers=layers),
        grt.SEG(scale=3.0, layers=layers, sigma=1.5),
        grt.TPG(scale=3.0, layers=layers),
        grt.SLG(scale=2.8, layers=layers, start=0.0),
        grt.SLG(scale=2.8, layers=layers, skip="attn", start=0.0),
        grt.SLG(scale=2.8, layers=layers, skip="ff", start=0.0),
    ]


ALL_CASES = [(f, i) for f in FAMILIES for i in range(len(term_cases("unet")))]


def case_id(case):
    family, i = case
    term = term_cases(family)[i]
    extra = {"PAG": f"b{term.beta}" if isinstance(term, grt.PAG) else "",
             "SEG": "inf" if isinstance(term, grt.SEG) and term.infinite else "s",
             "SLG": getattr(term, "skip", "")}.get(type(term).__name__, "")
    return f"{family}-{type(term).__name__}-{extra}"


# ------------------------------------------------------------------------- model state snapshot


def snapshot(model):
    """Everything a perturbation could leave behind: processors, instance forwards, hooks."""
    state = {}
    for name, m in model.named_modules():
        state[name] = (
            m.__dict__.get("processor"),
            m.__dict__.get("forward"),
            tuple(m._forward_hooks.items()), tuple(m._forward_pre_hooks.items()),
            tuple(m._backward_hooks.items()), tuple(m._backward_pre_hooks.items()),
            tuple(m._forward_hooks_with_kwargs.items()),
            tuple(m._forward_pre_hooks_with_kwargs.items()),
            m.training,
        )
    return state


def assert_same_state(before, after):
    assert before.keys() == after.keys()
    for name in before:
        b, a = before[name], after[name]
        assert b[0] is a[0], f"processor of {name} changed"
        assert b[1] is a[1], f"forward of {name} changed"
        assert b[2:] == a[2:], f"hooks of {name} changed"


# ------------------------------------------------------------------------------------- CFG


@pytest.mark.parametrize("family", ["unet", "sd3", "flux"])
def test_cfg_equals_two_plain_forwards(family):
    model = get(family)
    sample, t, cond, uncond = make_inputs(family)
    c = forward(model, sample, t, cond).double()
    u = forward(model, sample, t, uncond).double()
    out = run(family, grt.Guidance(grt.CFG(scale=5.0)))
    assert out.dtype == sample.dtype and out.shape == c.shape
    assert_close(out, u + 5.0 * (c - u), effect=4.0 * (c - u))


def test_cfg_rescale_matches_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    model = get("sd3")
    sample, t, cond, uncond = make_inputs("sd3")
    c = forward(model, sample, t, cond).double()
    u = forward(model, sample, t, uncond).double()
    expected = rescale_noise_cfg(u + 4.0 * (c - u), c, guidance_rescale=0.7)
    out = run("sd3", grt.Guidance(grt.CFG(scale=4.0, rescale=0.7)))
    plain = run("sd3", grt.Guidance(grt.CFG(scale=4.0)))
    assert_close(out, expected, effect=expected - plain.double())
    assert (out - plain).abs().max() > 1e-2


def test_cfg_off_has_no_uncond_row():
    model = get("unet")
    sample, t, cond, _ = make_inputs("unet")
    c = forward(model, sample, t, cond)
    for guidance in (grt.Guidance(), grt.Guidance(grt.CFG(scale=1.0)),
                     grt.Guidance(grt.CFG(scale=5.0, start=0.5))):
        kinds = [b.kind for b in ref.plan_branches(guidance, t, 0, 10)]
        assert kinds == ["cond"]
        out = ref.step(model, guidance, sample, t, cond=cond, uncond=None, step=0, num_steps=10)
        torch.testing.assert_close(out, c, rtol=0, atol=0)
    # rescale is a CFG option: without the uncond row it does nothing
    out = ref.step(model, grt.Guidance(grt.CFG(scale=1.0, rescale=0.9)), sample, t, cond=cond,
                   step=0, num_steps=10)
    torch.testing.assert_close(out, c, rtol=0, atol=0)


def test_cfg_active_needs_uncond():
    with pytest.raises(ValueError, match="uncond"):
        run("unet", grt.Guidance(grt.CFG(scale=5.0)), uncond=None)


def test_unknown_term_and_bad_step_raise():
    class Mystery(PerturbationTerm):
        pass

    with pytest.raises(ValueError, match="Mystery"):
        run("unet", grt.Guidance(grt.CFG(), Mystery(scale=1.0, layers="m0")))
    with pytest.raises(ValueError):
        run("unet", grt.Guidance(grt.CFG()), step=10)
    with pytest.raises(ValueError):
        run("unet", grt.Guidance(grt.CFG()), num_steps=0)


# ------------------------------------------------------------------- every term, every family


@pytest.mark.parametrize("case", ALL_CASES, ids=case_id)
def test_term_changes_output_and_off_equals_off(case):
    family, i = case
    term = term_cases(family)[i]
    base = run(family, grt.Guidance(grt.CFG(scale=5.0)))
    before = snapshot(get(family))

    out = run(family, grt.Guidance(grt.CFG(scale=5.0), term))
    assert_same_state(before, snapshot(get(family)))
    change = (out - base).abs().max().item()
    assert change > 1e-2 * base.abs().max().item(), f"{term} barely changes the output ({change})"

    # its branch exists and differs from cond by much more than rounding
    bs = branches(family, grt.Guidance(grt.CFG(scale=5.0), term))
    assert [b.kind for b in bs] == ["uncond", "cond", type(term).__name__]
    assert (bs[2].prediction - bs[1].prediction).abs().max() > 1e-3

    # scale 0 and outside the window: no branch, exactly CFG alone
    for off in (grt.Guidance(grt.CFG(scale=5.0), type(term)(**{**vars(term), "scale": 0.0})),
                grt.Guidance(grt.CFG(scale=5.0),
                             type(term)(**{**vars(term), "start": 0.5, "stop": 1.0}))):
        assert [b.kind for b in ref.plan_branches(off, 500.0, 0, 10)] == ["uncond", "cond"]
        torch.testing.assert_close(run(family, off), base, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["unet", "flux"])
def test_combine_with_several_terms(family):
    layers = LAYERS[family]
    terms = [grt.PAG(scale=2.0, layers=layers[:1]), grt.SEG(scale=1.5, layers=layers[1:]),
             grt.TPG(scale=0.5, layers=layers), grt.SLG(scale=1.0, layers=layers[:1], start=0.0)]
    guidance = grt.Guidance(grt.CFG(scale=4.0), *terms)
    bs = branches(family, guidance, gen_seed=3)
    u, c = bs[0].prediction.double(), bs[1].prediction.double()
    expected = u + 4.0 * (c - u)
    for b, term in zip(bs[2:], terms):
        assert b.term is term and b.scale == term.scale
        expected = expected + term.scale * (c - b.prediction.double())
    out = run(family, guidance, gen_seed=3)
    assert_close(out, expected, effect=expected - c)
    # CFG off: c + sum s_k (c - p_k)
    guidance = grt.Guidance(*terms)
    bs = branches(family, guidance, gen_seed=3, uncond=None)
    c = bs[0].prediction.double()
    expected = c + sum(t.scale * (c - b.prediction.double()) for b, t in zip(bs[1:], terms))
    assert_close(run(family, guidance, gen_seed=3, uncond=None), expected, effect=expected - c)


# ------------------------------------------------------------------------------------- PAG


def test_pag_unet_attn1_is_to_out_of_to_v():
    model = get("unet")
    sample, t, cond, _ = make_inputs("unet")
    chosen = model.mid_block.attentions[0].transformer_blocks[0].attn1
    other = model.mid_block.attentions[0].transformer_blocks[1].attn1
    seen = {}

    def capture(name):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            seen[name] = (x, output)
        return hook

    with ref.perturbed(model, grt.PAG(layers="m0"), sample=sample, kwargs=cond):
        h1 = chosen.register_forward_hook(capture("chosen"), with_kwargs=True)
        h2 = other.register_forward_hook(capture("other"), with_kwargs=True)
        try:
            forward(model, sample, t, cond)
        finally:
            h1.remove()
            h2.remove()
    x, out = seen["chosen"]
    with torch.no_grad():
        expected = chosen.to_out[1](chosen.to_out[0](chosen.to_v(x)))
        assert_close(out, expected)
        x, out = seen["other"]          # the other block keeps the stock attention
        torch.testing.assert_close(out, other(x), rtol=0, atol=0)
        assert (out - other.to_out[0](other.to_v(x))).abs().max() > 1e-2


def test_pag_sd3_matches_diffusers_pag_joint_processor():
    from diffusers.models.attention_processor import PAGJointAttnProcessor2_0

    model = get("sd3")                  # SD3.0: no qk-norm, like diffusers' PAG processor
    sample, t, cond, _ = make_inputs("sd3")
    bs = branches("sd3", grt.Guidance(grt.PAG(scale=3.0, layers=["1", "3"])), uncond=None)
    c, p = bs[0].prediction, bs[1].prediction

    doubled = {k: torch.cat([v, v]) for k, v in cond.items()}
    attns = [model.transformer_blocks[i].attn for i in (1, 3)]
    originals = [a.processor for a in attns]
    try:
        for a in attns:
            a.processor = PAGJointAttnProcessor2_0()
        out = forward(model, torch.cat([sample, sample]), torch.cat([t, t]), doubled)
    finally:
        for a, proc in zip(attns, originals):
            a.processor = proc
    assert_close(out[:B], c, ulps=MODEL_ULPS, effect=p - c, what="cond")
    assert_close(out[B:], p, ulps=MODEL_ULPS, effect=p - c, what="PAG branch")


def _attention_call(family, model, block_path, x_img, x_txt):
    """Call the block's attention module directly on given image / text hidden states; returns
    (image output, text output)."""
    block = model.get_submodule(block_path)
    attn = block.attn
    if family in ("sd3", "sd35"):
        img, txt = attn(hidden_states=x_img, encoder_hidden_states=x_txt)
        return img, txt
    ids = torch.cat([torch.zeros(x_txt.shape[1], 3), flux_img_ids(*FLUX_GRID)])
    rotary = model.pos_embed(ids)
    if block_path.startswith("single"):
        out = attn(hidden_states=torch.cat([x_txt, x_img], 1), image_rotary_emb=rotary)
        return out[:, x_txt.shape[1]:], out[:, :x_txt.shape[1]]
    img, txt = attn(hidden_states=x_img, encoder_hidden_states=x_txt, image_rotary_emb=rotary)
    return img, txt


@pytest.mark.parametrize("family,path,name", [
    ("sd35", "transformer_blocks.1", "1"),          # dual attention + rms qk-norm
    ("flux", "transformer_blocks.1", "1"),          # double block, rotary
    ("flux", "single_transformer_blocks.0", "s0"),  # single block, concatenated sequence
])
def test_pag_mmdit_map_masks_image_to_image(family, path, name):
    """PAG's MM-DiT map: an image query sees its own image token and every text token only.
    Changing image token j then changes image output row j and the text rows, nothing else."""
    model = get(family)
    sample, t, cond, _ = make_inputs(family)
    dim = model.get_submodule(path).attn.to_q.in_features
    n_img = FLUX_GRID[0] * FLUX_GRID[1]
    g = torch.Generator().manual_seed(5)
    x_img, x_txt = torch.randn(B, n_img, dim, generator=g), torch.randn(B, N_TEXT, dim, generator=g)
    x_img2 = x_img.clone()
    x_img2[:, 7] += torch.randn(B, dim, generator=g)
    with torch.no_grad():
        stock = _attention_call(family, model, path, x_img, x_txt)
        stock2 = _attention_call(family, model, path, x_img2, x_txt)
        with ref.perturbed(model, grt.PAG(layers=name), sample=sample, kwargs=cond):
            pag = _attention_call(family, model, path, x_img, x_txt)
            pag2 = _attention_call(family, model, path, x_img2, x_txt)
        with ref.perturbed(model, grt.PAG(layers=name, beta=0.0), sample=sample, kwargs=cond):
            soft0 = _attention_call(family, model, path, x_img, x_txt)
    # text rows unchanged by PAG; beta = 0 is the stock attention
    effect = pag[0] - stock[0]
    assert effect.abs().max() > 1e-2
    assert_close(pag[1], stock[1], effect=effect, what="text rows")
    assert_close(soft0[0], stock[0], effect=effect, what="beta 0 image rows")
    assert_close(soft0[1], stock[1], effect=effect, what="beta 0 text rows")
    # locality of the image rows
    others = [i for i in range(n_img) if i != 7]
    assert_close(pag2[0][:, others], pag[0][:, others], effect=pag2[0][:, 7] - pag[0][:, 7], what="locality")
    assert (pag2[0][:, 7] - pag[0][:, 7]).abs().max() > 1e-3
    assert (stock2[0][:, others] - stock[0][:, others]).abs().max() > 1e-3   # stock is not local


@pytest.mark.parametrize("family", FAMILIES)
def test_softpag_is_affine_in_beta_and_beta0_is_cond(family):
    layers = LAYERS[family][:1]
    preds = {}
    for beta in (0.0, 0.5, 1.0):
        bs = branches(family, grt.Guidance(grt.PAG(layers=layers, beta=beta, heads=(1, 3))),
                      uncond=None)
        preds[beta] = bs[1].prediction
    c = bs[0].prediction
    torch.testing.assert_close(preds[0.0], c, rtol=0, atol=0)   # beta 0: exactly the stock map
    assert (preds[0.5] - c).abs().max() > 1e-3
    assert (preds[1.0] - preds[0.5]).abs().max() > 1e-3
    # all heads selected explicitly == heads=None
    a = branches(family, grt.Guidance(grt.PAG(layers=layers, heads=(0, 1, 2, 3))), uncond=None)
    b = branches(family, grt.Guidance(grt.PAG(layers=layers)), uncond=None)
    assert_close(a[1].prediction, b[1].prediction, ulps=MODEL_ULPS, effect=b[1].prediction - b[0].prediction)


def test_softpag_attention_output_mixes_per_head():
    """At the attention output (an affine function of the per-head mix), SoftPAG with beta is
    (1 - beta) stock + beta PAG, and a head subset only moves those heads' channels."""
    model = get("unet")
    sample, t, cond, _ = make_inputs("unet")
    attn = model.mid_block.attentions[0].transformer_blocks[0].attn1
    x = torch.randn(B, 24, attn.to_q.in_features, generator=torch.Generator().manual_seed(2))

    def attn1_out(term):
        with torch.no_grad(), ref.perturbed(model, term, sample=sample, kwargs=cond):
            return attn(x)

    with torch.no_grad():
        stock = attn(x)
    full = attn1_out(grt.PAG(layers="m0"))
    half = attn1_out(grt.PAG(layers="m0", beta=0.25))
    assert_close(half, 0.75 * stock + 0.25 * full, effect=full - stock)
    # head subset: undo to_out[0] (square, invertible here) and compare channel blocks
    w, bias = attn.to_out[0].weight.double(), attn.to_out[0].bias.double()
    inner = lambda y: torch.linalg.solve(w, (y.double() - bias).transpose(1, 2)).transpose(1, 2)  # noqa: E731
    sub = inner(attn1_out(grt.PAG(layers="m0", heads=(1,))))
    d = attn.to_q.out_features // attn.heads
    head1 = slice(d, 2 * d)
    torch.testing.assert_close(sub[..., head1], inner(full)[..., head1], rtol=1e-4, atol=1e-4)
    keep = torch.ones(attn.heads * d, dtype=torch.bool)
    keep[head1] = False
    torch.testing.assert_close(sub[..., keep], inner(stock)[..., keep], rtol=1e-4, atol=1e-4)


def test_pag_adaptive_scale():
    fam = "unet"
    # t = 500: s_t = max(0, 3 - a * 500)
    off = run(fam, grt.Guidance(grt.CFG(), grt.PAG(scale=3.0, layers="m0", adaptive_scale=0.01)))
    torch.testing.assert_close(off, run(fam, grt.Guidance(grt.CFG())), rtol=0, atol=0)
    ada = run(fam, grt.Guidance(grt.CFG(), grt.PAG(scale=3.0, layers="m0", adaptive_scale=0.001)))
    fixed = run(fam, grt.Guidance(grt.CFG(), grt.PAG(scale=2.5, layers="m0")))
    assert_close(ada, fixed, effect=fixed - off)


def test_default_layers_are_the_family_defaults():
    """layers=None means the family default (UNet PAG / SEG: the mid block, m0-m1 here)."""
    for term in (grt.PAG(), grt.SEG()):
        default = branches("unet", grt.Guidance(term), uncond=None)[1].prediction
        explicit = branches("unet", grt.Guidance(type(term)(layers="mid")), uncond=None)
        torch.testing.assert_close(default, explicit[1].prediction, rtol=0, atol=0)


def test_pag_rejects_bad_heads():
    with pytest.raises(ValueError, match="heads"):
        run("sd3", grt.Guidance(grt.PAG(layers="1", beta=0.5, heads=(9,))))


# ------------------------------------------------------------------------------------- SEG


def _reflect(i, n):
    if i < 0:
        return -i
    if i >= n:
        return 2 * (n - 1) - i
    return i


def brute_force_blur(image, sigma):
    """image (h, w, C) float64: sum over the (clamped) Gaussian window, reflect indexing."""
    h, w, _ = image.shape

    def taps(extent):
        k = math.ceil(6 * sigma)
        k = k + 1 - k % 2
        k = min(k, extent + 1 if extent % 2 == 0 else extent)
        r = (k - 1) // 2
        vals = [math.exp(-0.5 * ((a - r) / sigma) ** 2) for a in range(k)]
        return r, [v / sum(vals) for v in vals]

    rh, th = taps(h)
    rw, tw = taps(w)
    out = torch.zeros_like(image)
    for i in range(h):
        for j in range(w):
            acc = torch.zeros(image.shape[-1], dtype=torch.float64)
            for a, ga in enumerate(th):
                for b, gb in enumerate(tw):
                    acc += ga * gb * image[_reflect(i + a - rh, h), _reflect(j + b - rw, w)]
            out[i, j] = acc
    return out


@pytest.mark.parametrize("h,w,sigma", [(5, 8, 0.7), (4, 6, 1.0), (6, 4, 3.0), (3, 7, 0.3),
                                       (2, 5, 1.2)])
def test_seg_blur_matches_brute_force(h, w, sigma):
    x = torch.randn(2, h * w, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(h))
    got = ref.blur_grid(x, h, w, sigma)
    for n in range(2):
        expected = brute_force_blur(x[n].reshape(h, w, 3), sigma).reshape(h * w, 3)
        torch.testing.assert_close(got[n], expected, rtol=1e-12, atol=1e-12)


def test_seg_kernel_size():
    assert ref.seg_kernel_size(1.0, 100) == 7
    assert ref.seg_kernel_size(0.5, 100) == 3
    assert ref.seg_kernel_size(1.1, 100) == 7     # ceil(6.6) = 7 is odd: 7 + 1 - 1
    assert ref.seg_kernel_size(3.0, 6) == 7       # clamp even extent: w + 1
    assert ref.seg_kernel_size(3.0, 5) == 5       # clamp odd extent: w
    assert ref.seg_kernel_size(5000.0, 4) == 5


@pytest.mark.parametrize("family,layer", [("unet", "d1"), ("sd35", "2"), ("flux", "1"),
                                          ("flux", "s1")])
@pytest.mark.parametrize("sigma", [1.3, math.inf])
def test_seg_blurs_the_query_on_the_real_grid(family, layer, sigma):
    """The query right after to_q is blurred (or averaged) on the non-square token grid; in FLUX
    single blocks only the image part (after the text tokens)."""
    model = get(family)
    sample, t, cond, _ = make_inputs(family)
    from guidance_rt.families import resolve_layers

    block = model.get_submodule(resolve_layers(model, layer)[0].path)
    to_q = (block.attn1 if family == "unet" else block.attn).to_q
    seen = []
    with ref.perturbed(model, grt.SEG(layers=layer, sigma=sigma), sample=sample, kwargs=cond):
        handle = to_q.register_forward_hook(lambda m, a, o: seen.append((a[0], o)))
        try:
            forward(model, sample, t, cond)
        finally:
            handle.remove()
    assert len(seen) == 1
    x, q = seen[0]
    with torch.no_grad():
        raw = to_q(x).double()
    n_img = 24                                   # 4 x 6 in every family here
    text = raw.shape[1] - n_img
    assert text == (N_TEXT if layer.startswith("s") else 0)
    torch.testing.assert_close(q[:, :text].double(), raw[:, :text], rtol=0, atol=0)
    img = raw[:, text:]
    for n in range(B):
        if math.isinf(sigma):
            expected = img[n].mean(0, keepdim=True).expand_as(img[n])
        else:
            expected = brute_force_blur(img[n].reshape(4, 6, -1), sigma).reshape(n_img, -1)
        assert_close(q[n, text:], expected, effect=expected - img[n])


@pytest.mark.parametrize("family", ["unet", "sd3"])
def test_seg_huge_finite_sigma_is_not_the_mean(family):
    layers = LAYERS[family]
    inf = branches(family, grt.Guidance(grt.SEG(layers=layers)), uncond=None)[1].prediction
    big = branches(family, grt.Guidance(grt.SEG(layers=layers, sigma=5000.0)),
                   uncond=None)[1].prediction
    above = branches(family, grt.Guidance(grt.SEG(layers=layers, sigma=10000.0)),
                     uncond=None)[1].prediction
    assert (inf - big).abs().max() > 1e-3
    torch.testing.assert_close(above, inf, rtol=0, atol=0)   # sigma > 9999 is infinite


# ------------------------------------------------------------------------------------- TPG


def test_tpg_reproducible_and_seed_dependent():
    g = grt.Guidance(grt.CFG(), grt.TPG(layers=["d0", "d1", "u2"]))
    a = run("unet", g, gen_seed=11)
    b = run("unet", g, gen_seed=11)
    c = run("unet", g, gen_seed=12)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3
    # without a generator: the global RNG
    torch.manual_seed(4)
    d = run("unet", g, generator=None)
    torch.manual_seed(4)
    e = run("unet", g, generator=None)
    torch.testing.assert_close(d, e, rtol=0, atol=0)


def _manual_tpg(model, family, sample, t, cond, seed, layers):
    """TPG written out independently with plain hooks (the protocol, to the letter)."""
    from guidance_rt.families import resolve_layers

    handles, stash = [], {}
    for layer in resolve_layers(model, layers):
        block = model.get_submodule(layer.path)

        def pre(module, args, kwargs, layer=layer):
            x = args[0] if args else kwargs["hidden_states"]
            perm = torch.randperm(x.shape[1], generator=torch.Generator("cpu").manual_seed(
                seed + layer.position))
            stash[layer.position] = (x, x[:, perm])
            if args:
                return (x[:, perm],) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x[:, perm]}

        def post(module, args, kwargs, output, layer=layer):
            x, px = stash[layer.position]
            txt, img = output
            return txt, x + (img - px)

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        if family != "unet":
            handles.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        return forward(model, sample, t, cond)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family,layers", [("unet", ["d0", "d1", "m1"]), ("sd3", ["1", "3"]),
                                           ("flux", ["0", "s1"])])
def test_tpg_follows_the_draw_protocol(family, layers):
    model = get(family)
    sample, t, cond, _ = make_inputs(family)
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(21)))
    expected = _manual_tpg(model, family, sample, t, cond, seed, layers)
    bs = branches(family, grt.Guidance(grt.TPG(layers=layers)), gen_seed=21, uncond=None)
    assert_close(bs[1].prediction, expected, ulps=MODEL_ULPS, effect=expected - bs[0].prediction)


def test_tpg_seeds_drawn_in_guidance_order():
    t1, t2 = grt.TPG(layers="d0"), grt.TPG(layers="m0", scale=2.0)
    both = branches("unet", grt.Guidance(grt.CFG(), t1, t2), gen_seed=8)
    gen = torch.Generator().manual_seed(8)
    torch.randint(0, 2**62, (1,), generator=gen)     # the first term's draw
    second = branches("unet", grt.Guidance(grt.CFG(), t2), generator=gen)
    torch.testing.assert_close(both[3].prediction, second[2].prediction, rtol=0, atol=0)
    # an inactive TPG term draws nothing
    gen_a = torch.Generator().manual_seed(8)
    lone = branches("unet", grt.Guidance(grt.TPG(layers="d0", scale=0.0), t2), generator=gen_a)
    gen_b = torch.Generator().manual_seed(8)
    ref_ = branches("unet", grt.Guidance(t2), generator=gen_b)
    torch.testing.assert_close(lone[1].prediction, ref_[1].prediction, rtol=0, atol=0)


# ------------------------------------------------------------------------------------- SLG


@pytest.mark.parametrize("family", ["sd3", "sd35"])
def test_slg_block_equals_diffusers_skip_layers(family):
    model = get(family)
    sample, t, cond, _ = make_inputs(family)
    bs = branches(family, grt.Guidance(grt.SLG(layers=[1, 3], start=0.0)), uncond=None)
    expected = forward(model, sample, t, {**cond, "skip_layers": [1, 3]})
    assert_close(bs[1].prediction, expected, ulps=MODEL_ULPS, effect=expected - bs[0].prediction)


def test_slg_block_unet_and_flux_bypass():
    """Bypassed block: its input goes straight to the next one (checked with forward hooks)."""
    for family, name, path in [("unet", "m0", "mid_block.attentions.0.transformer_blocks.0"),
                               ("flux", "s0", "single_transformer_blocks.0")]:
        model = get(family)
        sample, t, cond, _ = make_inputs(family)
        seen = {}
        block = model.get_submodule(path)
        with ref.perturbed(model, grt.SLG(layers=name, start=0.0), sample=sample, kwargs=cond):
            h = block.register_forward_hook(
                lambda m, a, k, o: seen.update(inp=(a, k), out=o), with_kwargs=True)
            try:
                forward(model, sample, t, cond)
            finally:
                h.remove()
        args, kwargs = seen["inp"]
        x = args[0] if args else kwargs["hidden_states"]
        if family == "unet":
            assert seen["out"] is x
        else:
            assert seen["out"][0] is kwargs["encoder_hidden_states"] and seen["out"][1] is x


@pytest.mark.parametrize("family,layer", [("unet", "d1"), ("unet", "m1"), ("sd3", "1"),
                                          ("sd35", "1"), ("flux", "1"), ("flux", "s0")])
def test_slg_attn_plus_ff_equals_block_skip(family, layer):
    """A block is its input plus its attention and feed-forward updates (both streams): with
    "attn" and "ff" skipped together it must be the identity, i.e. equal the "block" skip. (FLUX
    single blocks add gate * proj_out(0): equal once proj_out has no bias.)"""
    model = get(family)
    sample, t, cond, _ = make_inputs(family)
    bias = None
    if layer.startswith("s"):
        bias = model.get_submodule("single_transformer_blocks." + layer[1:]).proj_out.bias
        saved = bias.detach().clone()
    try:
        if bias is not None:
            with torch.no_grad():
                bias.zero_()
        with ref.perturbed(model, grt.SLG(layers=layer, skip="attn", start=0.0), sample=sample,
                           kwargs=cond):
            with ref.perturbed(model, grt.SLG(layers=layer, skip="ff", start=0.0),
                               sample=sample, kwargs=cond):
                both = forward(model, sample, t, cond)
        with ref.perturbed(model, grt.SLG(layers=layer, start=0.0), sample=sample, kwargs=cond):
            skipped = forward(model, sample, t, cond)
        plain = forward(model, sample, t, cond)
    finally:
        if bias is not None:
            with torch.no_grad():
                bias.copy_(saved)
    assert_close(both, skipped, ulps=MODEL_ULPS, effect=skipped - plain)
    assert (both - plain).abs().max() > 1e-2


# ------------------------------------------------------------------------ model left untouched


@pytest.mark.parametrize("family", FAMILIES)
def test_model_restored_after_error_mid_forward(family):
    model = get(family)
    last = model.conv_out if family == "unet" else model.proj_out
    calls = []

    def boom(module, args, output):
        calls.append(1)
        if len(calls) == 3:                   # uncond, cond, then the first perturbed branch
            raise RuntimeError("boom")

    guidance = grt.Guidance(grt.CFG(), *term_cases(family))
    clean = run(family, guidance)
    handle = last.register_forward_hook(boom)
    try:
        before = snapshot(model)
        with pytest.raises(RuntimeError, match="boom"):
            run(family, guidance)
        assert_same_state(before, snapshot(model))
    finally:
        handle.remove()
    torch.testing.assert_close(run(family, guidance), clean, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_perturbation_installs_then_removes_everything(family):
    model = get(family)
    sample, t, cond, _ = make_inputs(family)
    before = snapshot(model)
    for term in term_cases(family):
        with ref.perturbed(model, term, sample=sample, kwargs=cond, tpg_seed=1):
            assert snapshot(model) != before, f"{term} installed nothing"
        assert_same_state(before, snapshot(model))
    with pytest.raises(KeyError):
        with ref.perturbed(model, term_cases(family)[0], sample=sample, kwargs=cond):
            raise KeyError("inside")
    assert_same_state(before, snapshot(model))
