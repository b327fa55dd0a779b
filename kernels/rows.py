"""Row subsets of the packed batch, for blocks that only some rows run (SLG skips, forks).

The plan orders rows so that the rows running a block are contiguous whenever it can, and then
no kernel is needed: `x[lo:hi]` is a view and the block writes its rows of a preallocated output
through another view. When they are not contiguous:

    y = gather_rows(x, index)          y[i] = x[index[i]]
    z = scatter_rows(x, index, src)    z = x with z[index[i]] = src[i]   (out of place)

x: (R, ...) and src: (len(index), ...) with the same trailing shape; index: (n,) int on the
device, unique entries (for scatter_rows). Both return new contiguous tensors and read and write
every element once: scatter_rows first inverts the index on the device (R ints), so one pass
writes each output row from either x or src, instead of a clone followed by an index_copy.
"""
from __future__ import annotations

import torch

from ._common import HAS_TRITON, define_op, flat_block, jit, poison_, tl, triton, use_triton
from .selfcheck import case

if HAS_TRITON:

    @jit
    def _copy_rows(X, SRC, Y, ROW_OF, s_xr, s_sr, s_yr, M, BLOCK: tl.constexpr):
        """Y[i] = SRC[ROW_OF[i]] if ROW_OF[i] >= 0 else X[i] (gather: X unused, ROW_OF >= 0)."""
        i = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M
        j = tl.load(ROW_OF + i).to(tl.int64)
        from_src = (j + 0 * offs) >= 0      # a vector: the interpreter rejects scalar & vector
        v = tl.load(SRC + j * s_sr + offs, mask=mask & from_src, other=0.0)
        v = tl.where(from_src, v, tl.load(X + i * s_xr + offs, mask=mask & ~from_src, other=0.0))
        tl.store(Y + i * s_yr + offs, v, mask=mask)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(R, M) with unit element stride: a view whenever each row is dense."""
    flat = x.reshape(x.shape[0], -1)
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def _launch(x2, src2, y2, row_of):
    rows, m = y2.shape
    if y2.numel() == 0:
        return
    block = flat_block(y2.device)
    torch.library.wrap_triton(_copy_rows)[(rows, triton.cdiv(m, block))](
        x2, src2, y2, row_of, x2.stride(0), src2.stride(0), y2.stride(0), m,
        BLOCK=block, num_warps=4)


def _inverse(index: torch.Tensor, rows: int) -> torch.Tensor:
    """row_of[r] = i where index[i] == r, else -1 (device ops only: no sync, graph-safe)."""
    inv = torch.full((rows,), -1, dtype=torch.int64, device=index.device)
    return inv.scatter(0, index.long(), torch.arange(index.numel(), device=index.device))


# ---------------------------------------------------------------- gather


@torch.library.custom_op("guidance_rt::gather_rows_torch", mutates_args=())
def gather_rows_torch(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.index_select(0, index.long()).contiguous()


@gather_rows_torch.register_fake
def _(x, index):
    return x.new_empty((index.shape[0],) + tuple(x.shape[1:]))


@define_op("guidance_rt::gather_rows", mutates_args=())
def gather_rows_op(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if not use_triton(x, "gather_rows"):
        return gather_rows_torch(x, index)
    y = poison_(x.new_empty((index.shape[0],) + tuple(x.shape[1:])))
    x2 = _flat(x)
    _launch(x2, x2, y.view(index.shape[0], -1), index.long())
    return y


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """y[i] = x[index[i]] (see the module docstring)."""
    if index.dim() != 1:
        raise ValueError("gather_rows: index must be 1-D")
    return gather_rows_op(x, index)


# ---------------------------------------------------------------- scatter


@torch.library.custom_op("guidance_rt::scatter_rows_torch", mutates_args=())
def scatter_rows_torch(x: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return x.contiguous().index_copy(0, index.long(), src.to(x.dtype))


@scatter_rows_torch.register_fake
def _(x, index, src):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@define_op("guidance_rt::scatter_rows", mutates_args=())
def scatter_rows_op(x: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    if not use_triton(x, "scatter_rows"):
        return scatter_rows_torch(x, index, src)
    y = poison_(torch.empty_like(x, memory_format=torch.contiguous_format))
    x2, s2 = _flat(x), _flat(src.to(x.dtype))
    _launch(x2, s2, y.view(x.shape[0], -1), _inverse(index, x.shape[0]))
    return y


def scatter_rows(x: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """x with rows index[i] replaced by src[i], out of place (see the module docstring)."""
    if index.dim() != 1 or src.shape[0] != index.shape[0] or src.shape[1:] != x.shape[1:]:
        raise ValueError(f"scatter_rows: x {tuple(x.shape)}, index {tuple(index.shape)}, "
                         f"src {tuple(src.shape)}")
    return scatter_rows_op(x, index, src)


def _check_x(dtype, device):
    """Rows just over two blocks long."""
    n = 2 * flat_block(device) // 3 + 1
    return torch.randn(6, 3, n, generator=torch.Generator().manual_seed(0)).to(dtype)


@case("gather_rows")
def _check_gather(dtype, device):
    return [(_check_x(dtype, device), torch.tensor([4, 0, 5]))]


@case("scatter_rows")
def _check_scatter(dtype, device):
    x = _check_x(dtype, device)
    return [(x, torch.tensor([5, 1, 2]), x[:3].flip(0) * 2)]
