"""NAG in the sequential reference oracle (shared/methods.md section 5), on tiny random models, CPU.

Checked against independent sources: float64 hand computations of the formula on one captured
attention layer, the stock attention processors run separately on the positive and the negative
sequence, and behavioural properties (off / alpha 0 / negative == positive equal plain, norm and
tau matter, the uncond branch stays plain, the model is left untouched).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import guidance_rt as grt
from guidance_rt.families import FAMILIES
from guidance_rt import reference as ref

diffusers = pytest.importorskip("diffusers")

from .test_reference import (B, FLUX_GRID, LAYERS, N_TEXT, assert_same_state,  # noqa: E402
                             flux_img_ids, forward, get, make_inputs, snapshot)
from .tolerance import MODEL_ULPS, assert_close  # noqa: E402

NAG_FAMILIES = ["unet", "sd3", "sd35", "flux"]


def inputs(family):
    """sample, t, cond, uncond and a NAG negative (distinct text per row)."""
    sample, t, cond, uncond = make_inputs(family)
    _, _, negative, _ = make_inputs(family, seed=7)
    return sample, t, cond, uncond, negative


def nag_branches(family, guidance, **over):
    model = get(family)
    sample, t, cond, uncond, negative = inputs(family)
    args = dict(cond=cond, uncond=uncond, negative=negative, step=0, num_steps=10,
                generator=torch.Generator().manual_seed(0))
    args.update(over)
    return ref.branch_predictions(model, guidance, sample, t, **args)


def nag_run(family, guidance, **over):
    model = get(family)
    sample, t, cond, uncond, negative = inputs(family)
    args = dict(cond=cond, uncond=uncond, negative=negative, step=0, num_steps=10,
                generator=torch.Generator().manual_seed(0))
    args.update(over)
    return ref.step(model, guidance, sample, t, **args)


def cond_only(family, nag, **over):
    """The cond prediction with NAG (CFG off: the step is the cond branch alone)."""
    return nag_run(family, grt.Guidance(nag), uncond=None, **over)


def formula64(zp, zn, phi, tau, alpha, p):
    """methods.md section 5 in float64, with the zero-norm guard (factor 1)."""
    zp, zn = zp.double(), zn.double()
    zt = phi * zp - (phi - 1) * zn
    r = zt.norm(p=p, dim=-1, keepdim=True) / zp.norm(p=p, dim=-1, keepdim=True)
    factor = torch.where(torch.isfinite(r) & (r > 0), torch.clamp(r, max=tau) / r,
                         torch.ones_like(r))
    return alpha * zt * factor + (1 - alpha) * zp, r


# ------------------------------------------------------------------------ on / off, settings


@pytest.mark.parametrize("family", NAG_FAMILIES)
def test_nag_changes_output_and_off_equals_off(family):
    model = get(family)
    sample, t, cond, uncond, negative = inputs(family)
    base = nag_run(family, grt.Guidance(grt.CFG(scale=5.0)), negative=None)

    out = nag_run(family, grt.Guidance(grt.CFG(scale=5.0), grt.NAG()))
    change = (out - base).abs().max().item()
    assert change > 1e-2 * base.abs().max().item(), f"NAG barely changes the output ({change})"

    # NAG adds no branch; the uncond branch stays plain, the cond branch is guided
    bs = nag_branches(family, grt.Guidance(grt.CFG(scale=5.0), grt.NAG()))
    assert [b.kind for b in bs] == ["uncond", "cond"]
    torch.testing.assert_close(bs[0].prediction, forward(model, sample, t, uncond), rtol=0, atol=0)
    assert (bs[1].prediction - forward(model, sample, t, cond)).abs().max() > 1e-2

    # phi = 1 and outside the window: off, no negative needed, exactly CFG alone
    for off in (grt.NAG(scale=1.0), grt.NAG(start=0.5, stop=1.0)):
        got = nag_run(family, grt.Guidance(grt.CFG(scale=5.0), off), negative=None)
        torch.testing.assert_close(got, base, rtol=0, atol=0)

    # alpha = 0 keeps Zp; a negative equal to the positive prompt gives Zt = Zp: both are off
    plain_cond = forward(model, sample, t, cond)
    zero = nag_branches(family, grt.Guidance(grt.CFG(scale=5.0), grt.NAG(alpha=0.0)))
    assert_close(zero[1].prediction, plain_cond, ulps=MODEL_ULPS)
    same = nag_branches(family, grt.Guidance(grt.CFG(scale=5.0), grt.NAG()), negative=cond)
    assert_close(same[1].prediction, plain_cond, ulps=MODEL_ULPS)


@pytest.mark.parametrize("family", ["unet", "sd3", "flux"])
def test_nag_norm_and_tau_matter(family):
    # the norm only enters through the clip: a tau that clips here (tiny FLUX has r near 1)
    l1 = cond_only(family, grt.NAG(scale=4.0, norm=1, tau=1.1))
    l2 = cond_only(family, grt.NAG(scale=4.0, norm=2, tau=1.1))
    assert (l1 - l2).abs().max() > 1e-3
    clipped = cond_only(family, grt.NAG(scale=4.0, tau=1.0))
    free = cond_only(family, grt.NAG(scale=4.0, tau=1e9))
    assert (clipped - free).abs().max() > 1e-3
    # alpha = None is the family default
    fam = "sd3" if family == "sd35" else family
    default = cond_only(family, grt.NAG(scale=4.0))
    explicit = cond_only(family, grt.NAG(scale=4.0, alpha=FAMILIES[fam].nag_alpha))
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)


def test_nag_missing_negative_raises():
    for family in ("unet", "flux"):
        with pytest.raises(ValueError, match="NAG.*negative"):
            nag_run(family, grt.Guidance(grt.CFG(), grt.NAG()), negative=None)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        nag_run("sd3", grt.Guidance(grt.NAG()), uncond=None, negative={})


# --------------------------------------------------------------- one layer, by hand (float64)


@pytest.mark.parametrize("tau,norm", [(1e9, 1), (1e9, 2), (5.0, 1), (5.0, 2)])
def test_nag_unet_attn2_matches_float64_formula(tau, norm):
    """Capture a UNet attn2's inputs and output during a NAG forward and recompute the layer in
    float64: q, K/V of the positive and of the negative text, per-head softmax, the formula over
    all heads' channels per token, to_out. tau = 1e9: the unclipped formula; tau = 5: clipped on
    some tokens only (r is 4..7 there)."""
    model = get("unet")
    sample, t, cond, _, negative = inputs("unet")
    attn = model.mid_block.attentions[0].transformer_blocks[1].attn2
    phi, alpha = 4.0, 0.6
    seen = []
    handle = attn.register_forward_hook(
        lambda m, a, k, o: seen.append((a[0] if a else k["hidden_states"],
                                        k["encoder_hidden_states"], o)), with_kwargs=True)
    try:
        ref.step(model, grt.Guidance(grt.NAG(scale=phi, tau=tau, alpha=alpha, norm=norm)),
                 sample, t, cond=cond, negative=negative, step=0, num_steps=10)
    finally:
        handle.remove()
    assert len(seen) == 1
    x, text, out = seen[0]
    torch.testing.assert_close(text, cond["encoder_hidden_states"], rtol=0, atol=0)

    def lin(layer, v):
        w = layer.weight.detach().double()
        y = v.double() @ w.T
        return y if layer.bias is None else y + layer.bias.detach().double()

    heads = attn.heads

    def attend(q, k, v):
        split = lambda z: z.view(z.shape[0], z.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        o = probs @ v
        return o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)

    q = lin(attn.to_q, x)
    neg = negative["encoder_hidden_states"]
    zp = attend(q, lin(attn.to_k, text), lin(attn.to_v, text))
    zn = attend(q, lin(attn.to_k, neg), lin(attn.to_v, neg))
    zt = phi * zp - (phi - 1) * zn
    r = zt.norm(p=norm, dim=-1, keepdim=True) / zp.norm(p=norm, dim=-1, keepdim=True)
    if tau > 1e8:
        z = alpha * zt + (1 - alpha) * zp                    # no clipping at all
    else:
        assert (r > tau).any() and (r < tau).any()            # clipping active on some tokens
        z = alpha * zt * torch.clamp(r, max=tau) / r + (1 - alpha) * zp
    expected = lin(attn.to_out[0], z)
    assert (expected - lin(attn.to_out[0], zp)).abs().max() > 1e-2    # NAG did something here
    assert_close(out, expected, effect=expected - lin(attn.to_out[0], zp))


def _stock_attention(family, model, path, x_img, x_txt, txt_ids):
    """The block's attention on [image, text] as installed now (stock, or a reference PAG
    processor): (image Z before to_out, image output, text output)."""
    attn = model.get_submodule(path).attn
    captured = {}
    single = path.startswith("single")
    handle = None
    if not single:
        handle = attn.to_out[0].register_forward_pre_hook(
            lambda m, a: captured.update(z=a[0]))
    try:
        if family in ("sd3", "sd35"):
            img, txt = attn(hidden_states=x_img, encoder_hidden_states=x_txt)
        else:
            rotary = model.pos_embed(torch.cat([txt_ids, flux_img_ids(*FLUX_GRID)]))
            if single:
                out = attn(hidden_states=torch.cat([x_txt, x_img], 1), image_rotary_emb=rotary)
                n = x_txt.shape[1]
                return out[:, n:], out[:, n:], out[:, :n]
            img, txt = attn(hidden_states=x_img, encoder_hidden_states=x_txt,
                            image_rotary_emb=rotary)
    finally:
        if handle is not None:
            handle.remove()
    return captured["z"], img, txt


DIT_CASES = [("sd3", "transformer_blocks.1", "1"), ("sd3", "transformer_blocks.3", "3"),
             ("sd35", "transformer_blocks.1", "1"), ("flux", "transformer_blocks.1", "1"),
             ("flux", "single_transformer_blocks.0", "s0")]


@pytest.mark.parametrize("with_pag", [False, True], ids=["nag", "nag+pag"])
@pytest.mark.parametrize("family,path,name", DIT_CASES, ids=[c[1] for c in DIT_CASES])
def test_nag_dit_attention_is_the_formula_on_two_stock_attentions(family, path, name, with_pag):
    """The NAG joint attention on [image, positive text] / [image, negative text] equals the stock
    attention (or the reference PAG map, with PAG) run on each sequence separately, with the image
    outputs combined by the formula in float64 before to_out and each text keeping its own
    output. FLUX: the negative sequence uses its own txt_ids in the rotary embedding; single
    blocks give both sequences the combined image output."""
    model = get(family)
    sample, t, cond, _, _ = inputs(family)
    attn = model.get_submodule(path).attn
    dim = attn.to_q.in_features
    n_img = FLUX_GRID[0] * FLUX_GRID[1]
    g = torch.Generator().manual_seed(3)
    x_img = torch.randn(1, n_img, dim, generator=g)
    t_pos = torch.randn(1, N_TEXT, dim, generator=g)
    t_neg = torch.randn(1, N_TEXT, dim, generator=g)
    ids_pos = torch.zeros(N_TEXT, 3)
    ids_neg = torch.arange(3 * N_TEXT, dtype=torch.float32).reshape(N_TEXT, 3) % 4
    setting = ref.NAGSetting(phi=3.0, tau=1.5, alpha=0.7, norm=2)
    negative = {"encoder_hidden_states": torch.randn(1, N_TEXT, 16, generator=g),
                "pooled_projections": torch.randn(1, 16, generator=g), "txt_ids": ids_neg}
    kwargs = {k: v for k, v in cond.items() if k in ("img_ids", "txt_ids")}
    single = path.startswith("single")

    with torch.no_grad(), contextlib.ExitStack() as stack:
        if with_pag:
            stack.enter_context(ref.perturbed(model, grt.PAG(layers=name), sample=sample,
                                              kwargs=cond))
        zp, img_p, txt_p = _stock_attention(family, model, path, x_img, t_pos, ids_pos)
        zn, img_n, txt_n = _stock_attention(family, model, path, x_img, t_neg, ids_neg)
        stack.enter_context(ref.nag_installed(model, setting, negative, kwargs))
        both = torch.cat([t_pos, t_neg])
        if family in ("sd3", "sd35"):
            img, txt = attn(hidden_states=x_img, encoder_hidden_states=both)
        else:
            rotary = model.pos_embed(torch.cat([ids_pos, flux_img_ids(*FLUX_GRID)]))
            if single:
                seqs = torch.cat([torch.cat([t_pos, x_img], 1), torch.cat([t_neg, x_img], 1)])
                out = attn(hidden_states=seqs, image_rotary_emb=rotary)
                img, txt = out[:, N_TEXT:], out[:, :N_TEXT]
            else:
                img, txt = attn(hidden_states=x_img, encoder_hidden_states=both,
                                image_rotary_emb=rotary)
        z, r = formula64(zp, zn, setting.phi, setting.tau, setting.alpha, setting.norm)
        assert (r > setting.tau).any()                       # the clip is exercised
        assert (zp - zn).abs().max() > 1e-2                  # the negative really differs
        if single:
            expected = z.expand(2, -1, -1)
        else:
            expected = z @ attn.to_out[0].weight.double().T + attn.to_out[0].bias.double()
        assert_close(img, expected, effect=expected - (zp if single else img_p).double(), what="image rows")
        assert_close(txt[0:1], txt_p, what="positive text rows")
        assert_close(txt[1:2], txt_n, what="negative text rows")
    if with_pag:                                             # the PAG map really acted
        with torch.no_grad():
            zp_plain, _, _ = _stock_attention(family, model, path, x_img, t_pos, ids_pos)
        assert (zp_plain - zp).abs().max() > 1e-2


# ------------------------------------------------------------------------- DiT forward details


@pytest.mark.parametrize("family", ["unet", "sd3", "flux"])
def test_nag_rows_use_their_own_negative(family):
    """Sample b is guided by negative row b (DiT: one forward per sample); a batch-1 negative
    serves every row."""
    model = get(family)
    sample, t, cond, _, negative = inputs(family)
    guidance = grt.Guidance(grt.NAG())
    full = ref.step(model, guidance, sample, t, cond=cond, negative=negative, step=0, num_steps=10)

    def row(d, b):
        return {k: (row(v, b) if isinstance(v, dict) else
                    v[b:b + 1] if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == B
                    and k not in ("txt_ids", "img_ids") else v) for k, v in d.items()}

    t1 = t[1:2] if t.ndim else t
    one = ref.step(model, guidance, sample[1:2], t1, cond=row(cond, 1),
                   negative=row(negative, 1), step=0, num_steps=10)
    assert_close(full[1:2], one, ulps=MODEL_ULPS)
    # a batch-1 negative is broadcast
    neg0 = row(negative, 0)
    tiled = {k: v.expand(B, *v.shape[1:]) if isinstance(v, torch.Tensor) and k not in ("txt_ids", "img_ids")
             else v for k, v in neg0.items()}
    a = ref.step(model, guidance, sample, t, cond=cond, negative=neg0, step=0, num_steps=10)
    b = ref.step(model, guidance, sample, t, cond=cond, negative=tiled, step=0, num_steps=10)
    assert (a - full).abs().max() > 1e-3
    assert_close(a, b, ulps=MODEL_ULPS, effect=a - full)


def test_nag_flux_single_blocks_carry_the_negative_sequence_and_neg_txt_ids_matter():
    """Single blocks run row 1 = [negative text, image] as a sequence of its own, modulated by the
    negative pooled projection's temb: its image tokens equal row 0's while the negative pooled
    equals the positive one (both get the combined attention output) and drift from them
    otherwise."""
    model = get("flux")
    sample, t, cond, _, negative = inputs("flux")
    same_pooled = {**negative, "pooled_projections": cond["pooled_projections"]}
    for neg, drifts in ((same_pooled, False), (negative, True)):
        seen = []
        handle = model.single_transformer_blocks[0].register_forward_hook(
            lambda m, a, o: seen.append(o))
        try:
            cond_only("flux", grt.NAG(), negative=neg)
        finally:
            handle.remove()
        assert len(seen) == B
        for text, image in seen:
            assert text.shape[0] == 2 and image.shape[0] == 2
            assert (text[0] - text[1]).abs().max() > 1e-2
            drift = (image[0] - image[1]).abs().max().item()
            assert drift > 1e-2 if drifts else drift < 1e-6, drift
    # the negative's own txt_ids enter its rotary embedding
    same = cond_only("flux", grt.NAG(), negative=cond)
    shifted = cond_only("flux", grt.NAG(), negative={**cond, "txt_ids": cond["txt_ids"] + 3.0})
    assert (same - shifted).abs().max() > 1e-3


# ------------------------------------------------- FLUX against the authors' formulation


def assert_within_nag_effect(got, want, plain, frac=1e-3):
    """|got - want| <= frac |want - plain| + 64 eps |want| (Frobenius, float64): a small fraction
    of NAG's effect on the output, plus the rounding of an output of that size in its dtype."""
    rounding = 64 * torch.finfo(got.dtype).eps * want.double().norm().item()
    got, want, plain = got.double(), want.double(), plain.double()
    err, effect = (got - want).norm().item(), (want - plain).norm().item()
    assert effect > 1e3 * rounding, f"NAG's effect {effect:.3g} is too small to compare"
    assert err <= frac * effect + rounding, f"error {err:.3g} = {err / effect:.3g} of NAG's effect {effect:.3g}"


