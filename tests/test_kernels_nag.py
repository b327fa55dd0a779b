"""guidance_rt::nag_attention against a float64 reference written from methods.md 5: two
attentions with the same queries, the per-token L1 (or L2) norm over all heads' channels, the
ratio clip and the blend. Different positive and negative key lengths, odd sizes, one and several
heads, strided inputs, poisoned output and scratch, and the zero-norm guard.

guidance_rt::nag_combine (the blend alone, on given (R, N, C) Zp and Zn) against the same
reference blend: both paths, every dtype, both norms, the clip active, inactive and mixed, zero
norms, strided inputs; and the perturbation's effect far above the tolerance.
"""
from __future__ import annotations

import math

import pytest
import torch

from .test_kernels_common import DEVICE, DTYPES, check, triton_run
from .tolerance import FORMULA_ULPS, assert_close, tolerance

from guidance_rt.kernels import nag_attention, nag_combine  # noqa: E402


def attention(q, k, v):
    return torch.softmax((q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1]), -1).to(q.dtype) @ v


def blend_reference(zp, zn, phi, tau, alpha, norm):
    """methods.md 5 in float64 per token, over a token's channels (last dim of (R, N, C))."""
    zp, zn = zp.double(), zn.double()
    zt = phi * zp - (phi - 1) * zn
    np_ = zp.abs().sum(-1) if norm == 1 else zp.pow(2).sum(-1).sqrt()
    nt = zt.abs().sum(-1) if norm == 1 else zt.pow(2).sum(-1).sqrt()
    out = torch.empty_like(zp)
    for r in range(zp.shape[0]):
        for n in range(zp.shape[1]):
            if np_[r, n] == 0 or nt[r, n] == 0:
                f = 1.0
            else:
                ratio = float(nt[r, n] / np_[r, n])
                f = min(ratio, tau) / ratio
            out[r, n] = alpha * zt[r, n] * f + (1 - alpha) * zp[r, n]
    return out


def reference(q, kp, vp, kn, vn, phi, tau, alpha, norm, dtype=torch.float64):
    q, kp, vp, kn, vn = (t.to(dtype) for t in (q, kp, vp, kn, vn))
    zp = attention(q, kp, vp).transpose(1, 2)       # (R, N, H, d): a token's heads
    zn = attention(q, kn, vn).transpose(1, 2)
    out = blend_reference(zp.flatten(2), zn.flatten(2), phi, tau, alpha, norm)
    return out.view(zp.shape).transpose(1, 2).to(dtype)   # a low-precision run also rounds its output


