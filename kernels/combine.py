"""The guidance formula (methods.md 1 and 7) in one pass over the packed predictions.

    eps = guidance_combine(out, weights, batch, has_uncond, rescale=0.0, rate=None)

out: (R, ...) the packed model output, rows [uncond x B (if has_uncond)] [cond x B]
[branch_1 x B] ... [branch_K x B] (guidance_rt.plan's layout; B = batch). weights: (1 + K,)
float tensor on the device, [w, s_1, ..., s_K], or (1 + K, B) with every sample's own scales
(w is ignored without uncond rows; a device tensor so per-step scales, e.g. PAG's adaptive
scale, need no recompile or graph re-capture). Per sample b, with u, c, p_k its rows (and its
column of weights):

    eps = u + w rate (c - u) + sum_k s_k (c - p_k)      (has_uncond; rate = 1 without a map)
    eps = c + sum_k s_k (c - p_k)                        (no uncond rows)
    rescale r > 0:  eps = r eps std(c) / std(eps) + (1 - r) eps
                    (unbiased std over all non-batch dims, per sample; factor 1 if std(eps) = 0)

rate: S-CFG's per-pixel map, (B, ...) with the sample shape except one size-1 dim it is
broadcast along (the channels): (B, 1, H, W) for (C, H, W) predictions, (B, N, 1) for (N, C).
Returns (B, ...) in out's dtype; the arithmetic is fp32.

Kernel: `_combine`, compiled twice. Without rescale: one launch, every prediction read once and
eps written once. With rescale the std of eps needs all of a sample before any of it can be
written, so a first launch (STATS) computes per-chunk counts, means and centred sums of squares
of c and eps (Chan et al.'s parallel variance: no cancellation, unlike sum and sum of squares),
and the second merges a sample's chunks and writes; the predictions are read twice, which is
cheaper than writing eps and reading it back (3 + K reads vs 2 + K reads + 1 write + 1 read).
"""
from __future__ import annotations

import torch

from ._common import (HAS_TRITON, define_op, flat_block, interp_bf16, jit, next_pow2, poison_, tl,
                      triton, use_triton)
from .selfcheck import case