def _joint_z(attn, img, txt, rotary):
    """The stock FLUX joint attention on [txt, img]: (image Z before to_out, text output)."""
    seen = {}
    handle = attn.to_out[0].register_forward_pre_hook(lambda m, a: seen.update(z=a[0]))
    try:
        _, text = attn(hidden_states=img, encoder_hidden_states=txt, image_rotary_emb=rotary)
    finally:
        handle.remove()
    return seen["z"], text


def authors_flux_nag(model, setting, sample, t, cond, negative):
    """The positive forward with NAG written directly from the NAG authors' FLUX code
    (ChenDarYen/Normalized-Attention-Guidance: src/pipeline_flux_nag.py, src/transformer_flux.py
    NAGFluxTransformer2DModel.forward, src/attention_flux_nag.py, src/normalization.py), one
    sample at a time, with the model's stock submodules and the stock attention run on each
    sequence. temb has rows [positive, negative] = time_text_embed(t, guidance, [pooled, negative
    pooled]) (the pipeline's concatenation); double blocks: the image stream (one row) is modulated
    by the positive row (TruncAdaLayerNormZero), the text stream [positive; negative text] by its
    own rows, the image attention is NAG(Zp, Zn); single blocks: the image stream is tiled, row r
    = [text r, image r] is modulated by temb row r (AdaLayerNormZeroSingle is not truncated), both
    rows' image tokens get NAG(row 0, row 1), each text keeps its own; norm_out takes the
    positive row (TruncAdaLayerNormContinuous) of row 0's image. Rotary: each sequence with its
    own txt_ids, as guidance-rt does (the authors pass the positive ones for both; FluxPipeline's
    txt_ids are zeros for every prompt, and are equal here)."""
    def nag(zp, zn):
        return formula64(zp, zn, setting.phi, setting.tau, setting.alpha, setting.norm)[0].to(zp.dtype)

    def row(x, b):
        return x[b:b + 1] if x.shape[0] > 1 else x

    outs = []
    for b in range(sample.shape[0]):
        img = model.x_embedder(sample[b:b + 1])
        both = lambda v: row(v.reshape(-1), b).to(img.dtype).expand(2) * 1000   # noqa: E731
        times = (both(t),) + ((both(cond["guidance"]),) if cond.get("guidance") is not None else ())
        temb = model.time_text_embed(*times, torch.cat([row(cond["pooled_projections"], b),
                                                        row(negative["pooled_projections"], b)]))
        txt = model.context_embedder(torch.cat([row(cond["encoder_hidden_states"], b),
                                                row(negative["encoder_hidden_states"], b)]))
        rotary = [model.pos_embed(torch.cat([ids, cond["img_ids"]]))
                  for ids in (cond["txt_ids"], negative["txt_ids"])]
        n_text = txt.shape[1]
        for block in model.transformer_blocks:
            n_img, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(img, emb=temb[:1])
            n_txt, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(txt, emb=temb)
            (zp, text_p), (zn, text_n) = (_joint_z(block.attn, n_img, n_txt[r:r + 1], rotary[r])
                                          for r in (0, 1))
            img = img + gate_msa[:, None] * block.attn.to_out[0](nag(zp, zn))
            img = img + gate_mlp[:, None] * block.ff(block.norm2(img) * (1 + scale_mlp[:, None])
                                                     + shift_mlp[:, None])
            txt = txt + c_gate_msa[:, None] * torch.cat([text_p, text_n])
            txt = txt + c_gate_mlp[:, None] * block.ff_context(
                block.norm2_context(txt) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None])
        x = torch.cat([txt, img.expand(2, -1, -1)], dim=1)
        for block in model.single_transformer_blocks:
            n, gate = block.norm(x, emb=temb)
            a = torch.cat([block.attn(hidden_states=n[r:r + 1], image_rotary_emb=rotary[r]) for r in (0, 1)])
            a[:, n_text:] = nag(a[0:1, n_text:], a[1:2, n_text:])
            x = x + gate[:, None] * block.proj_out(torch.cat([a, block.act_mlp(block.proj_mlp(n))], dim=2))
        outs.append(model.proj_out(model.norm_out(x[:1, n_text:], temb[:1])))
    return torch.cat(outs)


