"""guidance_rt::gather_rows / scatter_rows: non-contiguous row subsets of the packed batch
(SLG-skipped rows in the middle), exact copies, poisoned outputs, 4-D and 3-D rows, strided x.
"""
from __future__ import annotations

import pytest
import torch

from .test_kernels_common import DEVICE, DTYPES, triton_run

from guidance_rt.kernels import gather_rows, scatter_rows  # noqa: E402


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 3, 5, 9), (6, 37, 11)], ids=["unet", "dit"])
def test_gather_scatter(dtype, shape):
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=g).to(dtype).to(DEVICE)
    index = torch.tensor([0, 1, 2, 5], device=DEVICE)           # rows 3, 4 skip the block
    src = torch.randn(4, *shape[1:], generator=g).to(dtype).to(DEVICE)
    with triton_run():
        y = gather_rows(x, index)
        z = scatter_rows(x, index, src)
    assert torch.equal(y.cpu(), x.cpu()[index.cpu()])
    ref = x.cpu().clone()
    ref[index.cpu()] = src.cpu()
    assert torch.equal(z.cpu(), ref)
    assert torch.equal(gather_rows(x.cpu(), index.cpu()), x.cpu()[index.cpu()])
    assert torch.equal(scatter_rows(x.cpu(), index.cpu(), src.cpu()), ref)


def test_strided_rows():
    x = torch.randn(5, 8, 6, device=DEVICE)[:, ::2]              # rows not dense: one copy
    index = torch.tensor([4, 0], device=DEVICE)
    with triton_run():
        y = gather_rows(x, index)
        z = scatter_rows(x, index, y * 2)
    assert torch.equal(y.cpu(), x.cpu()[[4, 0]])
    ref = x.cpu().clone()
    ref[[4, 0]] = x.cpu()[[4, 0]] * 2
    assert torch.equal(z.cpu(), ref)
