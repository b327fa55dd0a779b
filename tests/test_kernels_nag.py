"""guidance_rt::nag_attention against a float64 reference written from methods.md 5: two
attentions with the same queries, the per-token L1 (or L2) norm over all heads' channels, the
ratio clip and the blend. Different positive and negative key lengths, odd sizes, one and several
heads, strided inputs, poisoned output and scratch, and the zero-norm guard.
"""
from __future__ import annotations

import math

import pytest
import torch

from .test_kernels_common import DEVICE, DTYPES, check, triton_run
from .tolerance import assert_close

from guidance_rt.kernels import nag_attention  # noqa: E402


def attention(q, k, v):
    return torch.softmax((q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1]), -1).to(q.dtype) @ v


def reference(q, kp, vp, kn, vn, phi, tau, alpha, norm, dtype=torch.float64):
    q, kp, vp, kn, vn = (t.to(dtype) for t in (q, kp, vp, kn, vn))
    zp = attention(q, kp, vp).transpose(1, 2).double()       # (R, N, H, d): a token's heads
    zn = attention(q, kn, vn).transpose(1, 2).double()
    zt = phi * zp - (phi - 1) * zn
    np_ = zp.abs().sum((2, 3)) if norm == 1 else zp.pow(2).sum((2, 3)).sqrt()
    nt = zt.abs().sum((2, 3)) if norm == 1 else zt.pow(2).sum((2, 3)).sqrt()
    out = torch.empty_like(zp)
    for r in range(zp.shape[0]):
        for n in range(zp.shape[1]):
            if np_[r, n] == 0 or nt[r, n] == 0:
                f = 1.0
            else:
                ratio = float(nt[r, n] / np_[r, n])
                f = min(ratio, tau) / ratio
            out[r, n] = alpha * zt[r, n] * f + (1 - alpha) * zp[r, n]
    return out.transpose(1, 2).to(dtype)   # a low-precision run also rounds its output


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
