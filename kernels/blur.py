"""SEG's query blur (methods.md 3): a separable Gaussian over the token grid, per channel.

    y = query_blur(x, h, w, sigma, tok_lo=0)

x: (R, N, C) tokens; tokens [tok_lo, tok_lo + h*w) are an (h, w) image in row-major order (the
query before the head split: C = heads * head_dim). Each channel of that image is blurred with
the same Gaussian; the other tokens (text in joint attention) are copied. Returns a new
(R, N, C) tensor of x's dtype; the arithmetic is fp32.

- Kernel size per axis: k = ceil(6 sigma) + 1 - (ceil(6 sigma) mod 2), clamped so reflect padding
  fits that axis: k <= n - (n mod 2 - 1) for n = w and n = h (non-square grids work; on square
  ones this is the reference's width clamp). Taps exp(-0.5 (x / sigma)^2), x = -(k-1)/2 ..
  (k-1)/2, normalised to sum 1. Reflect padding k // 2 (PyTorch 'reflect': the edge is not
  repeated).
- sigma > 9999 is SEG's infinite blur: every image token becomes the mean of the image tokens.

Kernels: `_blur_pass` run twice (along w into an fp32 scratch, then along h, which also copies
the non-image tokens); `_mean_tokens` for the infinite blur. Fusing the blur into the attention's
Q load was not done: a query tile of BLOCK_M row-major tokens needs a k_h x (BLOCK_M + k_w) halo
per head channel block, which for SEG's large sigmas (k up to the grid size) costs more than one
extra read and write of Q. benchmarks/bench_kernels.py measures blur + attention against a
normal attention row (the goal: at most 1.2x).
"""
from __future__ import annotations

import math

import torch

from ._common import (HAS_TRITON, define_op, interp_bf16, jit, next_pow2, poison_, tl, triton,
                      use_triton)
from .selfcheck import case

if HAS_TRITON:
    from ._common import fsum, to_out

INFINITE_SIGMA = 9999.0


def seg_kernel_size(sigma: float, extent: int) -> int:
    """SEG's odd kernel size for sigma, clamped so that reflect padding fits an axis of `extent`."""
    k = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    return max(1, min(k, extent - (extent % 2 - 1)))


def _taps_norm(sigma: float, k: int) -> float:
    """1 / sum of the k unnormalised taps (float64 on the host; the kernel computes the taps)."""
    half = (k - 1) / 2
    return 1.0 / sum(math.exp(-0.5 * ((j - half) / sigma) ** 2) for j in range(k))


# ---------------------------------------------------------------- kernels

