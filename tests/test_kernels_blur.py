"""guidance_rt::query_blur against a float64 reference written from methods.md 3.

The reference builds each axis' blur as an explicit (n x n) matrix from the taps and reflect
indices (no F.pad, no conv), then applies B_h X B_w^T per channel. Non-square grids, even and odd
extents, sigmas whose kernel is clamped on one axis only, a grid embedded between text tokens,
strided inputs, the infinite blur, poisoned outputs and scratch.
"""
from __future__ import annotations

import math

import pytest
import torch

from .test_kernels_common import DEVICE, DTYPES, check, triton_run
from .tolerance import assert_close

from guidance_rt.kernels import query_blur, seg_kernel_size  # noqa: E402


def blur_matrix(n: int, sigma: float) -> torch.Tensor:
    k = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    k = min(k, n - (n % 2 - 1))                 # clamp per axis (methods.md, README)
    half = (k - 1) // 2
    taps = torch.tensor([math.exp(-0.5 * ((j - half) / sigma) ** 2) for j in range(k)],
                        dtype=torch.float64)
    taps /= taps.sum()
    m = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(k):
            src = i + j - half
            if src < 0:
                src = -src                        # reflect: the edge is not repeated
            if src > n - 1:
                src = 2 * (n - 1) - src
            m[i, src] += taps[j]
    return m


def reference(x, h, w, sigma, tok_lo, dtype=torch.float64):
    y = x.to(dtype).clone()
    img = x[:, tok_lo: tok_lo + h * w].to(dtype)                  # (R, h*w, C)
    if sigma > 9999:
        y[:, tok_lo: tok_lo + h * w] = img.mean(1, keepdim=True)
        return y
    grid = img.unflatten(1, (h, w))                               # (R, h, w, C)
    bh, bw = blur_matrix(h, sigma).to(dtype), blur_matrix(w, sigma).to(dtype)
    out = torch.einsum("ay,rywc,bw->rabc", bh, grid, bw)
    y[:, tok_lo: tok_lo + h * w] = out.flatten(1, 2)
    return y


def test_kernel_size_rule():
    assert seg_kernel_size(1.0, 64) == 7
    assert seg_kernel_size(10.0, 64) == 61
    assert seg_kernel_size(100.0, 64) == 65      # even extent: k <= n + 1 (pad 32 < 64)
    assert seg_kernel_size(100.0, 9) == 9        # odd extent: k <= n
    assert seg_kernel_size(0.5, 5) == 3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("h,w,sigma,tok_lo,n_extra", [
    (5, 7, 1.0, 0, 0),          # non-square, both odd, clamped on both axes (k = 7 -> 5, 7)
    (6, 9, 0.5, 4, 3),          # even h, grid between text tokens
    (4, 10, 3.0, 0, 5),         # clamped on h only (k = 19 -> 5 on h, 11 on w)
    (7, 3, 100.0, 2, 0),        # large finite sigma: nearly flat, NOT the mean
    (5, 6, 1e6, 3, 2),          # infinite blur: the mean of the image tokens
], ids=["5x7", "6x9-text", "4x10", "7x3-flat", "mean"])
def test_blur(dtype, h, w, sigma, tok_lo, n_extra):
    rows, c = 3, 24
    n = tok_lo + h * w + n_extra
    g = torch.Generator().manual_seed(h * w)
    # strided input: every other channel of a wider projection
    x = torch.randn(rows, n, 2 * c, generator=g)[:, :, ::2].to(dtype).to(DEVICE)
    with triton_run():
        y = query_blur(x, h, w, sigma, tok_lo)
    assert y.shape == x.shape and y.dtype == dtype
    ref = reference(x.cpu(), h, w, sigma, tok_lo)
    check(y.cpu(), ref, reference(x.cpu(), h, w, sigma, tok_lo, dtype), dim=0, what=f"{dtype}")
    # text tokens are copied exactly
    assert torch.equal(y[:, :tok_lo], x[:, :tok_lo])
    assert torch.equal(y[:, tok_lo + h * w:], x[:, tok_lo + h * w:])


def test_large_finite_sigma_is_not_the_mean():
    x = torch.randn(1, 7 * 3, 8, dtype=torch.float32, device=DEVICE)
    with triton_run():
        flat, mean = query_blur(x, 7, 3, 100.0), query_blur(x, 7, 3, 1e6)
    assert (flat - mean).abs().max() > 1e-3


@pytest.mark.parametrize("sigma", [2.0, 1e7])
def test_pytorch_path_matches_reference(sigma):
    x = torch.randn(2, 2 + 6 * 5, 24, dtype=torch.float32)
    check(query_blur(x, 6, 5, sigma, 2), reference(x, 6, 5, sigma, 2))


def test_matches_reference_blur_grid():
    """Same numbers as the oracle's blur (guidance_rt.reference.blur_grid: one 2-D conv of the
    outer-product taps), a third, independent implementation, on a non-square grid."""
    from guidance_rt.reference import blur_grid
    x = torch.randn(2, 6 * 9, 16, dtype=torch.float64)
    for sigma in (0.8, 2.0, 50.0):
        expect = blur_grid(x, 6, 9, sigma)
        assert_close(query_blur(x.float(), 6, 9, sigma), expect, effect=expect - x, what=f"sigma {sigma}")
