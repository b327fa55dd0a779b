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

Joint (MM-DiT) attention, where the image queries attend the image keys beside either text:

    z = nag_attention(q, k_pos, v_pos, k_neg, v_neg, phi, tau, alpha, norm,
                      k_shared, v_shared, mask_pos, mask_neg)

Zp = attention(q, [K_shared; K_pos]) and Zn = attention(q, [K_shared; K_neg]): the shared keys
(R, H, Ns, d) (the image tokens) are scored once and both softmaxes continue from that partial
state (online softmax; the PyTorch path merges three attentions by their log-sum-exp), so the
negative stream costs only its text keys. mask_pos (R, Np) / mask_neg (R, Nn) bool: True where a
text key takes part (padded prompts); shared keys are never masked.

The blend alone, for attentions that compute Zp and Zn themselves (joint attention whose rows
carry PAG or SEG-mean variants at the same layer, FLUX's single blocks, whose negative sequence
has image tokens of its own):

    z = nag_combine(zp, zn, phi, tau, alpha, norm=1)

zp, zn: (R, N, C), the attention outputs with heads merged (C = H * d, channels last; any
strides), taken as given in their dtype. Returns Z (R, N, C) in zp's dtype, contiguous; the same
fp32 blend as above.

Kernels: `_nag_attention_fwd` (one program per (query block, row, head): Q loaded once; the
shared keys' flash loop, then two loops continuing its state; Zp into the output, Zn into a
scratch; the forked state costs registers: 255 without spills at d = 128, bf16, sm_90) and `_nag_combine` (one program per token
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
    def _finish(O, out_offs, io_mask, l, acc, INTERP_BF16: tl.constexpr):
        z = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(O + out_offs, to_out(z, O.dtype.element_ty, INTERP_BF16), mask=io_mask)

    @jit
    def _nag_attention_fwd(Q, KS, VS, KP, VP, KN, VN, MP, MN, O, ZN,
                           s_qr, s_qh, s_qn, s_qd, s_ksr, s_ksh, s_ksn, s_ksd,
                           s_vsr, s_vsh, s_vsn, s_vsd, s_kpr, s_kph, s_kpn, s_kpd,
                           s_vpr, s_vph, s_vpn, s_vpd, s_knr, s_knh, s_knn, s_knd,
                           s_vnr, s_vnh, s_vnn, s_vnd, s_mpr, s_mpn, s_mnr, s_mnn,
                           s_or, s_oh, s_on, s_od,
                           H, NQ, NS, NP, NN, scale, D: tl.constexpr, HAS_SHARED: tl.constexpr,
                           HAS_KMASK: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           INTERP_BF16: tl.constexpr, F32_3X: tl.constexpr):
        """One (query block, row, head): Q loaded once; the shared keys (HAS_SHARED) into one
        running softmax, which the positive keys then continue into Zp (-> O) and the negative
        keys into Zn (-> ZN). HAS_KMASK: MP / MN mask the text keys (else never read)."""
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

        m = tl.full([BLOCK_M], _NEG, tl.float32)
        l = tl.full([BLOCK_M], 0.0, tl.float32)
        acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
        if HAS_SHARED:   # never masked: KS stands in for the mask pointer, never read
            m, l, acc = _attend(m, l, acc, q, KS + r * s_ksr + h * s_ksh, VS + r * s_vsr + h * s_vsh,
                                s_ksn, s_ksd, s_vsn, s_vsd, KS, 0, 0, NS, offs_m, offs_d, mask_d,
                                0, 0, scale, False, False, BLOCK_N, INTERP_BF16, F32_3X)
        _, lp, accp = _attend(m, l, acc, q, KP + r * s_kpr + h * s_kph, VP + r * s_vpr + h * s_vph,
                              s_kpn, s_kpd, s_vpn, s_vpd, MP + r * s_mpr, s_mpn, 0, NP, offs_m,
                              offs_d, mask_d, 0, 0, scale, False, HAS_KMASK, BLOCK_N, INTERP_BF16,
                              F32_3X)
        _finish(O, out_offs, io_mask, lp, accp, INTERP_BF16)
        _, ln, accn = _attend(m, l, acc, q, KN + r * s_knr + h * s_knh, VN + r * s_vnr + h * s_vnh,
                              s_knn, s_knd, s_vnn, s_vnd, MN + r * s_mnr, s_mnn, 0, NN, offs_m,
                              offs_d, mask_d, 0, 0, scale, False, HAS_KMASK, BLOCK_N, INTERP_BF16,
                              F32_3X)
        _finish(ZN, out_offs, io_mask, ln, accn, INTERP_BF16)

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


def _triton_impl(q, k_pos, v_pos, k_neg, v_neg, phi: float, tau: float, alpha: float, norm: int,
                 k_shared=None, v_shared=None, mask_pos=None, mask_neg=None) -> torch.Tensor:
    rows, heads, nq, d = q.shape
    out = poison_(_empty_out(q, d))
    if out.numel() == 0:
        return out
    zn = poison_(_empty_out(q, d))
    has_shared, has_kmask = k_shared is not None, mask_pos is not None
    ks, vs = (k_shared, v_shared) if has_shared else (k_pos, v_pos)   # unread stand-ins
    mp, mn = ((mask_pos.to(torch.uint8), mask_neg.to(torch.uint8)) if has_kmask
              else (k_pos, k_neg))
    m_strides = (*mp.stride()[:2], *mn.stride()[:2]) if has_kmask else (0, 0, 0, 0)
    d_pad = max(16, next_pow2(d))
    block_m, block_n, warps, stages = attention_tiles(d, q.dtype, q.device)
    torch.library.wrap_triton(_nag_attention_fwd)[(triton.cdiv(nq, block_m), rows * heads)](
        q, ks, vs, k_pos, v_pos, k_neg, v_neg, mp, mn, out, zn, *q.stride(), *ks.stride(),
        *vs.stride(), *k_pos.stride(), *v_pos.stride(), *k_neg.stride(), *v_neg.stride(),
        *m_strides, *out.stride(), heads, nq, ks.shape[2] if has_shared else 0, k_pos.shape[2],
        k_neg.shape[2], LOG2E / math.sqrt(d), D=d, HAS_SHARED=has_shared, HAS_KMASK=has_kmask,
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


def _attention_lse(q, k, v, mask):
    """(attention output in fp32, its log-sum-exp (R, H, Nq) in fp32); mask (R, Nk) bool or None.
    On CPU the flash kernel SDPA uses, which returns both; elsewhere the plain math."""
    if q.device.type == "cpu":   # the kernel takes an additive mask of q's dtype
        m = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype).masked_fill(
            ~mask, float("-inf"))[:, None, None, :]
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=m)
        return torch.where(torch.isfinite(lse)[..., None], o.float(), 0.0), lse
    s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse = s.logsumexp(-1)
    p = torch.where(torch.isfinite(lse)[..., None], (s - lse[..., None]).exp(), 0.0)
    return p @ v.float(), lse