if HAS_TRITON:
    from ._common import fsum, to_out

    @jit
    def _eps_chunk(P, W, RATE, b, offs, mask, s_pr, s_rr, s_wk, s_wb, B, K, cond_row, branch_row,
                   rate_block, rate_inner, HAS_UNCOND: tl.constexpr, HAS_RATE: tl.constexpr):
        """c and eps of sample b at flat offsets `offs` (fp32)."""
        c = tl.load(P + (cond_row + b) * s_pr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_UNCOND:
            u = tl.load(P + b * s_pr + offs, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + b * s_wb)
            if HAS_RATE:
                # the rate map has the sample's shape with one dim of size 1: index it
                idx = (offs // rate_block) * rate_inner + offs % rate_inner
                w = w * tl.load(RATE + b * s_rr + idx, mask=mask, other=0.0).to(tl.float32)
            eps = u + w * (c - u)
        else:
            eps = c
        for k in range(0, K):
            s = tl.load(W + (1 + k) * s_wk + b * s_wb)
            p = tl.load(P + (branch_row + k * B + b) * s_pr + offs, mask=mask,
                        other=0.0).to(tl.float32)
            eps += s * (c - p)
        return c, eps

    @jit
    def _combine(P, W, RATE, Y, STATS, s_pr, s_rr, s_wk, s_wb, s_yr, M, B, K, cond_row, branch_row,
                 rate_block, rate_inner, rescale, n_chunks,
                 HAS_UNCOND: tl.constexpr, HAS_RATE: tl.constexpr, RESCALE: tl.constexpr,
                 STATS_PASS: tl.constexpr, BLOCK: tl.constexpr, CHUNKS_P2: tl.constexpr,
                 INTERP_BF16: tl.constexpr):
        b = tl.program_id(0)
        chunk = tl.program_id(1)
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M
        c, eps = _eps_chunk(P, W, RATE, b, offs, mask, s_pr, s_rr, s_wk, s_wb, B, K, cond_row, branch_row,
                            rate_block, rate_inner, HAS_UNCOND, HAS_RATE)
        if STATS_PASS:
            # per chunk: count, mean and centred sum of squares of c and of eps
            n = fsum(mask.to(tl.float32), 0)
            mean_c = fsum(c, 0) / n
            mean_e = fsum(eps, 0) / n
            dc = tl.where(mask, c - mean_c, 0.0)
            de = tl.where(mask, eps - mean_e, 0.0)
            slot = STATS + (b * n_chunks + chunk) * 5
            tl.store(slot, n)
            tl.store(slot + 1, mean_c)
            tl.store(slot + 2, fsum(dc * dc, 0))
            tl.store(slot + 3, mean_e)
            tl.store(slot + 4, fsum(de * de, 0))
        else:
            if RESCALE:
                # merge the sample's chunks (Chan et al.): M2 = sum M2_i + sum n_i (mean_i - mean)^2
                i = tl.arange(0, CHUNKS_P2)
                valid = i < n_chunks
                slots = STATS + (b * n_chunks + i) * 5
                n_i = tl.load(slots, mask=valid, other=0.0)
                total = fsum(n_i, 0)
                mc_i = tl.load(slots + 1, mask=valid, other=0.0)
                me_i = tl.load(slots + 3, mask=valid, other=0.0)
                mean_c = fsum(n_i * mc_i, 0) / total
                mean_e = fsum(n_i * me_i, 0) / total
                m2_c = fsum(tl.load(slots + 2, mask=valid, other=0.0)
                            + n_i * (mc_i - mean_c) * (mc_i - mean_c), 0)
                m2_e = fsum(tl.load(slots + 4, mask=valid, other=0.0)
                            + n_i * (me_i - mean_e) * (me_i - mean_e), 0)
                # std(c) / std(eps): the (n - 1) of the unbiased estimates cancels
                ratio = tl.where(m2_e > 0, tl.sqrt(m2_c / tl.where(m2_e > 0, m2_e, 1.0)), 1.0)
                eps = eps * (rescale * ratio + (1.0 - rescale))
            tl.store(Y + b * s_yr + offs, to_out(eps, Y.dtype.element_ty, INTERP_BF16), mask=mask)


def _rate_index(rate: torch.Tensor, sample_shape: tuple) -> tuple[int, int]:
    """(rate_block, rate_inner) so that the rate element of flat sample offset e is
    (e // rate_block) * rate_inner + e % rate_inner."""
    shape = tuple(rate.shape[1:])
    if len(shape) != len(sample_shape):
        raise ValueError(f"rate map {tuple(rate.shape)} does not match samples {sample_shape}")
    bcast = [d for d, (a, s) in enumerate(zip(shape, sample_shape)) if a != s]
    if len(bcast) > 1 or any(shape[d] != 1 for d in bcast):
        raise ValueError(f"rate map {tuple(rate.shape)}: one dim of size 1 at most may broadcast "
                         f"against samples {sample_shape}")
    if not bcast:
        return 1, 1
    d = bcast[0]
    inner = 1
    for s in sample_shape[d + 1:]:
        inner *= s
    return inner * sample_shape[d], inner


def _check(out, weights, batch, has_uncond, rate):
    base = 2 * batch if has_uncond else batch
    rows = out.shape[0]
    if batch < 1 or rows < base or (rows - base) % batch:
        raise ValueError(f"guidance_combine: {rows} rows do not fit batch {batch} "
                         f"(uncond rows: {has_uncond})")
    branches = (rows - base) // batch
    if weights.shape not in ((1 + branches,), (1 + branches, batch)):
        raise ValueError(f"guidance_combine: weights must be (1 + {branches},) = [w, s_1..s_K] or "
                         f"(1 + {branches}, {batch}) per sample, got {tuple(weights.shape)}")
    if rate is not None and not has_uncond:
        raise ValueError("guidance_combine: a rate map scales CFG, which needs uncond rows")
    if rate is not None and rate.shape[0] not in (1, batch):
        raise ValueError(f"guidance_combine: rate map {tuple(rate.shape)} for batch {batch}")
    return base, branches


def _triton_impl(out, weights, batch: int, has_uncond: bool, rescale: float, rate) -> torch.Tensor:
    base, branches = _check(out, weights, batch, has_uncond, rate)
    sample_shape = tuple(out.shape[1:])
    p = out.reshape(out.shape[0], -1)
    p = p if p.stride(-1) == 1 else p.contiguous()
    m = p.shape[1]
    y = poison_(out.new_empty((batch,) + sample_shape))
    if y.numel() == 0:
        return y
    w = weights.to(torch.float32).contiguous()
    s_wk, s_wb = (w.shape[1], 1) if w.dim() == 2 else (1, 0)
    rate_block, rate_inner, s_rr = 1, 1, 0
    if rate is not None:
        rate_block, rate_inner = _rate_index(rate, sample_shape)
        rate = rate.reshape(rate.shape[0], -1)
        rate = rate if rate.stride(-1) == 1 else rate.contiguous()
        s_rr = rate.stride(0) if rate.shape[0] != 1 else 0
    block = flat_block(out.device)
    n_chunks = triton.cdiv(m, block)
    stats = poison_(out.new_empty((batch * n_chunks * 5,), dtype=torch.float32))
    args = (p, w, rate if rate is not None else w, y, stats, p.stride(0), s_rr, s_wk, s_wb, m, m, batch,
            branches, batch if has_uncond else 0, base, rate_block, rate_inner, float(rescale),
            n_chunks)
    meta = dict(HAS_UNCOND=has_uncond, HAS_RATE=rate is not None, RESCALE=rescale > 0,
                BLOCK=block, CHUNKS_P2=max(2, next_pow2(n_chunks)),
                INTERP_BF16=interp_bf16(out.dtype), num_warps=4)
    if rescale > 0:
        torch.library.wrap_triton(_combine)[(batch, n_chunks)](*args, STATS_PASS=True, **meta)
    torch.library.wrap_triton(_combine)[(batch, n_chunks)](*args, STATS_PASS=False, **meta)
    return y


def _torch_impl(out, weights, batch: int, has_uncond: bool, rescale: float, rate) -> torch.Tensor:
    base, branches = _check(out, weights, batch, has_uncond, rate)
    acc = torch.promote_types(out.dtype, torch.float32)
    # per-sample weights (1 + K, B): column b weights sample b
    w = weights.to(acc) if weights.dim() == 1 else weights.to(acc).reshape(*weights.shape, *[1] * (out.dim() - 1))
    c = out[base - batch: base].to(acc)
    if has_uncond:
        u = out[:batch].to(acc)
        scale = w[0] if rate is None else w[0] * rate.to(acc)
        eps = u + scale * (c - u)
    else:
        eps = c.clone()   # a custom op's output must not alias its input (no branches: eps is c)
    for k in range(branches):
        eps = eps + w[1 + k] * (c - out[base + k * batch: base + (k + 1) * batch].to(acc))
    if rescale > 0:
        dims = tuple(range(1, eps.dim()))
        std_c, std_e = c.std(dim=dims, keepdim=True), eps.std(dim=dims, keepdim=True)
        ratio = torch.where(std_e > 0, std_c / torch.where(std_e > 0, std_e, 1.0), 1.0)
        eps = rescale * (eps * ratio) + (1 - rescale) * eps
    return eps.to(out.dtype).contiguous()


@torch.library.custom_op("guidance_rt::guidance_combine_torch", mutates_args=())
def guidance_combine_torch(out: torch.Tensor, weights: torch.Tensor, batch: int, has_uncond: bool,
                           rescale: float, rate: torch.Tensor | None) -> torch.Tensor:
    return _torch_impl(out, weights, batch, has_uncond, rescale, rate)


@guidance_combine_torch.register_fake
def _(out, weights, batch, has_uncond, rescale, rate):
    return out.new_empty((batch,) + tuple(out.shape[1:]))


@define_op("guidance_rt::guidance_combine", mutates_args=())
def guidance_combine_op(out: torch.Tensor, weights: torch.Tensor, batch: int, has_uncond: bool,
                        rescale: float, rate: torch.Tensor | None) -> torch.Tensor:
    if use_triton(out, "guidance_combine"):
        return _triton_impl(out, weights, batch, has_uncond, rescale, rate)
    return guidance_combine_torch(out, weights, batch, has_uncond, rescale, rate)


@case("guidance_combine")
def _check_inputs(dtype, device):
    """CFG with an S-CFG rate map, one branch and rescale (both passes); per-sample scales
    without uncond rows. Samples just over two chunks long."""
    g = torch.Generator().manual_seed(0)
    shape = (3, 7, 2 * flat_block(device) // 21 + 1)
    out = torch.randn(6, *shape, generator=g).to(dtype)
    rate = (0.5 + torch.rand(2, 1, *shape[1:], generator=g)).to(dtype)
    per_sample = torch.tensor([[0.0, 0.0, 0.0], [2.0, -1.0, 0.5]])      # [w (unused), s_1] x B
    return [(out, torch.tensor([5.0, 2.0]), 2, True, 0.7, rate),
            (out, per_sample, 3, False, 0.0, None)]


def guidance_combine(out: torch.Tensor, weights: torch.Tensor, batch: int, has_uncond: bool,
                     rescale: float = 0.0, rate: torch.Tensor | None = None) -> torch.Tensor:
    """The guidance formula over the packed rows (see the module docstring)."""
    _check(out, weights, batch, has_uncond, rate)
    return guidance_combine_op(out, weights, int(batch), bool(has_uncond), float(rescale), rate)


def combine_weights(cfg_scale, scales, device) -> torch.Tensor:
    """[w, s_1, ..., s_K] as the fp32 device tensor guidance_combine takes: (1 + K,), or
    (1 + K, B) when any of them is a list with one value per sample (numbers are repeated).
    Builds a new tensor (a host-to-device copy): cache it per step configuration when capturing
    graphs."""
    values = [cfg_scale, *scales]
    batch = max((len(v) for v in values if isinstance(v, (list, tuple))), default=None)
    if batch is None:
        return torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)
    return torch.tensor([[float(x) for x in v] if isinstance(v, (list, tuple)) else [float(v)] * batch
                         for v in values], dtype=torch.float32, device=device)