def test_nag_flux_reference_follows_the_authors_forward():
    """With a negative pooled projection that differs from the positive one, the reference equals
    the authors' formulation to a small fraction of NAG's effect; changing only the negative
    pooled projection moves the result, and the reference follows."""
    model = get("flux")
    sample, t, cond, _, negative = inputs("flux")
    assert (negative["pooled_projections"] - cond["pooled_projections"]).abs().min() > 0
    setting = ref.NAGSetting(phi=4.0, tau=2.5, alpha=0.25, norm=2)     # the authors' FLUX defaults
    plain = forward(model, sample, t, cond)
    fresh = torch.randn(B, 16, generator=torch.Generator().manual_seed(9))
    other = {**negative, "pooled_projections": 3.0 * fresh}
    with torch.no_grad():
        got, moved = (ref.nag_forward(model, setting, neg, sample, t, cond)
                      for neg in (negative, other))
        want, want_moved = (authors_flux_nag(model, setting, sample, t, cond, neg)
                            for neg in (negative, other))
    assert_within_nag_effect(got, want, plain)
    assert_within_nag_effect(moved, want_moved, plain)
    assert (moved - got).norm() > 0.05 * (want - plain).norm(), "the negative pooled projection is ignored"


# -------------------------------------------------------------------------------- zero norms