if HAS_TRITON:

    @jit
    def _blur_pass(X, S, Y, s_xr, s_xn, s_xc, s_sr, s_sn, s_yr, s_yn, s_yc,
                   N, C, tok_lo, h, w, k, inv_sigma, inv_norm,
                   ALONG_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                   INTERP_BF16: tl.constexpr):
        """One axis of the separable blur for a (BLOCK_T tokens x BLOCK_C channels) tile.

        ALONG_W: reads the image tokens of X, writes the fp32 scratch S (R, h*w, C).
        else:    reads S along h, writes Y (R, N, C); tokens outside the image are copied from X.
        """
        r = tl.program_id(0)
        offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        if ALONG_W:
            img_t = offs_t                       # image token index, 0 .. h*w
            is_img = offs_t < h * w
            coord = img_t % w
            extent = w
            step = 1
            src_base = X + r * s_xr + tok_lo * s_xn
            src_tok_stride = s_xn
            src_c_stride = s_xc
        else:
            img_t = offs_t - tok_lo
            is_img = (offs_t >= tok_lo) & (img_t < h * w) & (offs_t < N)
            coord = img_t // w
            extent = h
            step = w
            src_base = S + r * s_sr
            src_tok_stride = s_sn
            src_c_stride = 1
        pad = k // 2
        mask = is_img[:, None] & mask_c[None, :]
        acc = tl.full([BLOCK_T, BLOCK_C], 0.0, tl.float32)
        for j in range(0, k):
            # reflect (no edge repeat): -1 -> 1, extent -> extent - 2
            src = coord + j - pad
            src = tl.where(src < 0, -src, src)
            src = tl.where(src > extent - 1, 2 * (extent - 1) - src, src)
            src_t = img_t + (src - coord) * step
            x = tl.load(src_base + src_t[:, None] * src_tok_stride + offs_c[None, :] * src_c_stride,
                        mask=mask, other=0.0).to(tl.float32)
            z = (j - pad).to(tl.float32) * inv_sigma
            acc += tl.exp(-0.5 * z * z) * inv_norm * x
        if ALONG_W:
            tl.store(S + r * s_sr + offs_t[:, None] * s_sn + offs_c[None, :], acc, mask=mask)
        else:
            tok_mask = (offs_t < N)[:, None] & mask_c[None, :]
            other = tl.load(X + r * s_xr + offs_t[:, None] * s_xn + offs_c[None, :] * s_xc,
                            mask=tok_mask & ~is_img[:, None], other=0.0).to(tl.float32)
            out = tl.where(is_img[:, None], acc, other)
            tl.store(Y + r * s_yr + offs_t[:, None] * s_yn + offs_c[None, :] * s_yc,
                     to_out(out, Y.dtype.element_ty, INTERP_BF16), mask=tok_mask)

    @jit
    def _mean_tokens(X, Y, s_xr, s_xn, s_xc, s_yr, s_yn, s_yc, N, C, tok_lo, n_img,
                     BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, INTERP_BF16: tl.constexpr):
        """Infinite blur: the image tokens' mean per channel, written to every image token."""
        r = tl.program_id(0)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        total = tl.full([BLOCK_C], 0.0, tl.float32)
        for start in range(0, n_img, BLOCK_T):
            offs_t = start + tl.arange(0, BLOCK_T)
            x = tl.load(X + r * s_xr + (tok_lo + offs_t)[:, None] * s_xn + offs_c[None, :] * s_xc,
                        mask=(offs_t < n_img)[:, None] & mask_c[None, :], other=0.0)
            total += fsum(x.to(tl.float32), 0)
        mean = total / n_img
        for start in range(0, N, BLOCK_T):
            offs_t = start + tl.arange(0, BLOCK_T)
            tok_mask = (offs_t < N)[:, None] & mask_c[None, :]
            is_img = (offs_t >= tok_lo) & (offs_t < tok_lo + n_img)
            x = tl.load(X + r * s_xr + offs_t[:, None] * s_xn + offs_c[None, :] * s_xc,
                        mask=tok_mask & ~is_img[:, None], other=0.0).to(tl.float32)
            out = tl.where(is_img[:, None], mean[None, :], x)
            tl.store(Y + r * s_yr + offs_t[:, None] * s_yn + offs_c[None, :] * s_yc,
                     to_out(out, Y.dtype.element_ty, INTERP_BF16), mask=tok_mask)


# ---------------------------------------------------------------- launcher


def _tiles(c: int, device: torch.device):
    if device.type != "cuda":
        return 16, 16, 1
    return 32, min(128, max(16, next_pow2(c))), 4


def _triton_impl(x: torch.Tensor, h: int, w: int, sigma: float, tok_lo: int) -> torch.Tensor:
    rows, n, c = x.shape
    y = poison_(torch.empty_like(x, memory_format=torch.contiguous_format))
    if y.numel() == 0:
        return y
    block_t, block_c, warps = _tiles(c, x.device)
    if sigma > INFINITE_SIGMA:
        torch.library.wrap_triton(_mean_tokens)[(rows, triton.cdiv(c, block_c))](
            x, y, *x.stride(), *y.stride(), n, c, tok_lo, h * w,
            BLOCK_T=block_t, BLOCK_C=block_c, INTERP_BF16=interp_bf16(x.dtype), num_warps=warps)
        return y
    scratch = poison_(x.new_empty((rows, h * w, c), dtype=torch.float32))
    k_w, k_h = seg_kernel_size(sigma, w), seg_kernel_size(sigma, h)
    for along_w, k, tokens in ((True, k_w, h * w), (False, k_h, n)):
        grid = (rows, triton.cdiv(tokens, block_t), triton.cdiv(c, block_c))
        torch.library.wrap_triton(_blur_pass)[grid](
            x, scratch, y, *x.stride(), scratch.stride(0), scratch.stride(1), *y.stride(),
            n, c, tok_lo, h, w, k, 1.0 / sigma, _taps_norm(sigma, k),
            ALONG_W=along_w, BLOCK_T=block_t, BLOCK_C=block_c, INTERP_BF16=interp_bf16(x.dtype),
            num_warps=warps)
    return y