def inputs(rows, heads, n, n_pos, n_neg, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda m: torch.randn(rows, m, heads, d, generator=g).transpose(1, 2).to(dtype).to(DEVICE)
    return mk(n), mk(n_pos), mk(n_pos), mk(n_neg), mk(n_neg)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,d,norm", [(3, 40, 1), (1, 24, 2)], ids=["h3-d40-l1", "h1-d24-l2"])
def test_nag(dtype, heads, d, norm):
    rows, n, n_pos, n_neg = 2, 37, 19, 11
    q, kp, vp, kn, vn = inputs(rows, heads, n, n_pos, n_neg, d, dtype, seed=d)
    # tau small enough that some tokens clip and some do not
    phi, tau, alpha = 4.0, 5.5, 0.25
    with triton_run():
        out = nag_attention(q, kp, vp, kn, vn, phi, tau, alpha, norm)
    args = [t.cpu() for t in (q, kp, vp, kn, vn)] + [phi, tau, alpha, norm]
    ref = reference(*args)
    check(out.cpu(), ref, reference(*args, dtype=dtype), dim=0, what=str(dtype))
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()


def test_clip_branches_both_taken():
    """The test shapes exercise both sides of min(r, tau) (else the clip is untested)."""
    q, kp, vp, kn, vn = inputs(2, 3, 37, 19, 11, 40, torch.float64, seed=40)
    zp = attention(q.cpu(), kp.cpu(), vp.cpu()).transpose(1, 2)
    zt = 4.0 * zp - 3.0 * attention(q.cpu(), kn.cpu(), vn.cpu()).transpose(1, 2)
    r = zt.abs().sum((2, 3)) / zp.abs().sum((2, 3))
    assert (r > 5.5).any() and (r < 5.5).any()


def test_phi_one_is_plain_attention():
    q, kp, vp, kn, vn = inputs(1, 2, 21, 9, 13, 16, torch.float32, seed=3)
    with triton_run():
        out = nag_attention(q, kp, vp, kn, vn, phi=1.0, tau=2.5, alpha=0.5)
    check(out.cpu(), attention(q.double(), kp.double(), vp.double()).cpu())


def test_zero_norm_guard():
    """V_pos = 0 (|Zp| = 0) or V_pos = V_neg = 0 (r = 0): finite, as methods.md asks."""
    q, kp, vp, kn, vn = inputs(2, 2, 17, 5, 7, 16, torch.float32, seed=5)
    vp = torch.zeros_like(vp)
    vn = vn.clone()
    vn[1] = 0
    with triton_run():
        out = nag_attention(q, kp, vp, kn, vn, 3.0, 2.5, 0.5)
    assert torch.isfinite(out).all()
    ref = reference(q.cpu(), kp.cpu(), vp.cpu(), kn.cpu(), vn.cpu(), 3.0, 2.5, 0.5, 1)
    assert_close(out.cpu(), ref)
    assert torch.equal(out[1].cpu(), torch.zeros_like(out[1].cpu()))


@pytest.mark.parametrize("norm", [1, 2])
def test_pytorch_path_matches_reference(norm):
    q, kp, vp, kn, vn = inputs(2, 3, 20, 9, 6, 16, torch.float32, seed=norm)
    q, kp, vp, kn, vn = (t.cpu() for t in (q, kp, vp, kn, vn))
    check(nag_attention(q, kp, vp, kn, vn, 5.0, 2.5, 0.25, norm),
          reference(q, kp, vp, kn, vn, 5.0, 2.5, 0.25, norm))


# ---------------------------------------------------------------- nag_combine

# The reference blends the same (rounded) Zp and Zn, so a low-precision output differs from it by
# its one final rounding (at most 1/2 eps of the largest value) plus the fp32 blend's error.
COMBINE_ULPS = {torch.float32: FORMULA_ULPS, torch.float16: 2, torch.bfloat16: 2}


def combine_inputs(rows, n, c, dtype, seed):
    """Strided Zp (token-major) and Zn (every other channel) with a zero-Zp token (|Zp| = 0)
    and a zero token in both (|Zp| = |Zt| = 0)."""
    g = torch.Generator().manual_seed(seed)
    zp = torch.randn(n, rows, c, generator=g).to(dtype).transpose(0, 1)
    zn = torch.randn(rows, n, 2 * c, generator=g).to(dtype)[..., ::2]
    zp[1, 5] = 0
    zp[2, 6] = zn[2, 6] = 0
    return zp.to(DEVICE), zn.to(DEVICE)


def run_combine(path, zp, zn, *args):
    if path == "torch":
        return nag_combine(zp.cpu(), zn.cpu(), *args)
    with triton_run():
        return nag_combine(zp, zn, *args)


def token_ratios(zp, zn, phi, norm):
    zp, zn = zp.double(), zn.double()
    return (phi * zp - (phi - 1) * zn).norm(p=norm, dim=-1) / zp.norm(p=norm, dim=-1)


PHI, ALPHA = 4.0, 0.25
TAUS = {"clip": 1.5, "mixed": 5.0, "noclip": 1e3}   # r is about 5 for these inputs


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("clip", list(TAUS))
def test_combine(path, dtype, norm, clip):
    rows, n, c, tau = 3, 37, 40, TAUS[clip]
    zp, zn = combine_inputs(rows, n, c, dtype, seed=norm)
    assert not zp.is_contiguous() and not zn.is_contiguous()
    ratios = token_ratios(zp, zn, PHI, norm)
    ratios = ratios[torch.isfinite(ratios)]
    assert {"clip": (ratios > tau).all(), "noclip": (ratios < tau).all(),
            "mixed": (ratios > tau).any() and (ratios < tau).any()}[clip]
    out = run_combine(path, zp, zn, PHI, tau, ALPHA, norm)
    assert out.dtype == dtype and out.shape == (rows, n, c) and out.is_contiguous()
    ref = blend_reference(zp.cpu(), zn.cpu(), PHI, tau, ALPHA, norm)
    # at bf16 one rounding of the output is already a few % of the effect
    effect = ref - zp.cpu().double() if dtype != torch.bfloat16 else None
    assert_close(out.cpu(), ref, ulps=COMBINE_ULPS[dtype], effect=effect, what=f"{path} {dtype}")
    # the zero-norm tokens: factor 1, so Z = alpha Zt + (1 - alpha) Zp (here: alpha Zt, and 0)
    assert torch.equal(out[2, 6].cpu(), torch.zeros(c, dtype=dtype))
    assert_close(out[1, 5].cpu(), ALPHA * (1 - PHI) * zn[1, 5].cpu().double(),
                 ulps=COMBINE_ULPS[dtype], what="zero Zp token")


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_combine_perturbation_changes_the_output(path, dtype):
    """phi = 1 with tau >= 1 returns Zp exactly; phi = 3 moves it by far more than the tolerance
    (at fp32 by 1e4 tolerances, at fp16 / bf16 by 20: their outputs' rounding is coarser)."""
    zp, zn = combine_inputs(3, 19, 24, dtype, seed=7)
    assert torch.equal(run_combine(path, zp, zn, 1.0, 2.5, 0.5, 1).cpu(), zp.cpu())
    moved = run_combine(path, zp, zn, 3.0, 2.5, 0.5, 1).cpu()
    change = (moved.double() - zp.cpu().double()).abs().max().item()
    tol = tolerance(moved, moved.double(), COMBINE_ULPS[dtype])
    assert change > (1e4 if dtype == torch.float32 else 20) * tol, (change, tol)


def test_combine_opcheck_with_triton_kernels():
    """Schema, fake tensor and dispatch checks while eager calls run the Triton kernel."""
    zp, zn = combine_inputs(3, 12, 20, torch.float32, seed=2)
    with triton_run():
        torch.library.opcheck(torch.ops.guidance_rt.nag_combine, (zp, zn, 3.0, 2.5, 0.5, 1))


def test_combine_rejects_bad_arguments():
    zp = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="norm"):
        nag_combine(zp, zp, 3.0, norm=3)
    with pytest.raises(ValueError, match=r"\(R, N, C\)"):
        nag_combine(zp, zp[:, :2], 3.0)


