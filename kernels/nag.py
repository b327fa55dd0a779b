"""NAG (normalized attention guidance, methods.md 5): attention against the positive and the
negative keys/values with the same queries, then the per-token normalised blend.

    z = nag_attention(q, k_pos, v_pos, k_neg, v_neg, phi, tau, alpha, norm=1)

q: (R, H, Nq, d); k_pos, v_pos: (R, H, Np, d); k_neg, v_neg: (R, H, Nn, d) (any strides; Np and
Nn may differ). With Zp = attention(q, K_pos, V_pos) and Zn = attention(q, K_neg, V_neg), per
token over ALL heads' channels together:

    Zt = phi Zp - (phi - 1) Zn
    r  = |Zt|_p / |Zp|_p                  (p = norm: 1 default, or 2)
    Zh = Zt * min(r, tau) / r             (factor 1 when |Zp| = 0 or r = 0: always finite)
    Z  = alpha Zh + (1 - alpha) Zp

Returns Z with shape (R, H, Nq, d) and the memory layout of (R, Nq, H, d), like
variant_attention: `z.transpose(1, 2).reshape(R, Nq, H * d)` is free. Zp and Zn are rounded to
q's dtype before the blend (as an attention processor computing them separately would); the
blend is fp32.

The blend alone, for attentions that compute Zp and Zn themselves (SD3 / FLUX joint attention,
which needs both text streams and per-row variants):

    z = nag_combine(zp, zn, phi, tau, alpha, norm=1)

zp, zn: (R, N, C), the attention outputs with heads merged (C = H * d, channels last; any
strides), taken as given in their dtype. Returns Z (R, N, C) in zp's dtype, contiguous; the same
fp32 blend as above.

Kernels: `_nag_attention_fwd` (one program per (query block, row, head): Q loaded once, two
flash loops; Zp into the output, Zn into a scratch) and `_nag_combine` (one program per token
block: the norms over all heads, then the blend; in place for nag_attention, into a new tensor
for nag_combine). The norm couples all heads of a token, which live in different attention
programs, so the blend is a separate epilogue; the alternative, atomically accumulated per-token
norms plus the same epilogue, saves nothing (the epilogue must read Zp and Zn again either way).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from ._common import (HAS_TRITON, define_op, interp_bf16, jit, next_pow2, poison_, tl, triton,
                      use_triton)
from ._flash import LOG2E, attention_tiles
from .selfcheck import case, head_dim, heads

if HAS_TRITON:
    from ._common import fsum, to_out
    from ._flash import _NEG, _attend


# ---------------------------------------------------------------- kernels

if HAS_TRITON:

    @jit
    def _attention(q, K, V, s_kn, s_kd, s_vn, s_vd, NK, offs_m, offs_d, mask_d, scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   INTERP_BF16: tl.constexpr, F32_3X: tl.constexpr):
        """softmax(q K^T) V of one (row, head) query block over all NK keys (fp32)."""
        m = tl.full([BLOCK_M], _NEG, tl.float32)
        l = tl.full([BLOCK_M], 0.0, tl.float32)
        acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
        # no key mask (HAS_KMASK False): K stands in for the mask pointer, never read
        m, l, acc = _attend(m, l, acc, q, K, V, s_kn, s_kd, s_vn, s_vd, K, 0, 0, NK, offs_m,
                            offs_d, mask_d, 0, 0, scale, False, False, BLOCK_N, INTERP_BF16,
                            F32_3X)
        return acc / tl.where(l > 0, l, 1.0)[:, None]

    @jit
    def _nag_attention_fwd(Q, KP, VP, KN, VN, O, ZN,
                           s_qr, s_qh, s_qn, s_qd, s_kpr, s_kph, s_kpn, s_kpd,
                           s_vpr, s_vph, s_vpn, s_vpd, s_knr, s_knh, s_knn, s_knd,
                           s_vnr, s_vnh, s_vnn, s_vnd, s_or, s_oh, s_on, s_od,
                           H, NQ, NP, NN, scale, D: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           INTERP_BF16: tl.constexpr, F32_3X: tl.constexpr):
        pid_m = tl.program_id(0)
        rh = tl.program_id(1)
        r = rh // H
        h = rh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        io_mask = (offs_m < NQ)[:, None] & mask_d[None, :]
        q = tl.load(Q + r * s_qr + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd,
                    mask=io_mask, other=0.0)
        out_offs = r * s_or + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :] * s_od

        zp = _attention(q, KP + r * s_kpr + h * s_kph, VP + r * s_vpr + h * s_vph, s_kpn, s_kpd,
                        s_vpn, s_vpd, NP, offs_m, offs_d, mask_d, scale,
                        BLOCK_M, BLOCK_N, BLOCK_D, INTERP_BF16, F32_3X)
        tl.store(O + out_offs, to_out(zp, O.dtype.element_ty, INTERP_BF16), mask=io_mask)
        zn = _attention(q, KN + r * s_knr + h * s_knh, VN + r * s_vnr + h * s_vnh, s_knn, s_knd,
                        s_vnn, s_vnd, NN, offs_m, offs_d, mask_d, scale,
                        BLOCK_M, BLOCK_N, BLOCK_D, INTERP_BF16, F32_3X)
        tl.store(ZN + out_offs, to_out(zn, ZN.dtype.element_ty, INTERP_BF16), mask=io_mask)

    @jit
    def _zp_zt(ZP, ZN, p_offs, n_offs, mask, phi):
        """One tile of Zp and of Zt = phi Zp - (phi - 1) Zn, in fp32."""
        zp = tl.load(ZP + p_offs, mask=mask, other=0.0).to(tl.float32)
        zn = tl.load(ZN + n_offs, mask=mask, other=0.0).to(tl.float32)
        return zp, phi * zp - (phi - 1.0) * zn

    @jit
    def _nag_combine(ZP, ZN, O, s_pr, s_pn, s_pc, s_nr, s_nn, s_nc, s_or, s_on, N, C,
                     phi, tau, alpha, NORM: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_C: tl.constexpr, INTERP_BF16: tl.constexpr):
        """Per token (all C = H * d channels): the norms, then the blend into O (channels
        contiguous). O may be ZP itself: each tile is read before it is overwritten."""
        r = tl.program_id(0)
        offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = offs_t < N
        p_tok = r * s_pr + offs_t[:, None] * s_pn
        n_tok = r * s_nr + offs_t[:, None] * s_nn
        o_tok = r * s_or + offs_t[:, None] * s_on
        norm_p = tl.full([BLOCK_T], 0.0, tl.float32)
        norm_t = tl.full([BLOCK_T], 0.0, tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask = mask_t[:, None] & (offs_c < C)[None, :]
            zp, zt = _zp_zt(ZP, ZN, p_tok + offs_c[None, :] * s_pc,
                            n_tok + offs_c[None, :] * s_nc, mask, phi)
            if NORM == 1:
                norm_p += fsum(tl.abs(zp), 1)
                norm_t += fsum(tl.abs(zt), 1)
            else:
                norm_p += fsum(zp * zp, 1)
                norm_t += fsum(zt * zt, 1)
        if NORM == 2:
            norm_p = tl.sqrt(norm_p)
            norm_t = tl.sqrt(norm_t)
        ok = (norm_p > 0) & (norm_t > 0)
        ratio = norm_t / tl.where(ok, norm_p, 1.0)
        factor = tl.where(ok, tl.minimum(ratio, tau) / tl.where(ok, ratio, 1.0), 1.0)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask = mask_t[:, None] & (offs_c < C)[None, :]
            zp, zt = _zp_zt(ZP, ZN, p_tok + offs_c[None, :] * s_pc,
                            n_tok + offs_c[None, :] * s_nc, mask, phi)
            z = alpha * (zt * factor[:, None]) + (1.0 - alpha) * zp
            tl.store(O + o_tok + offs_c[None, :], to_out(z, O.dtype.element_ty, INTERP_BF16),
                     mask=mask)


# ---------------------------------------------------------------- launcher


def _empty_out(q: torch.Tensor, d: int) -> torch.Tensor:
    rows, heads, n = q.shape[:3]
    return q.new_empty(rows, n, heads, d).transpose(1, 2)


def _launch_combine(zp, zn, out, phi: float, tau: float, alpha: float, norm: int):
    """The blend of (R, N, C) zp and zn (any strides) into out (unit channel stride; may be zp)."""
    rows, n, channels = out.shape
    cuda = out.device.type == "cuda"
    block_t, block_c = (4, min(1024, next_pow2(channels))) if cuda else (16, 16)
    torch.library.wrap_triton(_nag_combine)[(rows, triton.cdiv(n, block_t))](
        zp, zn, out, *zp.stride(), *zn.stride(), out.stride(0), out.stride(1), n, channels,
        phi, tau, alpha, NORM=norm, BLOCK_T=block_t, BLOCK_C=block_c,
        INTERP_BF16=interp_bf16(out.dtype), num_warps=4)


def _triton_impl(q, k_pos, v_pos, k_neg, v_neg, phi: float, tau: float, alpha: float,
                 norm: int) -> torch.Tensor:
    rows, heads, nq, d = q.shape
    out = poison_(_empty_out(q, d))
    if out.numel() == 0:
        return out
    zn = poison_(_empty_out(q, d))
    d_pad = max(16, next_pow2(d))
    block_m, block_n, warps, stages = attention_tiles(d, q.dtype, q.device)
    torch.library.wrap_triton(_nag_attention_fwd)[(triton.cdiv(nq, block_m), rows * heads)](
        q, k_pos, v_pos, k_neg, v_neg, out, zn, *q.stride(), *k_pos.stride(), *v_pos.stride(),
        *k_neg.stride(), *v_neg.stride(), *out.stride(), heads, nq, k_pos.shape[2],
        k_neg.shape[2], LOG2E / math.sqrt(d), D=d,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=d_pad, INTERP_BF16=interp_bf16(q.dtype),
        F32_3X=q.dtype == torch.float32, num_warps=warps, num_stages=stages)
    z = out.transpose(1, 2).flatten(2)     # (R, N, H * d) views: a token's channels
    _launch_combine(z, zn.transpose(1, 2).flatten(2), z, phi, tau, alpha, norm)
    return out


# ---------------------------------------------------------------- PyTorch implementation


def _blend(zp: torch.Tensor, zn: torch.Tensor, phi: float, tau: float, alpha: float,
           norm: int) -> torch.Tensor:
    """The NAG blend over the last dim (a token's channels, all heads), fp32."""
    zp, zn = zp.float(), zn.float()
    zt = phi * zp - (phi - 1) * zn
    norm_p = zp.norm(p=norm, dim=-1, keepdim=True)
    norm_t = zt.norm(p=norm, dim=-1, keepdim=True)
    ok = (norm_p > 0) & (norm_t > 0)
    ratio = norm_t / torch.where(ok, norm_p, 1.0)
    factor = torch.where(ok, ratio.clamp(max=tau) / torch.where(ok, ratio, 1.0), 1.0)
    return alpha * (zt * factor) + (1 - alpha) * zp


def _torch_impl(q, k_pos, v_pos, k_neg, v_neg, phi: float, tau: float, alpha: float,
                norm: int) -> torch.Tensor:
    out = _empty_out(q, q.shape[-1])
    zp = F.scaled_dot_product_attention(q, k_pos, v_pos).transpose(1, 2).flatten(2)  # (R, N, C)
    zn = F.scaled_dot_product_attention(q, k_neg, v_neg).transpose(1, 2).flatten(2)
    out.transpose(1, 2).flatten(2).copy_(_blend(zp, zn, phi, tau, alpha, norm))
    return out


# ---------------------------------------------------------------- ops


def _check_norm(name: str, norm: int):
    if norm not in (1, 2):
        raise ValueError(f"{name}: norm must be 1 or 2, got {norm}")


@torch.library.custom_op("guidance_rt::nag_attention_torch", mutates_args=())
def nag_attention_torch(q: torch.Tensor, k_pos: torch.Tensor, v_pos: torch.Tensor,
                        k_neg: torch.Tensor, v_neg: torch.Tensor, phi: float, tau: float,
                        alpha: float, norm: int) -> torch.Tensor:
    return _torch_impl(q, k_pos, v_pos, k_neg, v_neg, phi, tau, alpha, norm)


@nag_attention_torch.register_fake
def _(q, k_pos, v_pos, k_neg, v_neg, phi, tau, alpha, norm):
    return _empty_out(q, q.shape[-1])


@define_op("guidance_rt::nag_attention", mutates_args=())
def nag_attention_op(q: torch.Tensor, k_pos: torch.Tensor, v_pos: torch.Tensor,
                     k_neg: torch.Tensor, v_neg: torch.Tensor, phi: float, tau: float,
                     alpha: float, norm: int) -> torch.Tensor:
    if use_triton(q, "nag_attention"):
        return _triton_impl(q, k_pos, v_pos, k_neg, v_neg, phi, tau, alpha, norm)
    return nag_attention_torch(q, k_pos, v_pos, k_neg, v_neg, phi, tau, alpha, norm)


@case("nag_attention")
def _check_inputs(dtype, device):
    """Queries and both key sets over several tiles, of three different lengths."""
    d = head_dim(dtype)
    block_m, block_n, _, _ = attention_tiles(d, dtype, device)
    n, n_pos, n_neg = block_m + block_m // 2 + 1, 2 * block_n + 3, block_n + 5
    g = torch.Generator().manual_seed(0)
    q = heads(g, 2, n, 3, d, dtype)
    k_pos, v_pos = (heads(g, 2, n_pos, 3, d, dtype) for _ in range(2))
    k_neg, v_neg = (heads(g, 2, n_neg, 3, d, dtype) for _ in range(2))
    return [(q, k_pos, v_pos, k_neg, v_neg, 3.0, 2.5, 0.5, 1)]


@register_flop_formula([torch.ops.guidance_rt.nag_attention, torch.ops.guidance_rt.nag_attention_torch])
def nag_attention_flops(q_shape, kp_shape, vp_shape, kn_shape, vn_shape, *args, out_shape=None, **kwargs) -> int:
    """Two attentions with the same queries (torch.utils.flop_counter's SDPA count for each); the
    blend is elementwise, as is nag_combine (no formula: no FLOPs counted)."""
    rows, heads, nq, d = q_shape
    return 2 * rows * heads * nq * (kp_shape[2] * (d + vp_shape[3]) + kn_shape[2] * (d + vn_shape[3]))


def nag_attention(q: torch.Tensor, k_pos: torch.Tensor, v_pos: torch.Tensor, k_neg: torch.Tensor,
                  v_neg: torch.Tensor, phi: float, tau: float = 2.5, alpha: float = 0.5,
                  norm: int = 1) -> torch.Tensor:
    """NAG attention and blend (see the module docstring); phi = 1 is off."""
    _check_norm("nag_attention", norm)
    if q.shape[-1] != v_pos.shape[-1] or v_pos.shape[-1] != v_neg.shape[-1]:
        raise ValueError("nag_attention: q, v_pos and v_neg must share the head dim")
    if not (q.shape[:2] == k_pos.shape[:2] == v_pos.shape[:2] == k_neg.shape[:2] == v_neg.shape[:2]):
        raise ValueError("nag_attention: q, k and v must share rows and heads (R, H, N, d)")
    return nag_attention_op(q, k_pos, v_pos, k_neg, v_neg, float(phi), float(tau), float(alpha),
                            int(norm))


@torch.library.custom_op("guidance_rt::nag_combine_torch", mutates_args=())
def nag_combine_torch(zp: torch.Tensor, zn: torch.Tensor, phi: float, tau: float, alpha: float,
                      norm: int) -> torch.Tensor:
    return _blend(zp, zn, phi, tau, alpha, norm).to(zp.dtype).contiguous()


@nag_combine_torch.register_fake
def _(zp, zn, phi, tau, alpha, norm):
    return zp.new_empty(zp.shape)


@define_op("guidance_rt::nag_combine", mutates_args=())
def nag_combine_op(zp: torch.Tensor, zn: torch.Tensor, phi: float, tau: float, alpha: float,
                   norm: int) -> torch.Tensor:
    if not use_triton(zp, "nag_combine"):
        return nag_combine_torch(zp, zn, phi, tau, alpha, norm)
    out = poison_(zp.new_empty(zp.shape))
    if out.numel():
        _launch_combine(zp, zn, out, phi, tau, alpha, norm)
    return out


@case("nag_combine")
def _check_combine_inputs(dtype, device):
    """Token rows over more than one block, channels of several heads (not a power of two in
    fp32), a strided Zn as the joint attention's image slice gives it."""
    d = head_dim(dtype)
    g = torch.Generator().manual_seed(1)
    zp = torch.randn(2, 37, 3 * d, generator=g).to(dtype)
    zn = torch.randn(2, 45, 3 * d, generator=g).to(dtype)[:, 8:]
    return [(zp, zn, 3.0, 2.5, 0.5, 1), (zp, zn, 3.0, 1.5, 0.25, 2)]


def nag_combine(zp: torch.Tensor, zn: torch.Tensor, phi: float, tau: float = 2.5,
                alpha: float = 0.5, norm: int = 1) -> torch.Tensor:
    """The NAG blend alone, of attention outputs with heads merged (see the module docstring)."""
    _check_norm("nag_combine", norm)
    if zp.dim() != 3 or zp.shape != zn.shape:
        raise ValueError(f"nag_combine: zp and zn must both be (R, N, C), got {tuple(zp.shape)} "
                         f"and {tuple(zn.shape)}")
    return nag_combine_op(zp, zn, float(phi), float(tau), float(alpha), int(norm))
