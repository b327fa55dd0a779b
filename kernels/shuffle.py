"""TPG's token shuffle (methods.md 4): a gather along the token axis with device permutations.

    y = token_shuffle(x, perms, table, tok_lo=0)

x: (R, N, C); perms: (T, P) int64 on the device, each row a permutation of 0 .. P-1 (the
caller draws them, e.g. from the user's generator at the start of a step, so nothing inside a
step touches host randomness and a step can be captured in a CUDA graph); table: (R,) int, the
permutation row each packed row uses, or -1 for rows that are not shuffled. Tokens
[tok_lo, tok_lo + P) are the image tokens:

    y[r, tok_lo + n] = x[r, tok_lo + perms[table[r], n]]    (table[r] >= 0, 0 <= n < P)
    y[r, t]          = x[r, t]                              (every other token and row)

Returns a new contiguous (R, N, C) tensor. One kernel, `_token_shuffle`: a (tokens x channels)
tile per program, each token's source row read contiguously along the channels.
"""
from __future__ import annotations

import torch

from ._common import HAS_TRITON, define_op, jit, next_pow2, poison_, tl, triton, use_triton
from .selfcheck import case

if HAS_TRITON:

    @jit
    def _token_shuffle(X, Y, PERM, TABLE, s_xr, s_xn, s_xc, s_yr, s_yn, s_pt, N, C, tok_lo, P,
                       BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        r = tl.program_id(0)
        offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (offs_t < N)[:, None] & (offs_c < C)[None, :]
        perm_row = tl.load(TABLE + r).to(tl.int64)
        # (the scalar test is broadcast first: the interpreter rejects scalar & vector masks)
        shuffled = ((perm_row + 0 * offs_t) >= 0) & (offs_t >= tok_lo) & (offs_t < tok_lo + P)
        src = tl.load(PERM + perm_row * s_pt + (offs_t - tok_lo), mask=shuffled, other=0)
        src_t = tl.where(shuffled, tok_lo + src, offs_t)
        x = tl.load(X + r * s_xr + src_t[:, None] * s_xn + offs_c[None, :] * s_xc, mask=mask)
        tl.store(Y + r * s_yr + offs_t[:, None] * s_yn + offs_c[None, :], x, mask=mask)


def _triton_impl(x: torch.Tensor, perms: torch.Tensor, table: torch.Tensor, tok_lo: int) -> torch.Tensor:
    rows, n, c = x.shape
    y = poison_(torch.empty_like(x, memory_format=torch.contiguous_format))
    if y.numel() == 0:
        return y
    block_t, block_c = (16, 16) if x.device.type != "cuda" else (32, min(256, max(16, next_pow2(c))))
    grid = (rows, triton.cdiv(n, block_t), triton.cdiv(c, block_c))
    torch.library.wrap_triton(_token_shuffle)[grid](
        x, y, perms, table, *x.stride(), y.stride(0), y.stride(1), perms.stride(0), n, c, tok_lo,
        perms.shape[1], BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4)
    return y


def _torch_impl(x: torch.Tensor, perms: torch.Tensor, table: torch.Tensor, tok_lo: int) -> torch.Tensor:
    rows, n, c = x.shape
    p = perms.shape[1]
    # one source token index per (row, token): identity, or the row's permutation on the image
    src = torch.arange(n, device=x.device).expand(rows, n).clone()
    rows_perm = perms.index_select(0, table.clamp_min(0).long()) + tok_lo      # (R, P)
    shuffled = (table >= 0).view(-1, 1)
    src[:, tok_lo: tok_lo + p] = torch.where(shuffled, rows_perm, src[:, tok_lo: tok_lo + p])
    return x.gather(1, src.unsqueeze(-1).expand(rows, n, c)).contiguous()


@torch.library.custom_op("guidance_rt::token_shuffle_torch", mutates_args=())
def token_shuffle_torch(x: torch.Tensor, perms: torch.Tensor, table: torch.Tensor,
                        tok_lo: int) -> torch.Tensor:
    return _torch_impl(x, perms, table, tok_lo)


@token_shuffle_torch.register_fake
def _(x, perms, table, tok_lo):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@define_op("guidance_rt::token_shuffle", mutates_args=())
def token_shuffle_op(x: torch.Tensor, perms: torch.Tensor, table: torch.Tensor,
                     tok_lo: int) -> torch.Tensor:
    if use_triton(x, "token_shuffle"):
        return _triton_impl(x, perms, table, tok_lo)
    return token_shuffle_torch(x, perms, table, tok_lo)


@case("token_shuffle")
def _check_inputs(dtype, device):
    """Shuffled and copied rows, image tokens between text tokens, over several token tiles."""
    g = torch.Generator().manual_seed(0)
    n, tok_lo = 45, 4
    x = torch.randn(3, n, 37, generator=g).to(dtype)
    perms = torch.stack([torch.randperm(n - tok_lo - 3, generator=g) for _ in range(2)])
    return [(x, perms, torch.tensor([-1, 1, 0]), tok_lo)]


def token_shuffle(x: torch.Tensor, perms: torch.Tensor, table: torch.Tensor,
                  tok_lo: int = 0) -> torch.Tensor:
    """TPG token shuffle (see the module docstring)."""
    if x.dim() != 3 or perms.dim() != 2 or table.shape != (x.shape[0],):
        raise ValueError(f"token_shuffle: x {tuple(x.shape)}, perms {tuple(perms.shape)}, "
                         f"table {tuple(table.shape)}")
    if tok_lo < 0 or tok_lo + perms.shape[1] > x.shape[1]:
        raise ValueError(f"token_shuffle: {perms.shape[1]} tokens at {tok_lo} exceed {x.shape[1]}")
    return token_shuffle_op(x, perms, table, int(tok_lo))
