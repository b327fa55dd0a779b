"""S-CFG in the sequential reference oracle (shared/methods.md section 7), tiny models, CPU.

Each piece is checked against a small independent computation: the Gaussian taps and a
loop-written reflect-padded smoothing, the completion forms (matrix powers), argmax ties, the
rate formula on a hand-made two-region example, the clamps; the recorded maps against diffusers'
own ``Attention.get_attention_scores`` (the published code's path); end to end, clamp=(1, 1)
reduces S-CFG to CFG, and ``step`` equals u + w rate (c - u) (+ the perturbation terms).
"""
from __future__ import annotations

import math

import pytest
import torch

import guidance_rt as grt
from guidance_rt import presets
from guidance_rt import reference as ref
from guidance_rt.families import enumerate_layers
from guidance_rt.reference import scfg as S

from .conftest import model_state, rel
from .tolerance import assert_close

pytest.importorskip("diffusers")

E = math.exp(-1.0)
TAP_EDGE, TAP_MID = E / (1 + 2 * E), 1 / (1 + 2 * E)       # about 0.2119, 0.5761


def _inputs(name, batch=2, **kw):
    return presets.example_inputs(name, batch=batch, seed=3, **kw)


def _step(model, guidance, inp, step=0, num_steps=10, **kw):
    return ref.step(model, guidance, inp["sample"], inp["timestep"], cond=inp["cond"],
                    uncond=inp["uncond"], step=step, num_steps=num_steps,
                    generator=torch.Generator().manual_seed(0), **kw)


# ------------------------------------------------------------------------------ the pieces


def test_gaussian_kernel_taps():
    kernel = S.smoothing_kernel()
    taps = torch.tensor([TAP_EDGE, TAP_MID, TAP_EDGE], dtype=torch.float64)
    torch.testing.assert_close(kernel, torch.outer(taps, taps), rtol=0, atol=1e-15)
    assert abs(TAP_EDGE - 0.2119) < 1e-4 and abs(TAP_MID - 0.5761) < 1e-4


def test_smoothing_is_reflect_padded_3x3():
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    taps = [TAP_EDGE, TAP_MID, TAP_EDGE]

    def refl(i, n):
        return 1 if i == -1 else (n - 2 if i == n else i)

    expected = torch.zeros_like(x)
    for i in range(3):
        for j in range(4):
            for a in range(3):
                for b in range(3):
                    expected[..., i, j] += taps[a] * taps[b] * x[..., refl(i + a - 1, 3),
                                                                  refl(j + b - 1, 4)]
    torch.testing.assert_close(S.smooth(x), expected, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="too small"):
        S.smooth(torch.ones(1, 1, 1, 4, dtype=torch.float64))


def test_completion_code_and_paper():
    eye = torch.eye(5, dtype=torch.float64)[None]
    for form in ("code", "paper"):
        torch.testing.assert_close(S.complete(eye, form), eye)
    swap = torch.eye(4, dtype=torch.float64)[[1, 0, 3, 2]][None]        # P @ P = I
    torch.testing.assert_close(S.complete(swap, "code"), (swap + 3 * eye[:, :4, :4]) / 4)
    torch.testing.assert_close(S.complete(swap, "paper"), (swap + eye[:, :4, :4]) / 2)
    a = torch.softmax(torch.randn(2, 6, 6, dtype=torch.float64,
                                  generator=torch.Generator().manual_seed(1)) * 3, dim=-1)
    powers = [torch.linalg.matrix_power(a, k) for k in (1, 2, 3, 4)]
    torch.testing.assert_close(S.complete(a, "paper"), sum(powers) / 4)
    torch.testing.assert_close(S.complete(a, "code"), (powers[0] + 3 * powers[1]) / 4)
    assert (S.complete(a, "code") - S.complete(a, "paper")).abs().max() > 1e-3
    with pytest.raises(ValueError):
        S.complete(a, "nope")