def test_nag_combine_zero_norm_guard():
    g = torch.Generator().manual_seed(0)
    zp = torch.randn(2, 5, 8, generator=g)
    zn = torch.randn(2, 5, 8, generator=g)
    zp[0, 1] = 0.0                          # |Zp| = 0: r infinite
    zn[1, 2] = 2.0 * zp[1, 2]               # phi = 2: Zt = 2 Zp - Zn = 0, r = 0
    zp[1, 3] = 0.0
    zn[1, 3] = 0.0                          # both zero: r = 0 / 0
    for norm in (1, 2):
        setting = ref.NAGSetting(phi=2.0, tau=2.5, alpha=0.5, norm=norm)
        z = ref.nag_combine(zp, zn, setting)
        assert torch.isfinite(z).all()
        expected, _ = formula64(zp, zn, 2.0, 2.5, 0.5, norm)
        assert_close(z, expected)
        assert_close(z[0, 1], 0.5 * (-zn[0, 1]))  # Zh = Zt
        assert_close(z[1, 2], 0.5 * zp[1, 2])     # Zt = 0
        assert (z[1, 3] == 0).all()


def test_nag_zero_positive_attention_gives_finite_output():
    """Zp = 0 on every token: (a) a zero positive text (to_v has no bias) in every attn2, (b) one
    layer's to_v weights zeroed (Zp = Zn = 0 there). The output stays finite."""
    model = get("unet")
    sample, t, cond, _, negative = inputs("unet")
    guidance = grt.Guidance(grt.NAG(scale=3.0))
    zero_text = {**cond, "encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"])}
    attn = model.mid_block.attentions[0].transformer_blocks[0].attn2
    assert attn.to_v.bias is None
    out = ref.step(model, guidance, sample, t, cond=zero_text, negative=negative, step=0,
                   num_steps=10)
    assert torch.isfinite(out).all()
    assert (out - forward(model, sample, t, zero_text)).abs().max() > 1e-3

    saved = attn.to_v.weight.detach().clone()
    try:
        with torch.no_grad():
            attn.to_v.weight.zero_()
        out = ref.step(model, guidance, sample, t, cond=cond, negative=negative, step=0,
                       num_steps=10)
        assert torch.isfinite(out).all()
    finally:
        with torch.no_grad():
            attn.to_v.weight.copy_(saved)


