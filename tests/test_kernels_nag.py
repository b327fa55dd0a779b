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