def _merge(shared, part):
    """softmax attention over the union of two key sets from each set's (output, log-sum-exp)."""
    (o_a, lse_a), (o_b, lse_b) = shared, part
    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.where(torch.isfinite(lse), (lse_a - lse).exp(), 0.0)[..., None]
    w_b = torch.where(torch.isfinite(lse), (lse_b - lse).exp(), 0.0)[..., None]
    return o_a * w_a + o_b * w_b


def _torch_impl(q, k_pos, v_pos, k_neg, v_neg, phi: float, tau: float, alpha: float, norm: int,
                k_shared=None, v_shared=None, mask_pos=None, mask_neg=None) -> torch.Tensor:
    out = _empty_out(q, q.shape[-1])
    if k_shared is None and mask_pos is None:
        zp = F.scaled_dot_product_attention(q, k_pos, v_pos)
        zn = F.scaled_dot_product_attention(q, k_neg, v_neg)
    else:
        shared = _attention_lse(q, k_shared, v_shared, None) if k_shared is not None else None
        zp, zn = (_attention_lse(q, k, v, mask) for k, v, mask in ((k_pos, v_pos, mask_pos),
                                                                   (k_neg, v_neg, mask_neg)))
        # rounded to q's dtype, as the unshared path's SDPA outputs are
        zp, zn = ((z[0] if shared is None else _merge(shared, z)).to(q.dtype) for z in (zp, zn))
    zp, zn = zp.transpose(1, 2).flatten(2), zn.transpose(1, 2).flatten(2)   # (R, N, C)
    out.transpose(1, 2).flatten(2).copy_(_blend(zp, zn, phi, tau, alpha, norm))
    return out


# ---------------------------------------------------------------- ops


def _check_norm(name: str, norm: int):
    if norm not in (1, 2):
        raise ValueError(f"{name}: norm must be 1 or 2, got {norm}")


@torch.library.custom_op("guidance_rt::nag_attention_torch", mutates_args=())
def nag_attention_torch(q: torch.Tensor, k_pos: torch.Tensor, v_pos: torch.Tensor,
                        k_neg: torch.Tensor, v_neg: torch.Tensor, phi: float, tau: float,
                        alpha: float, norm: int, k_shared: torch.Tensor | None = None,
                        v_shared: torch.Tensor | None = None, mask_pos: torch.Tensor | None = None,
                        mask_neg: torch.Tensor | None = None) -> torch.Tensor:
    return _torch_impl(q, k_pos, v_pos, k_neg, v_neg, phi, tau, alpha, norm, k_shared, v_shared,
                       mask_pos, mask_neg)


@nag_attention_torch.register_fake
def _(q, k_pos, v_pos, k_neg, v_neg, phi, tau, alpha, norm, k_shared=None, v_shared=None,
      mask_pos=None, mask_neg=None):
    return _empty_out(q, q.shape[-1])