def test_argmax_ties_set_every_maximal_token():
    maps = torch.tensor([[[[1.0, 3.0]], [[2.0, 1.0]], [[2.0, 0.0]]]], dtype=torch.float64)  # T=3
    region = S.region_masks(maps)
    assert region[0, :, 0, 0].tolist() == [0.0, 1.0, 1.0]      # tie between tokens 1 and 2
    assert region[0, :, 0, 1].tolist() == [1.0, 0.0, 0.0]
    fore = torch.tensor([[[[2.0, 1.0, 1.0]], [[1.0, 2.0, 1.0]]]], dtype=torch.float64)
    # start token maximal -> background, including the tie in the last pixel
    assert S.foreground_mask(fore)[0, 0, 0].tolist() == [0.0, 1.0, 0.0]


def _two_regions(norm_left=1.0, norm_right=3.0):
    """B=1, 2 channels, 4x4 latent: |c - u| is norm_left on the left half, norm_right on the
    right half; region 1 = left, region 2 = right, token 0 empty; everything foreground."""
    u = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    c = torch.zeros_like(u)
    c[:, 0, :, :2] = norm_left * 0.6
    c[:, 1, :, :2] = norm_left * 0.8
    c[:, 0, :, 2:] = norm_right
    region = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    region[:, 1, :, :2] = 1
    region[:, 2, :, 2:] = 1
    return u, c, region, torch.ones(1, 1, 4, 4, dtype=torch.float64)


def _smooth_columns(cols):
    """The 3x3 smoothing of a map constant along rows, by hand: 1-D taps over the columns."""
    p = [cols[1]] + list(cols) + [cols[-2]]
    return [TAP_EDGE * p[j] + TAP_MID * p[j + 1] + TAP_EDGE * p[j + 2] for j in range(len(cols))]


def test_rate_formula_two_regions():
    u, c, region, fore = _two_regions()
    rate, token_rates, raw = S.rate_map(u, c, region, fore, scale=7.5, clamp=(0.8, 3.0),
                                        max_product=15.0)
    fore_norm = 2.0 * 16 / (16 + 1e-8)                  # mean of |d| over the foreground
    left, right = 1.0 * 8 / (8 + 1e-8), 3.0 * 8 / (8 + 1e-8)
    expected = [0.0, fore_norm / (left + 1e-8), fore_norm / (right + 1e-8)]
    torch.testing.assert_close(token_rates[0], torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-14, atol=0)
    assert raw[0, 0, 0].tolist() == pytest.approx([expected[1]] * 2 + [expected[2]] * 2, rel=1e-14)
    # clamp: left ~2.0 stays (cap 15 / 7.5 = 2), right 0.667 -> 0.8; then smoothed
    cols = [min(expected[1], 2.0)] * 2 + [0.8] * 2
    want = torch.tensor(_smooth_columns(cols), dtype=torch.float64).expand(4, 4)
    torch.testing.assert_close(rate[0, 0], want, rtol=1e-14, atol=0)


def test_rate_clamps_and_max_product():
    u, c, region, fore = _two_regions(1.0, 3.0)
    args = dict(clamp=(0.8, 3.0), max_product=15.0)
    # w = 10: cap 1.5 on the left
    rate, _, _ = S.rate_map(u, c, region, fore, scale=10.0, **args)
    torch.testing.assert_close(rate[0, 0, 0], torch.tensor(_smooth_columns([1.5, 1.5, 0.8, 0.8]),
                                                           dtype=torch.float64))
    # w = 30: cap 0.5 < clamp low: 0.5 everywhere
    rate, _, _ = S.rate_map(u, c, region, fore, scale=30.0, **args)
    torch.testing.assert_close(rate, torch.full_like(rate, 0.5))
    # a big ratio is clamped to the high end: left |d| 0.1 -> rate_1 = 15.5 -> 3 (w = 2: cap 7.5)
    u, c, region, fore = _two_regions(0.1, 3.0)
    rate, token_rates, _ = S.rate_map(u, c, region, fore, scale=2.0, **args)
    assert token_rates[0, 1] > 3
    torch.testing.assert_close(rate[0, 0, 0], torch.tensor(_smooth_columns([3.0, 3.0, 0.8, 0.8]),
                                                           dtype=torch.float64))


