"""Per-row attention variants: the one dispatch point between the adapters and the kernels.

The adapters project q, k, v themselves (model-specific: qk-norm, rotary embeddings, joint text
streams) and call the functions here with the plan's row segments. This module holds the plain
PyTorch implementation (the CPU path); the Triton kernels plug in behind the same functions.

Variants (methods.md sections 2-3):
- IDENTITY (PAG): the attention map is PAG's map: the identity for self-attention (output = V),
  the MM-DiT form for joint attention (image queries see only themselves among image keys but
  every text key; text queries unchanged).
- SOFT (SoftPAG): (1 - beta) A + beta A_pag on the selected heads.
- BLUR (SEG): the query (before head split) is blurred with a Gaussian on the token grid.
- MEAN (SEG, infinite sigma): the query is replaced by its mean over the image tokens.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Callable

import torch
import torch.nn.functional as F

from .plan import BLUR, IDENTITY, MEAN, NORMAL, SOFT, Segment

_KERNELS: list = []


def kernels_for(t: torch.Tensor):
    """guidance_rt.kernels when its Triton kernels serve this tensor, else None: the plain
    PyTorch path below. CUDA tensors use them (GUIDANCE_RT_KERNELS=0 turns them off); CPU
    tensors only inside `kernels.triton_on_cpu()`, where Triton's interpreter runs them."""
    if t.device.type == "cuda" and os.environ.get("GUIDANCE_RT_KERNELS", "1") == "0":
        return None
    if not _KERNELS:
        try:
            from . import kernels
        except ImportError:   # the package works without the kernels (no Triton)
            kernels = None
        _KERNELS.append(kernels)
    k = _KERNELS[0]
    return k if k is not None and k.HAS_TRITON and k._common.use_triton(t) else None


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)


# ---------------------------------------------------------------- SEG query blur


def seg_kernel_size(sigma: float, extent: int) -> int:
    """SEG's odd kernel size for sigma, clamped so reflect padding fits this axis."""
    k = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    return min(k, extent - (extent % 2 - 1))


def gaussian_taps(sigma: float, extent: int, device, dtype) -> torch.Tensor:
    k = seg_kernel_size(sigma, extent)
    x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, device=device, dtype=torch.float64)
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    return (taps / taps.sum()).to(dtype)


def blur_tokens(x: torch.Tensor, grid: tuple[int, int], sigma: float) -> torch.Tensor:
    """x: (R, h*w, C) tokens in row-major grid order; every channel blurred separably."""
    h, w = grid
    k = kernels_for(x)
    if k is not None:
        return k.query_blur(x, h, w, sigma)
    rows, n, c = x.shape
    img = x.transpose(1, 2).reshape(rows * c, 1, h, w)
    for axis, extent in ((3, w), (2, h)):
        taps = gaussian_taps(sigma, extent, x.device, x.dtype)
        pad = taps.numel() // 2
        if pad:
            padding = (pad, pad, 0, 0) if axis == 3 else (0, 0, pad, pad)
            img = F.pad(img, padding, mode="reflect")
        weight = taps.view(1, 1, 1, -1) if axis == 3 else taps.view(1, 1, -1, 1)
        img = F.conv2d(img, weight)
    return img.reshape(rows, c, n).transpose(1, 2)


def query_variants(q: torch.Tensor, segments: tuple[Segment, ...], grid, image: slice) -> torch.Tensor:
    """Apply SEG's query perturbations (before head split) to the image tokens of their rows."""
    if not any(s.mode in (BLUR, MEAN) for s in segments):
        return q
    parts = []
    for s in segments:
        part = q[s.rows]
        if s.mode in (BLUR, MEAN):
            img = part[:, image]
            img = (img.mean(1, keepdim=True).expand_as(img) if s.mode == MEAN
                   else blur_tokens(img, grid, s.sigma))
            part = part.clone()
            part[:, image] = img
        parts.append(part)
    return torch.cat(parts)


# ---------------------------------------------------------------- PAG maps


def identity_map(q, k, v) -> torch.Tensor:
    """Self-attention PAG: the identity map, output V."""
    return v


def mmdit_identity_map(image: slice) -> Callable:
    """Joint-attention PAG (diffusers' PAGJointAttnProcessor2_0): image queries attend to their
    own image key and to every text key; text queries attend to everything."""

    def pag_map(q, k, v):
        n = q.shape[2]
        img = torch.arange(n, device=q.device)[image]
        text = torch.ones(n, dtype=torch.bool, device=q.device)
        text[image] = False
        scale = q.shape[-1] ** -0.5
        qi, ki, vi = q[:, :, image], k[:, :, image], v[:, :, image]
        kt, vt = k[:, :, text], v[:, :, text]
        self_logit = (qi * ki).sum(-1, keepdim=True) * scale            # (R, H, Ni, 1)
        text_logit = qi @ kt.transpose(-1, -2) * scale                  # (R, H, Ni, Nt)
        p = torch.softmax(torch.cat([self_logit, text_logit], -1).float(), -1).to(q.dtype)
        out_img = p[..., :1] * vi + p[..., 1:] @ vt
        out = sdpa(q[:, :, text], k, v)
        full = torch.empty_like(v)
        full[:, :, img] = out_img
        full[:, :, text] = out
        return full

    return pag_map


# ---------------------------------------------------------------- NAG


def nag_combine(zp: torch.Tensor, zn: torch.Tensor, phi: float, tau: float, alpha: float, norm: int) -> torch.Tensor:
    """methods.md section 5, per token over all heads' channels (last dim, before to_out)."""
    acc = torch.promote_types(zp.dtype, torch.float32)
    zp32, zn32 = zp.to(acc), zn.to(acc)
    zt = phi * zp32 - (phi - 1) * zn32
    ratio = zt.norm(p=norm, dim=-1, keepdim=True) / zp32.norm(p=norm, dim=-1, keepdim=True)
    # a zero norm on either side leaves Zt unclipped rather than producing 0/0
    factor = torch.where(torch.isfinite(ratio) & (ratio > 0), ratio.clamp(max=tau) / ratio, torch.ones_like(ratio))
    return (alpha * zt * factor + (1 - alpha) * zp32).to(zp.dtype)