@define_op("guidance_rt::nag_attention", mutates_args=())
def nag_attention_op(q: torch.Tensor, k_pos: torch.Tensor, v_pos: torch.Tensor,
                     k_neg: torch.Tensor, v_neg: torch.Tensor, phi: float, tau: float,
                     alpha: float, norm: int, k_shared: torch.Tensor | None = None,
                     v_shared: torch.Tensor | None = None, mask_pos: torch.Tensor | None = None,
                     mask_neg: torch.Tensor | None = None) -> torch.Tensor:
    args = (q, k_pos, v_pos, k_neg, v_neg, phi, tau, alpha, norm, k_shared, v_shared, mask_pos, mask_neg)
    if use_triton(q, "nag_attention"):
        return _triton_impl(*args)
    return nag_attention_torch(*args)


@case("nag_attention")
def _check_inputs(dtype, device):
    """Queries and both key sets over several tiles, of three different lengths; then the joint
    form: shared keys over several tiles, text keys masked (one row none masked)."""
    d = head_dim(dtype)
    block_m, block_n, _, _ = attention_tiles(d, dtype, device)
    n, n_pos, n_neg = block_m + block_m // 2 + 1, 2 * block_n + 3, block_n + 5
    g = torch.Generator().manual_seed(0)
    q = heads(g, 2, n, 3, d, dtype)
    k_pos, v_pos = (heads(g, 2, n_pos, 3, d, dtype) for _ in range(2))
    k_neg, v_neg = (heads(g, 2, n_neg, 3, d, dtype) for _ in range(2))
    k_sh, v_sh = (heads(g, 2, 2 * block_n + 1, 3, d, dtype) for _ in range(2))
    mask_pos = torch.ones(2, n_pos, dtype=torch.bool)
    mask_pos[1, n_pos - 4:] = False
    mask_neg = torch.ones(2, n_neg, dtype=torch.bool)
    mask_neg[1, 1:] = False
    return [(q, k_pos, v_pos, k_neg, v_neg, 3.0, 2.5, 0.5, 1),
            (q, k_pos, v_pos, k_neg, v_neg, 3.0, 2.5, 0.5, 1, k_sh, v_sh, mask_pos, mask_neg)]


@register_flop_formula([torch.ops.guidance_rt.nag_attention, torch.ops.guidance_rt.nag_attention_torch])
def nag_attention_flops(q_shape, kp_shape, vp_shape, kn_shape, vn_shape, phi=None, tau=None,
                        alpha=None, norm=None, ks_shape=None, vs_shape=None, *args, out_shape=None,
                        **kwargs) -> int:
    """torch.utils.flop_counter's SDPA count for the queries against each key set once: the
    positive keys, the negative keys and the shared keys (scored once for both). The blend is
    elementwise, as is nag_combine (no formula: no FLOPs counted)."""
    rows, heads, nq, d = q_shape
    ks_shape = ks_shape if ks_shape is not None else kwargs.get("k_shared")
    shared = 0 if ks_shape is None else ks_shape[2]
    return 2 * rows * heads * nq * (d + vp_shape[3]) * (kp_shape[2] + kn_shape[2] + shared)


def nag_attention(q: torch.Tensor, k_pos: torch.Tensor, v_pos: torch.Tensor, k_neg: torch.Tensor,
                  v_neg: torch.Tensor, phi: float, tau: float = 2.5, alpha: float = 0.5,
                  norm: int = 1, k_shared: torch.Tensor | None = None,
                  v_shared: torch.Tensor | None = None, mask_pos: torch.Tensor | None = None,
                  mask_neg: torch.Tensor | None = None) -> torch.Tensor:
    """NAG attention and blend (see the module docstring); phi = 1 is off."""
    _check_norm("nag_attention", norm)
    if q.shape[-1] != v_pos.shape[-1] or v_pos.shape[-1] != v_neg.shape[-1]:
        raise ValueError("nag_attention: q, v_pos and v_neg must share the head dim")
    if (k_shared is None) != (v_shared is None) or (mask_pos is None) != (mask_neg is None):
        raise ValueError("nag_attention: give k_shared with v_shared, and mask_pos with mask_neg")
    shared = () if k_shared is None else (k_shared, v_shared)
    if not all(t.shape[:2] == q.shape[:2] for t in (k_pos, v_pos, k_neg, v_neg, *shared)):
        raise ValueError("nag_attention: q, k and v must share rows and heads (R, H, N, d)")
    if shared and (v_shared.shape[-1] != q.shape[-1] or k_shared.shape[2] != v_shared.shape[2]):
        raise ValueError("nag_attention: k_shared and v_shared must be (R, H, Ns, d) like q")
    for name, mask, k in (("mask_pos", mask_pos, k_pos), ("mask_neg", mask_neg, k_neg)):
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (q.shape[0], k.shape[2])):
            raise ValueError(f"nag_attention: {name} must be a bool (R, N) mask of its keys, "
                             f"({q.shape[0]}, {k.shape[2]}), got {mask.dtype} {tuple(mask.shape)}")
    return nag_attention_op(q, k_pos, v_pos, k_neg, v_neg, float(phi), float(tau), float(alpha),
                            int(norm), k_shared, v_shared, mask_pos, mask_neg)


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
