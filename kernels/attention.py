"""Per-row variant attention: one flash-style kernel over the packed batch (methods.md 2-3).

    out = variant_attention(q, k, v, mode, beta=None, head_mask=None, image=None, key_mask=None)

q: (R, H, Nq, d); k, v: (R, H, Nk, d); any strides (views of (R, N, H, d) are the intended
input); image = (img_lo, img_hi), default all tokens; key_mask (R, Nk) bool, True where the key
takes part, default all keys. Every row r takes `mode[r]` (int32, on the device):

    NORMAL   softmax(q k^T / sqrt(d)) v
    IDENTITY PAG's map. Image queries i in [img_lo, img_hi) attend only to their own key i and to
             every non-image (text) key; other queries attend to everything (diffusers'
             PAGJointAttnProcessor2_0). With no text (img_lo = 0, img_hi = Nk) this is out = V,
             and the kernel reads V only.
    SOFT     SoftPAG: (1 - beta[r]) NORMAL + beta[r] IDENTITY on heads with head_mask[r, h] set,
             NORMAL on the others.
    MEAN     SEG with infinite blur. The caller guarantees the row's image queries are identical
             (the mean query was substituted), so the kernel computes ONE query row per
             (row, head), from q[r, h, img_lo], and broadcasts it to the image queries; other
             queries are NORMAL. The caller's guarantee is not checked.

Key mask: every mode drops row r's masked keys from every query's softmax, as
`F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])` does for NORMAL
rows (text padding, say). The PAG map assumes image keys are never masked (an image query always
sees its own key; not checked); its masked text keys are dropped like any other. Every query
must keep at least one key (an empty softmax is undefined: SDPA gives NaN).

A finite-blur SEG row is a NORMAL row whose queries went through `query_blur` first.
The output has shape (R, H, Nq, d) and the memory layout of (R, Nq, H, d), so
`out.transpose(1, 2).reshape(R, Nq, H * d)` (the output projection's input) is free.

Kernels: `_mean_partials` (flash-decoding: the single mean query against key splits, so a MEAN
row costs about one read of K and V at full bandwidth instead of N/BLOCK_M reads) and
`_variant_attention_fwd` (one program per (query block, row, head); the row's mode picks the
path; compiled in two specialisations, see its docstring). No N x N matrix is ever stored.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula
from torch.utils.weak import WeakIdKeyDictionary

from ._common import (HAS_TRITON, define_op, interp_bf16, jit, next_pow2, poison_, tl, triton,
                      use_triton)
from ._flash import LOG2E, attention_tiles
from .selfcheck import case, head_dim, heads

if HAS_TRITON:
    from ._common import fmax, fsum, to_out
    from ._flash import _NEG, _attend

NORMAL, IDENTITY, SOFT, MEAN = 0, 1, 2, 3


# ---------------------------------------------------------------- kernels

if HAS_TRITON:

    @jit
    def _mean_row(PM, PL, PACC, rh, n_splits, offs_d, mask_d, BLOCK_D: tl.constexpr,
                  SPLITS_P2: tl.constexpr):
        """MEAN: merge the flash-decoding splits of (row, head) into the one output row."""
        offs_s = tl.arange(0, SPLITS_P2)
        mask_s = offs_s < n_splits
        slots = rh * n_splits + offs_s
        pm = tl.load(PM + slots, mask=mask_s, other=_NEG)
        pl = tl.load(PL + slots, mask=mask_s, other=0.0)
        pacc = tl.load(PACC + slots[:, None] * BLOCK_D + offs_d[None, :],
                       mask=mask_s[:, None] & mask_d[None, :], other=0.0)
        w = tl.exp2(pm - fmax(pm, 0))
        return fsum(pacc * w[:, None], 0) / fsum(pl * w, 0)

    @jit
    def _mean_partials(Q, K, V, MODE, KMASK, PM, PL, PACC,
                       s_qr, s_qh, s_qn, s_qd, s_kr, s_kh, s_kn, s_kd, s_vr, s_vh, s_vn, s_vd,
                       s_kmr, s_kmn, H, NK, img_lo, keys_per_split, n_splits, scale,
                       D: tl.constexpr, HAS_KMASK: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr):
        """MEAN rows: the single query q[r, h, img_lo] against keys of one split (flash-decoding).
        Writes the split's running max, sum and unnormalised output; other rows exit at once."""
        rh = tl.program_id(0)
        split = tl.program_id(1)
        r = rh // H
        h = rh % H
        mode = tl.load(MODE + r)
        if mode == 3:  # MEAN
            offs_d = tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            q = tl.load(Q + r * s_qr + h * s_qh + img_lo * s_qn + offs_d * s_qd, mask=mask_d,
                        other=0.0).to(tl.float32)
            k_base = K + r * s_kr + h * s_kh
            v_base = V + r * s_vr + h * s_vh
            m = tl.full([], _NEG, tl.float32)
            l = tl.full([], 0.0, tl.float32)
            acc = tl.full([BLOCK_D], 0.0, tl.float32)
            lo = split * keys_per_split
            hi = tl.minimum(lo + keys_per_split, NK)
            for start in range(lo, hi, BLOCK_N):
                offs_n = start + tl.arange(0, BLOCK_N)
                valid_n = offs_n < hi
                kv_mask = valid_n[:, None] & mask_d[None, :]
                k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_mask,
                            other=0.0).to(tl.float32)
                # one query row: a dot product per key on the CUDA cores (tl.dot needs M >= 16)
                s = fsum(k * q[None, :], 1) * scale
                allowed = valid_n
                if HAS_KMASK:
                    allowed = allowed & (tl.load(KMASK + r * s_kmr + offs_n * s_kmn, mask=valid_n,
                                                 other=0) != 0)
                s = tl.where(allowed, s, float("-inf"))
                m_new = tl.maximum(m, fmax(s, 0))
                alpha = tl.exp2(m - m_new)
                p = tl.exp2(s - m_new)
                v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_mask,
                            other=0.0).to(tl.float32)
                l = l * alpha + fsum(p, 0)
                acc = acc * alpha + fsum(p[:, None] * v, 0)
                m = m_new
            slot = rh * n_splits + split
            tl.store(PM + slot, m)
            tl.store(PL + slot, l)
            tl.store(PACC + slot * BLOCK_D + offs_d, acc)

    @jit
    def _variant_attention_fwd(Q, K, V, O, MODE, BETA, HEADMASK, KMASK, PM, PL, PACC,
                               s_qr, s_qh, s_qn, s_qd, s_kr, s_kh, s_kn, s_kd,
                               s_vr, s_vh, s_vn, s_vd, s_or, s_oh, s_on, s_od,
                               s_mr, s_mh, s_kmr, s_kmn, H, NQ, NK, img_lo, img_hi, n_splits,
                               scale, D: tl.constexpr, PAG_MAP: tl.constexpr,
                               HAS_TEXT: tl.constexpr, HAS_KMASK: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_D: tl.constexpr, SPLITS_P2: tl.constexpr,
                               INTERP_BF16: tl.constexpr, F32_3X: tl.constexpr):
        """One program per (query block, row, head). Compiled twice from this source:

        PAG_MAP=False, launched always: NORMAL rows; SOFT rows' normal map (times 1 - beta, and
            plus beta V when there is no text); MEAN rows; IDENTITY rows without text (copy V).
        PAG_MAP=True, launched only with text tokens: IDENTITY rows, and SOFT rows' selected
            heads, which add beta times the PAG map to what the first launch stored.
        HAS_KMASK (a key mask was given) doubles both: without it, KMASK is never read.

        Two specialisations instead of one kernel with every path: the GPU allocates registers
        and shared memory for the worst path of a kernel, and the PAG map's extra loops would
        make the normal rows, the bulk of the batch, pay for them (spills on sm_90)."""
        pid_m = tl.program_id(0)
        rh = tl.program_id(1)
        r = rh // H
        h = rh % H
        mode = tl.load(MODE + r)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < NQ
        mask_d = offs_d < D
        io_mask = mask_m[:, None] & mask_d[None, :]
        q_img = (offs_m >= img_lo) & (offs_m < img_hi)
        # every query of this block that exists is an image query
        block_lo = pid_m * BLOCK_M
        block_in_image = (block_lo >= img_lo) & (tl.minimum(block_lo + BLOCK_M, NQ) <= img_hi)

        q_base = Q + r * s_qr + h * s_qh
        k_base = K + r * s_kr + h * s_kh
        v_base = V + r * s_vr + h * s_vh
        km_base = KMASK + r * s_kmr
        o_ptrs = O + r * s_or + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :] * s_od
        v_rows = v_base + offs_m[:, None] * s_vn + offs_d[None, :] * s_vd

        if not PAG_MAP:
            soft_head = tl.load(HEADMASK + r * s_mr + h * s_mh) != 0
            if HAS_TEXT:
                v_only = mode < 0                  # never: with text the PAG map needs Q and K
            else:
                v_only = mode == 1
            if v_only:
                # PAG on pure self-attention: output V. No Q, K or softmax.
                tl.store(o_ptrs, tl.load(v_rows, mask=io_mask, other=0.0), mask=io_mask)
            elif (mode == 3) & block_in_image:
                # MEAN: the one query row of (row, head), broadcast to the block
                row = _mean_row(PM, PL, PACC, rh, n_splits, offs_d, mask_d, BLOCK_D, SPLITS_P2)
                out = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32) + row[None, :]
                tl.store(o_ptrs, to_out(out, O.dtype.element_ty, INTERP_BF16), mask=io_mask)
            elif mode != 1:
                q = tl.load(q_base + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd,
                            mask=io_mask, other=0.0)
                m = tl.full([BLOCK_M], _NEG, tl.float32)
                l = tl.full([BLOCK_M], 0.0, tl.float32)
                acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
                m, l, acc = _attend(m, l, acc, q, k_base, v_base, s_kn, s_kd, s_vn, s_vd, km_base,
                                    s_kmn, 0, NK, offs_m, offs_d, mask_d, img_lo, img_hi, scale,
                                    False, HAS_KMASK, BLOCK_N, INTERP_BF16, F32_3X)
                out = acc / tl.where(l > 0, l, 1.0)[:, None]
                if mode == 3:
                    # a block straddling the image range: its image queries take the mean row
                    row = _mean_row(PM, PL, PACC, rh, n_splits, offs_d, mask_d, BLOCK_D,
                                    SPLITS_P2)
                    out = tl.where(q_img[:, None], row[None, :], out)
                if (mode == 2) & soft_head:
                    beta = tl.load(BETA + r)
                    if HAS_TEXT:
                        out = (1.0 - beta) * out     # + beta * PAG map: the PAG_MAP launch
                    else:
                        # SoftPAG on pure self-attention: the PAG map's output is V itself
                        v_own = tl.load(v_rows, mask=io_mask, other=0.0).to(tl.float32)
                        out = (1.0 - beta) * out + beta * v_own
                tl.store(o_ptrs, to_out(out, O.dtype.element_ty, INTERP_BF16), mask=io_mask)
        else:
            soft_head = tl.load(HEADMASK + r * s_mr + h * s_mh) != 0
            if (mode == 1) | ((mode == 2) & soft_head):
                q = tl.load(q_base + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd,
                            mask=io_mask, other=0.0)
                # seed each image query's softmax with its own key (the diagonal) ...
                self_mask = q_img & mask_m
                k_self = tl.load(k_base + offs_m[:, None] * s_kn + offs_d[None, :] * s_kd,
                                 mask=self_mask[:, None] & mask_d[None, :], other=0.0)
                s_self = fsum(q.to(tl.float32) * k_self.to(tl.float32), 1) * scale
                v_self = tl.load(v_rows, mask=self_mask[:, None] & mask_d[None, :], other=0.0)
                m = tl.where(self_mask, s_self, _NEG)
                l = tl.where(self_mask, 1.0, 0.0)
                acc = tl.where(self_mask[:, None], v_self.to(tl.float32), 0.0)
                # ... then add the keys it may see: a block of image queries sees only the text
                # keys, so visit just those; a mixed block visits all, image x image masked
                if block_in_image:
                    m, l, acc = _attend(m, l, acc, q, k_base, v_base, s_kn, s_kd, s_vn, s_vd,
                                        km_base, s_kmn, 0, img_lo, offs_m, offs_d, mask_d,
                                        img_lo, img_hi, scale, False, HAS_KMASK, BLOCK_N,
                                        INTERP_BF16, F32_3X)
                    m, l, acc = _attend(m, l, acc, q, k_base, v_base, s_kn, s_kd, s_vn, s_vd,
                                        km_base, s_kmn, img_hi, NK, offs_m, offs_d, mask_d,
                                        img_lo, img_hi, scale, False, HAS_KMASK, BLOCK_N,
                                        INTERP_BF16, F32_3X)
                else:
                    m, l, acc = _attend(m, l, acc, q, k_base, v_base, s_kn, s_kd, s_vn, s_vd,
                                        km_base, s_kmn, 0, NK, offs_m, offs_d, mask_d, img_lo,
                                        img_hi, scale, True, HAS_KMASK, BLOCK_N, INTERP_BF16,
                                        F32_3X)
                out = acc / tl.where(l > 0, l, 1.0)[:, None]
                if mode == 2:
                    # SOFT: the first launch stored (1 - beta) * normal here
                    first = tl.load(o_ptrs, mask=io_mask, other=0.0).to(tl.float32)
                    out = first + tl.load(BETA + r) * out
                tl.store(o_ptrs, to_out(out, O.dtype.element_ty, INTERP_BF16), mask=io_mask)