# ----------------------------------------------------------------- with perturbations, state


def nag_with_terms(family):
    layers = LAYERS[family]
    return [grt.PAG(scale=2.0, layers=layers[:1]), grt.SEG(scale=1.5, layers=layers[1:]),
            grt.TPG(scale=0.5, layers=layers), grt.SLG(scale=1.0, layers=layers[:1], start=0.0),
            grt.SLG(scale=1.0, layers=layers[1:], skip="attn", start=0.0)]


@pytest.mark.parametrize("family", NAG_FAMILIES)
def test_nag_with_perturbations_combine_and_leave_model_untouched(family):
    """Every positive branch carries NAG (the perturbed ones included), the uncond branch is
    plain, the combiner is unchanged, and nothing stays installed."""
    model = get(family)
    sample, t, cond, uncond, negative = inputs(family)
    terms = nag_with_terms(family)
    nag = grt.NAG(scale=4.0)
    before = snapshot(model)
    with_nag = nag_branches(family, grt.Guidance(grt.CFG(scale=4.0), *terms, nag))
    assert_same_state(before, snapshot(model))
    without = nag_branches(family, grt.Guidance(grt.CFG(scale=4.0), *terms), negative=None)
    assert [b.kind for b in with_nag] == [b.kind for b in without]
    torch.testing.assert_close(with_nag[0].prediction, without[0].prediction, rtol=0, atol=0)
    for a, b in zip(with_nag[1:], without[1:]):
        assert (a.prediction - b.prediction).abs().max() > 1e-3, f"{a.kind}: NAG missing"
    u, c = with_nag[0].prediction.double(), with_nag[1].prediction.double()
    expected = u + 4.0 * (c - u)
    for b in with_nag[2:]:
        expected = expected + b.scale * (c - b.prediction.double())
    out = nag_run(family, grt.Guidance(grt.CFG(scale=4.0), *terms, nag))
    assert_close(out, expected, effect=expected - c)
    assert_same_state(before, snapshot(model))