# ---------------------------------------------------------------- PyTorch implementation


def _blur_matrix(n: int, sigma: float, device) -> torch.Tensor:
    """One axis of the blur as an (n, n) matrix: row i holds the taps at the reflected sources
    of output i (repeated sources, near the edges, add up)."""
    k = seg_kernel_size(sigma, n)
    t = torch.arange(k, device=device, dtype=torch.float64) - (k - 1) / 2
    taps = torch.exp(-0.5 * (t / sigma) ** 2)
    taps = taps / taps.sum()
    src = torch.arange(n, device=device).view(-1, 1) + (torch.arange(k, device=device) - k // 2)
    src = torch.where(src < 0, -src, src)
    src = torch.where(src > n - 1, 2 * (n - 1) - src, src)
    m = torch.zeros(n, n, device=device, dtype=torch.float64)
    m.scatter_add_(1, src, taps.expand(n, k).contiguous())
    return m.float()


def _torch_impl(x: torch.Tensor, h: int, w: int, sigma: float, tok_lo: int) -> torch.Tensor:
    """The blur as two small matrix products per row (B_h X B_w^T per channel), fp32. On CPU
    this is 40-90x faster than the same blur as F.pad + F.conv2d over (R*C, 1, h, w) images
    (2 vs 180 ms at 32 x 32 x 1280, 6-10 vs 440 ms at 64 x 64 x 640, one thread)."""
    rows, n, c = x.shape
    y = x.clone(memory_format=torch.contiguous_format)
    img = x[:, tok_lo: tok_lo + h * w].float()
    if sigma > INFINITE_SIGMA:
        y[:, tok_lo: tok_lo + h * w] = img.mean(1, keepdim=True).to(x.dtype)
        return y
    img = img.reshape(rows, h, w, c)
    img = torch.matmul(_blur_matrix(w, sigma, x.device), img)                      # along w
    img = torch.matmul(_blur_matrix(h, sigma, x.device), img.reshape(rows, h, w * c))  # along h
    y[:, tok_lo: tok_lo + h * w] = img.reshape(rows, h * w, c).to(x.dtype)
    return y


# ---------------------------------------------------------------- ops


@torch.library.custom_op("guidance_rt::query_blur_torch", mutates_args=())
def query_blur_torch(x: torch.Tensor, h: int, w: int, sigma: float, tok_lo: int) -> torch.Tensor:
    return _torch_impl(x, h, w, sigma, tok_lo)


@query_blur_torch.register_fake
def _(x, h, w, sigma, tok_lo):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@define_op("guidance_rt::query_blur", mutates_args=())
def query_blur_op(x: torch.Tensor, h: int, w: int, sigma: float, tok_lo: int) -> torch.Tensor:
    if use_triton(x, "query_blur"):
        return _triton_impl(x, h, w, sigma, tok_lo)
    return query_blur_torch(x, h, w, sigma, tok_lo)


@case("query_blur")
def _check_inputs(dtype, device):
    """A finite blur (both passes, kernel clamped on the short axis) and the infinite one, on
    a non-square grid between text tokens, over two or more token and channel tiles."""
    h, w, tok_lo = 5, 7, 3
    channels = _tiles(1 << 16, device)[1] + 3         # just over the widest channel tile
    x = torch.randn(2, tok_lo + h * w + 2, channels, generator=torch.Generator().manual_seed(0)).to(dtype)
    return [(x, h, w, sigma, tok_lo) for sigma in (1.3, 2 * INFINITE_SIGMA)]


def query_blur(x: torch.Tensor, h: int, w: int, sigma: float, tok_lo: int = 0) -> torch.Tensor:
    """SEG's query blur (see the module docstring). x: (R, N, C)."""
    if x.dim() != 3 or tok_lo < 0 or tok_lo + h * w > x.shape[1] or h < 1 or w < 1:
        raise ValueError(f"query_blur: x {tuple(x.shape)}, grid {h}x{w} at token {tok_lo}")
    if not sigma > 0:
        raise ValueError(f"query_blur: sigma must be > 0, got {sigma}")
    return query_blur_op(x, int(h), int(w), float(sigma), int(tok_lo))