# ---------------------------------------------------------------- launcher


KEYS_PER_SPLIT = 256   # MEAN rows: keys per flash-decoding split (16 splits at 4096 tokens)


def _keys_per_split(block_n: int, device: torch.device) -> int:
    return KEYS_PER_SPLIT if device.type == "cuda" else 2 * block_n


def _empty_out(q: torch.Tensor, d: int) -> torch.Tensor:
    rows, heads, n = q.shape[:3]
    return q.new_empty(rows, n, heads, d).transpose(1, 2)


def _triton_impl(q, k, v, mode, beta, head_mask, img_lo: int, img_hi: int,
                 key_mask: torch.Tensor | None) -> torch.Tensor:
    rows, heads, nq, d = q.shape
    nk = k.shape[2]
    out = poison_(_empty_out(q, v.shape[-1]))
    if out.numel() == 0:
        return out
    d_pad = max(16, next_pow2(d))
    block_m, block_n, warps, stages = attention_tiles(d, q.dtype, q.device)
    keys_per_split = _keys_per_split(block_n, q.device)
    has_mean_rows = img_lo < img_hi          # without image tokens MEAN is plain NORMAL
    n_splits = triton.cdiv(nk, keys_per_split) if has_mean_rows else 1
    # MEAN rows' flash-decoding partials: running max, sum, unnormalised output per split
    pm = poison_(q.new_empty((rows * heads * n_splits,), dtype=torch.float32))
    pl = poison_(q.new_empty((rows * heads * n_splits,), dtype=torch.float32))
    pacc = poison_(q.new_empty((rows * heads * n_splits * d_pad,), dtype=torch.float32))
    mode = mode.to(torch.int32)
    beta = beta.to(torch.float32)
    head_mask = head_mask.to(torch.uint8)
    has_kmask = key_mask is not None
    # without a key mask the kernels never read KMASK: any tensor stands in for the pointer
    kmask = key_mask.to(torch.uint8) if has_kmask else head_mask
    kmask_strides = kmask.stride() if has_kmask else (0, 0)
    scale = LOG2E / math.sqrt(d)
    has_text = not (img_lo <= 0 and img_hi >= nk)
    bf16_fix = interp_bf16(q.dtype)
    f32 = q.dtype == torch.float32
    if has_mean_rows:
        torch.library.wrap_triton(_mean_partials)[(rows * heads, n_splits)](
            q, k, v, mode, kmask, pm, pl, pacc, *q.stride(), *k.stride(), *v.stride(),
            *kmask_strides, heads, nk, img_lo, keys_per_split, n_splits, scale, D=d,
            HAS_KMASK=has_kmask, BLOCK_N=block_n, BLOCK_D=d_pad, num_warps=4)
    grid = (triton.cdiv(nq, block_m), rows * heads)
    for pag_map in ((False, True) if has_text else (False,)):
        torch.library.wrap_triton(_variant_attention_fwd)[grid](
            q, k, v, out, mode, beta, head_mask, kmask, pm, pl, pacc,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *head_mask.stride(),
            *kmask_strides, heads, nq, nk, img_lo, img_hi, n_splits, scale, D=d,
            PAG_MAP=pag_map, HAS_TEXT=has_text, HAS_KMASK=has_kmask, BLOCK_M=block_m,
            BLOCK_N=block_n, BLOCK_D=d_pad, SPLITS_P2=max(2, next_pow2(n_splits)),
            INTERP_BF16=bf16_fix, F32_3X=f32,
            num_warps=warps, num_stages=stages)
    return out


