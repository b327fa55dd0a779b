"""The flash-attention inner loop shared by the attention kernels (variant attention, NAG).

Online softmax in the log2 domain: logits are pre-multiplied by log2(e) / sqrt(d) so the loop
uses exp2. The running maximum starts at a finite NEG instead of -inf, so a row whose keys are all
masked so far gives exp2(NEG - NEG) = 1 times a zero sum, never NaN.
"""
from __future__ import annotations

import torch

from ._common import HAS_TRITON, jit, next_pow2, tl

LOG2E = 1.4426950408889634
NEG = -1.0e30


def attention_tiles(d: int, dtype: torch.dtype, device: torch.device):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the attention kernels.

    GPU: the largest H100 tiles that compile for sm_90 without register spills and within the
    227 KB of shared memory a block may use, in every specialisation (checked ahead of time by
    `python -m guidance_rt.kernels._aot`, see tests/test_kernels_aot.py; speed unmeasured, see
    benchmarks/bench_kernels.py). A head dim that is not a power of two (40) loads through a
    mask that defeats vectorised loads and needs a smaller query tile. fp32 inputs (3xTF32 dots,
    three times the registers) are a correctness path with small tiles: no spills up to d = 128,
    small ones (<= 192 bytes) at d = 160.
    Interpreter: 16 x 16, so tiny test shapes span several query and key blocks."""
    if device.type != "cuda":
        return 16, 16, 1, 1
    d_pad = max(16, next_pow2(d))
    if dtype == torch.float32:
        if d_pad <= 64:
            return 64, 32, 4, 2
        return (16, 32, 4, 2) if d_pad <= 128 else (16, 16, 4, 2)
    if d_pad <= 64:
        return (128, 64, 8, 3) if d == d_pad else (64, 64, 8, 3)
    if d_pad <= 128:
        return 128, 64, 8, 2
    return 64, 32, 8, 2           # d = 160 (padded to 256)

if HAS_TRITON:
    from ._common import fmax, fsum, rne_bf16

    _NEG = tl.constexpr(NEG)

    @jit
    def _softmax_step(m, l, acc, s, v, INTERP_BF16: tl.constexpr, F32_3X: tl.constexpr):
        """One online-softmax step: logits s (log2 domain, -inf where masked) against values v."""
        m_new = tl.maximum(m, fmax(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + fsum(p, 1)
        # P @ V on the tensor cores in the input precision (see interp_bf16 for INTERP_BF16)
        if INTERP_BF16:
            acc = acc * alpha[:, None] + tl.dot(rne_bf16(p), v.to(tl.float32))
        elif F32_3X:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="tf32x3")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l, acc

    @jit
    def _logits(q, k_base, stride_kn, stride_kd, offs_n, valid_n, offs_d, mask_d, scale,
                INTERP_BF16: tl.constexpr, F32_3X: tl.constexpr):
        """q (BLOCK_M, BLOCK_D) against the keys offs_n: (BLOCK_M, BLOCK_N) logits, log2 domain."""
        kt = tl.load(k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                     mask=mask_d[:, None] & valid_n[None, :], other=0.0)
        if INTERP_BF16:
            s = tl.dot(q.to(tl.float32), kt.to(tl.float32))
        elif F32_3X:
            # fp32 inputs: fp32 accuracy on the tensor cores (3 TF32 products; plain TF32 would
            # lose 3 decimal digits, and IEEE fp32 dots spill registers on sm_90)
            s = tl.dot(q, kt, input_precision="tf32x3")
        else:
            s = tl.dot(q, kt)
        return s * scale

    @jit
    def _attend(m, l, acc, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                kmask_base, stride_kmn, lo, hi, offs_m, offs_d, mask_d, img_lo, img_hi, scale,
                MASK_IMAGE: tl.constexpr, HAS_KMASK: tl.constexpr, BLOCK_N: tl.constexpr,
                INTERP_BF16: tl.constexpr, F32_3X: tl.constexpr):
        """Keys [lo, hi) into the running softmax. MASK_IMAGE: drop image-query x image-key pairs
        (the PAG map; the diagonal is seeded by the caller). HAS_KMASK: drop the keys whose entry
        at kmask_base + n * stride_kmn is 0 (without it, kmask_base is never read)."""
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            valid_n = offs_n < hi
            s = _logits(q, k_base, stride_kn, stride_kd, offs_n, valid_n, offs_d, mask_d, scale,
                        INTERP_BF16, F32_3X)
            allowed = valid_n[None, :]
            if HAS_KMASK:
                keep = tl.load(kmask_base + offs_n * stride_kmn, mask=valid_n, other=0) != 0
                allowed = allowed & keep[None, :]
            if MASK_IMAGE:
                q_img = (offs_m >= img_lo) & (offs_m < img_hi)
                k_img = (offs_n >= img_lo) & (offs_n < img_hi)
                allowed = allowed & ~(q_img[:, None] & k_img[None, :])
            s = tl.where(allowed, s, float("-inf"))
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=valid_n[:, None] & mask_d[None, :], other=0.0)
            m, l, acc = _softmax_step(m, l, acc, s, v, INTERP_BF16, F32_3X)
        return m, l, acc