def test_flop_formula_is_two_attentions():
    """The bench's floors count the op as torch's SDPA formula for the positive and the negative
    attention (the blend is elementwise)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    q, kp, kn = torch.randn(2, 3, 11, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 5, 8)
    with FlopCounterMode(display=False) as counter:
        nag_attention(q, kp, kp, kn, kn, phi=3.0)
    assert counter.get_total_flops() == sdpa_flop_count(q.shape, kp.shape, kp.shape) + \
        sdpa_flop_count(q.shape, kn.shape, kn.shape)
    ks = torch.randn(2, 3, 13, 8)
    with FlopCounterMode(display=False) as counter:
        nag_attention(q, kp, kp, kn, kn, phi=3.0, k_shared=ks, v_shared=ks)
    assert counter.get_total_flops() == sdpa_flop_count(q.shape, kp.shape, kp.shape) + \
        sdpa_flop_count(q.shape, kn.shape, kn.shape) + sdpa_flop_count(q.shape, ks.shape, ks.shape)


# ---------------------------------------------------------------- joint form (shared keys, masks)


def masked_attention(q, k, v, keep):
    s = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
    s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.softmax(s, -1).to(q.dtype) @ v


def joint_reference(q, ks, vs, kp, vp, kn, vn, mp, mn, phi, tau, alpha, norm, dtype=torch.float64):
    """methods.md 5 with Zp over [shared; positive] keys and Zn over [shared; negative] keys,
    each one plain softmax over the concatenation (the masks drop text keys)."""
    q, ks, vs, kp, vp, kn, vn = (t.cpu().to(dtype) for t in (q, ks, vs, kp, vp, kn, vn))
    keep = lambda m: torch.cat([torch.ones(m.shape[0], ks.shape[2], dtype=torch.bool), m.cpu()], 1)
    zp = masked_attention(q, torch.cat([ks, kp], 2), torch.cat([vs, vp], 2), keep(mp)).transpose(1, 2)
    zn = masked_attention(q, torch.cat([ks, kn], 2), torch.cat([vs, vn], 2), keep(mn)).transpose(1, 2)
    out = blend_reference(zp.flatten(2), zn.flatten(2), phi, tau, alpha, norm)
    return out.view(zp.shape).transpose(1, 2).to(dtype)


def joint_inputs(dtype, seed, rows=3, heads=2, n=37, n_shared=41, n_pos=9, n_neg=6, d=24):
    """Image queries and keys (shared) beside two texts of different lengths; rows 1 and 2 pad
    their texts (masked keys hold large values, so using one would show)."""
    q, kp, vp, kn, vn = inputs(rows, heads, n, n_pos, n_neg, d, dtype, seed)
    ks, vs = inputs(rows, heads, 1, n_shared, 1, d, dtype, seed + 1)[1:3]
    mp = torch.ones(rows, n_pos, dtype=torch.bool, device=DEVICE)
    mn = torch.ones(rows, n_neg, dtype=torch.bool, device=DEVICE)
    mp[1, 6:], mn[1, 2:], mn[2, 4:] = False, False, False
    kp, vp, kn, vn = (t.clone() for t in (kp, vp, kn, vn))
    kp[1, :, 6:] = vp[1, :, 6:] = 30.0
    kn[2, :, 4:] = vn[2, :, 4:] = -30.0
    return q, ks, vs, kp, vp, kn, vn, mp, mn


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_joint_nag(path, dtype):
    """Shared keys scored once for both softmaxes and masked text keys, against the float64
    softmax over each concatenation; and the guidance moves the output far beyond the error."""
    q, ks, vs, kp, vp, kn, vn, mp, mn = joint_inputs(dtype, seed=11)
    phi, tau, alpha, norm = 4.0, 3.0, 0.25, 1
    if path == "torch":
        args = [t.cpu() for t in (q, kp, vp, kn, vn)]
        out = nag_attention(*args, phi, tau, alpha, norm, ks.cpu(), vs.cpu(), mp.cpu(), mn.cpu())
    else:
        with triton_run():
            out = nag_attention(q, kp, vp, kn, vn, phi, tau, alpha, norm, ks, vs, mp, mn)
    ref_args = (q, ks, vs, kp, vp, kn, vn, mp, mn, phi, tau, alpha, norm)
    ref = joint_reference(*ref_args)
    check(out.cpu(), ref, joint_reference(*ref_args, dtype=dtype), dim=0, what=f"{path} {dtype}")
    plain = joint_reference(q, ks, vs, kp, vp, kn, vn, mp, mn, 1.0, tau, alpha, norm)
    assert (ref - plain).abs().max() > 0.05 * ref.abs().max()


def test_joint_nag_equals_unshared_concatenation():
    """Without masks the joint form is nag_attention over the concatenated keys (fp32)."""
    q, ks, vs, kp, vp, kn, vn, _, _ = (t.cpu() for t in joint_inputs(torch.float32, seed=12))
    joint = nag_attention(q, kp, vp, kn, vn, 3.0, 2.5, 0.5, 2, ks, vs)
    cat = lambda a, b: torch.cat([a, b], 2)
    whole = nag_attention(q, cat(ks, kp), cat(vs, vp), cat(ks, kn), cat(vs, vn), 3.0, 2.5, 0.5, 2)
    assert_close(joint, whole.double(), what="joint vs concatenated")


def test_joint_opcheck_with_triton_kernels():
    q, ks, vs, kp, vp, kn, vn, mp, mn = joint_inputs(torch.float32, seed=13)
    with triton_run():
        torch.library.opcheck(torch.ops.guidance_rt.nag_attention,
                              (q, kp, vp, kn, vn, 3.0, 2.5, 0.5, 1, ks, vs, mp, mn))


def test_joint_rejects_bad_arguments():
    q, ks, vs, kp, vp, kn, vn, mp, mn = (t.cpu() for t in joint_inputs(torch.float32, seed=14))
    with pytest.raises(ValueError, match="k_shared with v_shared"):
        nag_attention(q, kp, vp, kn, vn, 3.0, k_shared=ks)
    with pytest.raises(ValueError, match="mask_pos with mask_neg"):
        nag_attention(q, kp, vp, kn, vn, 3.0, mask_pos=mp)
    with pytest.raises(ValueError, match=r"mask_neg must be a bool \(R, N\) mask"):
        nag_attention(q, kp, vp, kn, vn, 3.0, mask_pos=mp, mask_neg=mp)