def shift_segments(segments: tuple[Segment, ...], start: int) -> tuple[Segment, ...]:
    """The segments of rows [start, ...) re-based to start at 0 (the positive rows for NAG)."""
    out = []
    for s in segments:
        lo, hi = max(s.start, start), s.end
        if hi > lo:
            out.append(Segment(lo - start, hi - start, s.mode, s.beta, s.heads, s.sigma))
    return tuple(out)


# ---------------------------------------------------------------- dispatch


def variant_attention(q, k, v, segments: tuple[Segment, ...], image: slice | None = None,
                      mean_identical: bool = False) -> torch.Tensor:
    """Attention with per-row-segment variants. q, k, v: (R, H, N, d) after the query variants
    were applied. `image`: the image tokens of a joint (MM-DiT) sequence, None for self-attention
    (PAG's map is then the identity). `mean_identical`: the image queries of MEAN rows are all
    equal (no rotary embedding after the mean), so one query row per (row, head) is exact."""
    if not segments:
        return sdpa(q, k, v)
    kern = kernels_for(q)
    if kern is not None:
        # rows plain attention serves go to SDPA (its best backend), only the variant rows to the
        # kernel, so normal rows never run slower than SDPA
        span = None if image is None else (image.start or 0, q.shape[2] if image.stop is None else image.stop)
        outs = []
        for lo, hi, run in _kernel_runs(segments, mean_identical):
            if run is None:
                outs.append(sdpa(q[lo:hi], k[lo:hi], v[lo:hi]))
            else:
                mode, beta, heads = _row_tables(kern, run, hi - lo, q.shape[1], q.device, mean_identical)
                outs.append(kern.variant_attention(q[lo:hi], k[lo:hi], v[lo:hi], mode, beta, heads, span))
        return outs[0] if len(outs) == 1 else torch.cat(outs)
    pag_map = identity_map if image is None else mmdit_identity_map(image)
    outs = []
    for s in segments:
        qs, ks, vs = q[s.rows], k[s.rows], v[s.rows]
        if s.mode == IDENTITY:
            outs.append(pag_map(qs, ks, vs))
        elif s.mode == MEAN and mean_identical and image is None:
            outs.append(sdpa(qs[:, :, :1], ks, vs).expand_as(vs))
        elif s.mode == SOFT:
            o = sdpa(qs, ks, vs)
            mixed = (1 - s.beta) * o + s.beta * pag_map(qs, ks, vs)
            if s.heads is None:
                o = mixed
            else:
                heads = torch.tensor(s.heads, device=o.device, dtype=torch.long)   # checked at build
                o = o.index_copy(1, heads, mixed.index_select(1, heads))
            outs.append(o)
        else:  # NORMAL, BLUR, MEAN
            outs.append(sdpa(qs, ks, vs))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


@functools.lru_cache(maxsize=None)   # segments are fixed per step configuration
def _kernel_runs(segments: tuple[Segment, ...], mean_identical: bool):
    """Consecutive rows grouped into runs (lo, hi, segments re-based to lo), or (lo, hi, None)
    for rows plain attention serves: NORMAL and BLUR (its query is already blurred), and MEAN
    unless one query row per (row, head) is exact."""
    runs = []
    for s in segments:
        plain = s.mode in (NORMAL, BLUR) or (s.mode == MEAN and not mean_identical)
        if runs and (runs[-1][2] is None) == plain and runs[-1][1] == s.start:
            runs[-1][1] = s.end
            if not plain:
                runs[-1][2].append(s)
        else:
            runs.append([s.start, s.end, None if plain else [s]])
    return [(lo, hi, None if run is None else shift_segments(tuple(run), lo)) for lo, hi, run in runs]


_TABLES: dict = {}


def _row_tables(kern, segments, rows: int, heads: int, device, mean_identical: bool):
    """The kernel's per-row mode, beta and head mask for these segments (cached: the plan's
    segments are fixed per step configuration)."""
    key = (segments, rows, heads, str(device), mean_identical)
    if key not in _TABLES:
        codes = {NORMAL: kern.NORMAL, BLUR: kern.NORMAL, IDENTITY: kern.IDENTITY, SOFT: kern.SOFT,
                 MEAN: kern.MEAN if mean_identical else kern.NORMAL}
        mode = torch.zeros(rows, dtype=torch.int32)
        beta = torch.ones(rows, dtype=torch.float32)
        mask = torch.ones(rows, heads, dtype=torch.bool)
        for s in segments:
            mode[s.rows] = codes[s.mode]
            beta[s.rows] = s.beta
            if s.heads is not None:
                mask[s.rows] = False
                mask[s.rows, list(s.heads)] = True
        _TABLES[key] = (mode.to(device), beta.to(device), mask.to(device))
    return _TABLES[key]


def qk_segments(segments: tuple[Segment, ...]) -> tuple[tuple[Segment, ...], list[slice]]:
    """Segments of the rows that need q and k when IDENTITY rows need only V (self-attention):
    returns those segments re-based onto the gathered rows, and the original row slices."""
    kept, rows, offset = [], [], 0
    for s in segments:
        if s.mode == IDENTITY:
            continue
        n = s.end - s.start
        kept.append(Segment(offset, offset + n, s.mode, s.beta, s.heads, s.sigma))
        rows.append(s.rows)
        offset += n
    return tuple(kept), rows
