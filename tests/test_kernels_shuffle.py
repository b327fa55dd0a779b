"""guidance_rt::token_shuffle against an explicit reference loop (methods.md 4): shuffled and
unshuffled rows mixed, two permutation tables, image tokens between text tokens, odd sizes,
strided input, poisoned output. A copy is exact, so every dtype must match bit for bit.
"""
from __future__ import annotations

import pytest
import torch

from .test_kernels_common import DEVICE, DTYPES, triton_run

from guidance_rt.kernels import token_shuffle  # noqa: E402


def reference(x, perms, table, tok_lo):
    y = x.clone()
    for r, t in enumerate(table.tolist()):
        if t >= 0:
            for n, src in enumerate(perms[t].tolist()):
                y[r, tok_lo + n] = x[r, tok_lo + src]
    return y


def inputs(dtype, rows=5, n=37, c=20, p=29, tok_lo=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, 2 * c, generator=g)[:, :, 1::2].to(dtype).to(DEVICE)   # strided
    perms = torch.stack([torch.randperm(p, generator=g) for _ in range(2)]).to(DEVICE)
    table = torch.tensor([-1, 0, 1, -1, 0][:rows], dtype=torch.int32, device=DEVICE)
    return x, perms, table, tok_lo


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shuffle(dtype):
    x, perms, table, tok_lo = inputs(dtype)
    with triton_run():
        y = token_shuffle(x, perms, table, tok_lo)
    assert torch.equal(y.cpu(), reference(x.cpu(), perms.cpu(), table.cpu(), tok_lo))
    assert y.is_contiguous()
    assert not torch.equal(y[1], x[1])          # the shuffle did something


def test_whole_sequence_and_pytorch_path():
    x, perms, table, _ = inputs(torch.float32, n=29, tok_lo=0)
    ref = reference(x.cpu(), perms.cpu(), table.cpu(), 0)
    with triton_run():
        assert torch.equal(token_shuffle(x, perms, table).cpu(), ref)
    assert torch.equal(token_shuffle(x.cpu(), perms.cpu(), table.cpu().long()), ref)