def test_level_grid():
    assert S.level_grid((64, 64), 4) == (16, 16) and S.level_grid((64, 64), 8) == (8, 8)
    assert S.level_grid((128, 96), 8) == (16, 12)
    assert S.level_grid((20, 20), 4) == (5, 5) and S.level_grid((20, 20), 8) is None


# ------------------------------------------------------------------------------ recording


def test_recorded_maps_match_diffusers_attention_scores(tiny_model):
    """The published code's path: Attention.get_attention_scores on head_to_batch_dim q / k,
    averaged over heads; here in float64 on the attention modules' captured inputs."""
    model = tiny_model("tiny-sd15")
    inp = _inputs("tiny-sd15")
    path = "up_blocks.1.attentions.1.transformer_blocks.0"
    block = model.get_submodule(path)
    seen = {}

    def capture(name):
        def hook(module, args, kwargs):
            seen[name] = (args[0] if args else kwargs["hidden_states"],
                          kwargs.get("encoder_hidden_states"))
        return hook

    handles = [block.attn1.register_forward_pre_hook(capture("attn1"), with_kwargs=True),
               block.attn2.register_forward_pre_hook(capture("attn2"), with_kwargs=True)]
    try:
        with torch.no_grad(), S.scfg_recorded(model, grt.SCFG(), inp["sample"]) as rec:
            model(inp["sample"], timestep=inp["timestep"], **inp["cond"], return_dict=False)
    finally:
        for h in handles:
            h.remove()
    layer = {l.path: l for l in rec.layers}[path]

    def published(attn, hidden, context):
        context = hidden if context is None else context
        q = attn.head_to_batch_dim(attn.to_q(hidden).double())
        k = attn.head_to_batch_dim(attn.to_k(context).double())
        probs = attn.get_attention_scores(q, k, None)
        return probs.view(hidden.shape[0], attn.heads, *probs.shape[1:]).mean(dim=1)

    with torch.no_grad():
        torch.testing.assert_close(layer.self_probs, published(block.attn1, *seen["attn1"]),
                                   rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(layer.cross_probs, published(block.attn2, *seen["attn2"]),
                                   rtol=1e-12, atol=1e-14)
    assert layer.self_probs.shape == (2, 16, 16) and layer.cross_probs.shape == (2, 16, 77)
    assert layer.r == 4 and layer.grid == (4, 4)


def test_recording_does_not_change_the_forward(tiny_model):
    model = tiny_model("tiny-sd15")
    inp = _inputs("tiny-sd15")
    before = model_state(model)
    with torch.no_grad():
        plain = model(inp["sample"], timestep=inp["timestep"], **inp["cond"], return_dict=False)[0]
        with S.scfg_recorded(model, grt.SCFG(), inp["sample"]) as rec:
            recorded = model(inp["sample"], timestep=inp["timestep"], **inp["cond"],
                             return_dict=False)[0]
    assert torch.equal(plain, recorded)
    assert rec.layers and model_state(model) == before


def test_sd15_levels(tiny_model):
    """tiny-sd15 on a 16x16 latent: latent/4 = 4x4 (down_blocks.2, up_blocks.1), latent/8 = 2x2
    (the mid block), as SD1.5 at 512 px (16x16 and 8x8)."""
    model = tiny_model("tiny-sd15")
    inp = _inputs("tiny-sd15")
    out = ref.scfg_rate(model, grt.SCFG(), inp["sample"], inp["timestep"], cond=inp["cond"],
                        uncond=inp["uncond"])
    by_level = {}
    for path, r in out.layers:
        by_level.setdefault(r, []).append(path)
    assert by_level[8] == ["mid_block.attentions.0.transformer_blocks.0"]
    assert [p.split(".attentions")[0] for p in by_level[4]] == ["down_blocks.2"] * 2 + ["up_blocks.1"] * 3
    assert out.rate.shape == (2, 1, 16, 16) and out.region.shape == (2, 77, 16, 16)
    assert out.region_grid.shape == (2, 77, 4, 4) and out.foreground_grid.shape == (2, 1, 4, 4)
    assert (out.region.sum(dim=1) >= 1).all()                         # every pixel has a region
    assert set(out.foreground.unique().tolist()) <= {0.0, 1.0}
    # nearest upsampling by R = 4 of the level-R masks
    torch.testing.assert_close(out.region, out.region_grid.repeat_interleave(4, 2).repeat_interleave(4, 3))
    assert 0.8 - 1e-12 <= out.rate.min() and out.rate.max() <= 2.0 + 1e-12      # 15 / 7.5
    assert out.rate.std() > 1e-3                                    # not flat: a real test


def test_sdxl_uses_only_the_existing_level(tiny_model):
    model = tiny_model("tiny-sdxl")
    inp = _inputs("tiny-sdxl")
    before = model_state(model)
    out = ref.scfg_rate(model, grt.SCFG(), inp["sample"], inp["timestep"], cond=inp["cond"],
                        uncond=inp["uncond"])
    at_4x4 = [l.path for l in enumerate_layers(model)
              if l.path.startswith(("down_blocks.2.", "mid_block.", "up_blocks.0."))]
    assert [p for p, _ in out.layers] == at_4x4 and len(at_4x4) == 60
    assert {r for _, r in out.layers} == {4}
    assert torch.isfinite(out.rate).all() and out.rate.shape == (2, 1, 16, 16)
    eps = _step(model, grt.Guidance(grt.SCFG()), inp)
    cfg = _step(model, grt.Guidance(grt.CFG(7.5)), inp)
    assert torch.isfinite(eps).all() and rel(eps, cfg) > 1e-3
    assert model_state(model) == before


def test_non_square_latent(tiny_model):
    model = tiny_model("tiny-sd15")
    inp = _inputs("tiny-sd15", height=16, width=24)
    out = ref.scfg_rate(model, grt.SCFG(), inp["sample"], inp["timestep"], cond=inp["cond"],
                        uncond=inp["uncond"])
    assert {r for _, r in out.layers} == {4, 8}
    assert out.region_grid.shape[-2:] == (4, 6) and out.rate.shape == (2, 1, 16, 24)
    with torch.no_grad(), S.scfg_recorded(model, grt.SCFG(), inp["sample"]) as rec:
        model(inp["sample"], timestep=inp["timestep"], **inp["cond"], return_dict=False)
    assert {(l.r, l.grid) for l in rec.layers} == {(4, (4, 6)), (8, (2, 3))}
    # a latent that is not a multiple of 8: the UNet's grids are 20, 10, 5, 3; 3x3 is not
    # latent/8 (3 * 8 != 20), so only latent/4 = 5x5 is used
    inp = _inputs("tiny-sd15", height=20, width=20)
    out = ref.scfg_rate(model, grt.SCFG(), inp["sample"], inp["timestep"], cond=inp["cond"],
                        uncond=inp["uncond"])
    assert {r for _, r in out.layers} == {4} and len(out.layers) == 5
    assert out.region_grid.shape[-2:] == (5, 5) and out.rate.shape == (2, 1, 20, 20)


def test_missing_levels_raise(tiny_model):
    model = tiny_model("tiny-sd15")
    inp = _inputs("tiny-sd15")
    before = model_state(model)
    with pytest.raises(ValueError, match=r"16x16 latent with R=16"):
        _step(model, grt.Guidance(grt.SCFG(R=16)), inp)
    assert model_state(model) == before


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_dit_models_are_refused(tiny_model, name):
    model = tiny_model(name)
    inp = _inputs(name)
    before = model_state(model)
    for guidance in (grt.Guidance(grt.SCFG()), grt.Guidance(grt.SCFG(start=0.5))):
        with pytest.raises(NotImplementedError, match="UNet-only"):
            _step(model, guidance, inp)
    with pytest.raises(ValueError, match="UNet-only"):
        ref.scfg_rate(model, grt.SCFG(), inp["sample"], inp["timestep"], cond=inp["cond"],
                      uncond=inp["uncond"])
    assert model_state(model) == before


# ------------------------------------------------------------------------------ end to end


def test_flat_rate_is_cfg(tiny_model):
    """clamp=(1, 1): rate 1 everywhere, so S-CFG is CFG (also with rescale)."""
    model = tiny_model("tiny-sd15")
    inp = _inputs("tiny-sd15")
    out = ref.scfg_rate(model, grt.SCFG(clamp=(1.0, 1.0)), inp["sample"], inp["timestep"],
                        cond=inp["cond"], uncond=inp["uncond"])
    assert (out.rate - 1).abs().max() < 1e-15
    for rescale in (0.0, 0.7):
        flat = _step(model, grt.Guidance(grt.SCFG(7.5, clamp=(1.0, 1.0), rescale=rescale)), inp)
        cfg = _step(model, grt.Guidance(grt.CFG(7.5, rescale=rescale)), inp)
        assert_close(flat, cfg)   # float32 rounding only
        assert rel(_step(model, grt.Guidance(grt.SCFG(7.5, rescale=rescale)), inp), cfg) > 1e-3


def test_step_is_u_plus_w_rate_d_plus_perturbations(tiny_model):
    model = tiny_model("tiny-sd15")
    inp = _inputs("tiny-sd15")
    term = grt.SCFG(6.0, completion="paper")
    guidance = grt.Guidance(term, grt.PAG(2.0, layers="mid"))
    branches = ref.branch_predictions(model, guidance, inp["sample"], inp["timestep"],
                                      cond=inp["cond"], uncond=inp["uncond"], step=0, num_steps=10)
    u, c, p = (b.prediction.double() for b in branches)
    rate = ref.scfg_rate(model, term, inp["sample"], inp["timestep"], cond=inp["cond"],
                         uncond=inp["uncond"]).rate
    expected = (u + 6.0 * rate * (c - u) + 2.0 * (c - p)).float()
    assert_close(_step(model, guidance, inp), expected, effect=expected - c.float())
    code = ref.scfg_rate(model, grt.SCFG(6.0), inp["sample"], inp["timestep"], cond=inp["cond"],
                         uncond=inp["uncond"]).rate
    assert (code - rate).abs().max() > 1e-6               # the completion form matters


def test_identical_predictions_give_the_low_clamp(tiny_model):
    """c == u: |d| = 0 everywhere, every rate_k = 0, the rate is the low clamp."""
    model = tiny_model("tiny-sd15")
    inp = _inputs("tiny-sd15")
    out = ref.scfg_rate(model, grt.SCFG(), inp["sample"], inp["timestep"], cond=inp["cond"],
                        uncond=inp["cond"])
    assert (out.token_rates == 0).all()
    torch.testing.assert_close(out.rate, torch.full_like(out.rate, 0.8))


def test_outside_the_window_is_cfg_off(tiny_model):
    model = tiny_model("tiny-sd15")
    inp = _inputs("tiny-sd15")
    off = _step(model, grt.Guidance(grt.SCFG(start=0.5)), inp, step=2, num_steps=10)
    cond = model(inp["sample"], timestep=inp["timestep"], **inp["cond"], return_dict=False)[0]
    assert torch.equal(off, cond.detach())


def test_with_nag(tiny_model):
    """S-CFG records the cond forward's positive maps under NAG's processors (hooks compose)."""
    model = tiny_model("tiny-sd15")
    inp = _inputs("tiny-sd15")
    before = model_state(model)
    both = _step(model, grt.Guidance(grt.SCFG(), grt.NAG(3.0)), inp, negative=inp["negative"])
    alone = _step(model, grt.Guidance(grt.SCFG()), inp)
    assert torch.isfinite(both).all() and rel(both, alone) > 1e-4
    assert model_state(model) == before


def test_model_unchanged_after_an_exception(tiny_model):
    model = tiny_model("tiny-sd15")
    inp = _inputs("tiny-sd15")
    before = model_state(model)
    bad = dict(inp["cond"], encoder_hidden_states=inp["cond"]["encoder_hidden_states"][..., :5])
    with pytest.raises(RuntimeError):                      # the cond forward fails mid-way
        ref.step(model, grt.Guidance(grt.SCFG()), inp["sample"], inp["timestep"], cond=bad,
                 uncond=inp["uncond"], step=0, num_steps=10)
    assert model_state(model) == before
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