@pytest.mark.parametrize("family", NAG_FAMILIES)
def test_nag_model_restored_after_error(family):
    model = get(family)
    last = model.conv_out if family == "unet" else model.proj_out
    calls = []

    def boom(module, args, output):
        calls.append(1)
        if len(calls) == 3:       # UNet: the first perturbed branch; DiT: cond's second sample
            raise RuntimeError("boom")

    guidance = grt.Guidance(grt.CFG(), grt.PAG(layers=LAYERS[family][:1]), grt.NAG())
    clean = nag_run(family, guidance)
    handle = last.register_forward_hook(boom)
    try:
        before = snapshot(model)
        with pytest.raises(RuntimeError, match="boom"):
            nag_run(family, guidance)
        assert_same_state(before, snapshot(model))
    finally:
        handle.remove()
    sample, t, cond, _, negative = inputs(family)
    setting = ref.NAGSetting(phi=5.0, tau=2.5, alpha=0.5, norm=1)
    before = snapshot(model)
    with pytest.raises(KeyError):
        with ref.nag_installed(model, setting, negative, cond, row=0):
            assert snapshot(model) != before
            raise KeyError("inside")
    assert_same_state(before, snapshot(model))
    torch.testing.assert_close(nag_run(family, guidance), clean, rtol=0, atol=0)