# ---------------------------------------------------------------- PyTorch implementation


def _sdpa(q, k, v, keep=None):
    """SDPA; `keep` (r, Nk) bool: the keys each row's queries may see, or None for all."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if keep is None else keep[:, None, None, :])


def _pag_map(q, k, v, img_lo: int, img_hi: int, keep=None):
    """PAG's map for rows (r, H, N, d): image queries see their own key and every text key (the
    text keys `keep` (r, N) allows, when given)."""
    n = k.shape[2]
    if img_lo <= 0 and img_hi >= n:
        return v.clone()
    out = _sdpa(q, k, v, keep)                               # text queries: unchanged
    text = torch.ones(n, dtype=torch.bool, device=q.device)
    text[img_lo:img_hi] = False
    qi, ki, vi = q[:, :, img_lo:img_hi], k[:, :, img_lo:img_hi], v[:, :, img_lo:img_hi]
    scale = q.shape[-1] ** -0.5
    self_logit = (qi.float() * ki.float()).sum(-1, keepdim=True) * scale
    text_logit = (qi.float() @ k[:, :, text].float().transpose(-1, -2)) * scale
    if keep is not None:
        text_logit = text_logit.masked_fill(~keep[:, None, None, text], float("-inf"))
    p = torch.softmax(torch.cat([self_logit, text_logit], -1), -1)
    img = p[..., :1] * vi.float() + p[..., 1:] @ v[:, :, text].float()
    out[:, :, img_lo:img_hi] = img.to(out.dtype)
    return out


def _torch_impl(q, k, v, mode, beta, head_mask, img_lo: int, img_hi: int,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
    out = _empty_out(q, v.shape[-1])
    modes = mode.tolist()
    for m in set(modes):
        idx = torch.tensor([i for i, x in enumerate(modes) if x == m], device=q.device)
        qs, ks, vs = q.index_select(0, idx), k.index_select(0, idx), v.index_select(0, idx)
        keep = None if key_mask is None else key_mask.index_select(0, idx).bool()
        if m == IDENTITY:
            o = _pag_map(qs, ks, vs, img_lo, img_hi, keep)
        elif m == SOFT:
            b = beta.index_select(0, idx).to(torch.float32).view(-1, 1, 1, 1)
            sel = head_mask.index_select(0, idx).bool().view(len(idx), -1, 1, 1)
            normal = _sdpa(qs, ks, vs, keep)
            pag = _pag_map(qs, ks, vs, img_lo, img_hi, keep)
            mixed = (1 - b) * normal.float() + b * pag.float()
            o = torch.where(sel, mixed.to(normal.dtype), normal)
        elif m == MEAN and img_lo < img_hi:
            o = (_sdpa(qs, ks, vs, keep) if (img_lo > 0 or img_hi < qs.shape[2])
                 else torch.empty_like(qs))
            one = _sdpa(qs[:, :, img_lo:img_lo + 1], ks, vs, keep)   # the one query row, broadcast
            o[:, :, img_lo:img_hi] = one
        else:
            o = _sdpa(qs, ks, vs, keep)
        out.index_copy_(0, idx, o)
    return out


# ---------------------------------------------------------------- ops


@torch.library.custom_op("guidance_rt::variant_attention_torch", mutates_args=())
def variant_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: torch.Tensor,
                            beta: torch.Tensor, head_mask: torch.Tensor, img_lo: int,
                            img_hi: int, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    return _torch_impl(q, k, v, mode, beta, head_mask, img_lo, img_hi, key_mask)


@variant_attention_torch.register_fake
def _(q, k, v, mode, beta, head_mask, img_lo, img_hi, key_mask=None):
    return _empty_out(q, v.shape[-1])


@define_op("guidance_rt::variant_attention", mutates_args=())
def variant_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: torch.Tensor,
                         beta: torch.Tensor, head_mask: torch.Tensor, img_lo: int,
                         img_hi: int, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    if use_triton(q, "variant_attention"):
        return _triton_impl(q, k, v, mode, beta, head_mask, img_lo, img_hi, key_mask)
    return variant_attention_torch(q, k, v, mode, beta, head_mask, img_lo, img_hi, key_mask)


@case("variant_attention")
def _check_inputs(dtype, device):
    """Every mode in one batch, text tokens around the image (both PAG_MAP specialisations),
    queries and keys over several tiles and MEAN rows over several key splits; then the same with
    a key mask on text keys (the HAS_KMASK specialisations), one row with none masked."""
    d = head_dim(dtype)
    block_m, block_n, _, _ = attention_tiles(d, dtype, device)
    n = _keys_per_split(block_n, device) + block_m // 2 + 1
    g = torch.Generator().manual_seed(0)
    q, k, v = (heads(g, 4, n, 2, d, dtype) for _ in range(3))
    img_lo, img_hi = 2, n - 3
    q[3, :, img_lo:img_hi] = q[3, :, img_lo:img_hi].mean(1, keepdim=True)   # MEAN's precondition
    mode = torch.tensor([NORMAL, IDENTITY, SOFT, MEAN], dtype=torch.int32)
    beta = torch.tensor([1.0, 1.0, 0.3, 1.0])
    head_mask = torch.tensor([[True, True], [True, True], [True, False], [True, True]])
    key_mask = torch.ones(4, n, dtype=torch.bool)
    key_mask[1:, [0, n - 2]] = False
    key_mask[2:, 1] = False
    return [(q, k, v, mode, beta, head_mask, img_lo, img_hi),
            (q, k, v, mode, beta, head_mask, img_lo, img_hi, key_mask)]


# ---------------------------------------------------------------- FLOPs

# per-row tables on the meta device (FLOP counts of full-size models) -> their host values,
# which the formula below needs and a meta tensor does not hold
_HOST_TABLES = WeakIdKeyDictionary()


def table_to(table: torch.Tensor, device) -> torch.Tensor:
    """A per-row table (mode, head_mask) on `device`; on the meta device its values stay known to
    the FLOP formula."""
    out = table.to(device)
    if out.device.type == "meta":
        _HOST_TABLES[out] = table
    return out


def _values(table: torch.Tensor) -> list:
    return (_HOST_TABLES.get(table, table) if table.device.type == "meta" else table).tolist()


@register_flop_formula([torch.ops.guidance_rt.variant_attention, torch.ops.guidance_rt.variant_attention_torch],
                       get_raw=True)
def variant_attention_flops(q, k, v, mode, beta, head_mask, img_lo, img_hi, *args, out_shape=None, **kwargs) -> int:
    """The work each row's mode asks for (torch.utils.flop_counter; 2 FLOPs per multiply-add, as
    its SDPA formula): a query against a key is a dot product (d) and a weighted sum (dv).
    NORMAL: every query against every key. IDENTITY: image queries against their own key and the
    text keys, nothing at all without text (out = V). SOFT: NORMAL plus IDENTITY on the chosen
    heads. MEAN: one image query row. With a key mask only the row's unmasked keys count (image
    keys are never masked), except on the meta device, whose mask holds no values: all keys."""
    rows, heads, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    key_mask = args[0] if args else kwargs.get("key_mask")
    kept = ([nk] * rows if key_mask is None or key_mask.device.type == "meta"
            else key_mask.sum(1).tolist())
    n_img = max(0, min(img_hi, nq) - max(img_lo, 0))
    text_q, has_text = nq - n_img, nk > n_img
    pair = 2 * (d + dv)
    total = 0
    masks = _values(head_mask)
    for r, m in enumerate(_values(mode)):
        keys = kept[r]
        normal = nq * keys * pair
        identity = text_q * keys * pair + (n_img * (1 + keys - n_img) * pair if has_text else 0)
        if m == IDENTITY:
            total += heads * identity
        elif m == SOFT:
            total += heads * normal + sum(masks[r]) * identity
        elif m == MEAN:
            total += heads * (text_q * keys * pair + (keys * pair if n_img else 0))
        else:
            total += heads * normal
    return total


def variant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: torch.Tensor,
                      beta: torch.Tensor | None = None, head_mask: torch.Tensor | None = None,
                      image: tuple[int, int] | None = None,
                      key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row variant attention (see the module docstring). `beta` (R,) float and `head_mask`
    (R, H) bool default to 1 and all heads; `image` = (img_lo, img_hi) defaults to every token
    (plain self-attention); `key_mask` (R, Nk) bool, True where the key takes part, defaults to
    all keys."""
    rows, heads, nq, _ = q.shape
    if k.shape[:2] != (rows, heads) or v.shape[:3] != k.shape[:3] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"variant_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if key_mask is not None and tuple(key_mask.shape) != (rows, k.shape[2]):
        raise ValueError(f"variant_attention: key_mask {tuple(key_mask.shape)}, keys {tuple(k.shape)}")
    if beta is None:
        beta = torch.ones(rows, device=q.device, dtype=torch.float32)
    if head_mask is None:
        head_mask = torch.ones(rows, heads, device=q.device, dtype=torch.bool)
    lo, hi = (0, k.shape[2]) if image is None else image
    return variant_attention_op(q, k, v, mode, beta, head_mask, int(lo), int(hi), key_mask)
