"""The guidance_rt ops as torch ops: torch.library.opcheck on each (schema, fake tensor, AOT
dispatch), and one function calling every op compiled with torch.compile(fullgraph=True).
"""
from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from .test_kernels_common import triton_run

import guidance_rt.kernels as K  # noqa: E402

R, H, N, D = 3, 2, 12, 8


def _args():
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)
    q, k, v = (rnd(R, N, H, D).transpose(1, 2) for _ in range(3))
    kn, vn = (rnd(R, 5, H, D).transpose(1, 2) for _ in range(2))
    return dict(
        q=q, k=k, v=v, kn=kn, vn=vn,
        mode=torch.tensor([K.NORMAL, K.IDENTITY, K.MEAN], dtype=torch.int32),
        beta=torch.full((R,), 0.5), head_mask=torch.ones(R, H, dtype=torch.bool),
        key_mask=torch.arange(N).expand(R, N) != torch.tensor([[0], [1], [N]]),   # text keys 0, 1
        x=rnd(R, N, H * D), perms=torch.stack([torch.randperm(N - 2, generator=g)]),
        table=torch.tensor([-1, 0, -1]), index=torch.tensor([0, 2]),
        preds=rnd(3, 4, 5), weights=torch.tensor([5.0, 2.0]), rate=0.8 + rnd(1, 4, 1).abs())


def _op_cases():
    a = _args()
    ops = torch.ops.guidance_rt
    return {
        "variant_attention": (ops.variant_attention, (a["q"], a["k"], a["v"], a["mode"], a["beta"],
                                                      a["head_mask"], 2, N)),
        "variant_attention_kmask": (ops.variant_attention, (a["q"], a["k"], a["v"], a["mode"], a["beta"],
                                                            a["head_mask"], 2, N, a["key_mask"])),
        "query_blur": (ops.query_blur, (a["x"], 2, 5, 1.0, 1)),
        "query_blur_mean": (ops.query_blur, (a["x"], 2, 5, 1e7, 1)),
        "nag_attention": (ops.nag_attention, (a["q"], a["k"], a["v"], a["kn"], a["vn"], 3.0, 2.5, 0.5, 1)),
        "nag_combine": (ops.nag_combine, (a["x"], a["x"].flip(1), 3.0, 2.5, 0.5, 2)),
        "token_shuffle": (ops.token_shuffle, (a["x"], a["perms"], a["table"], 2)),
        "gather_rows": (ops.gather_rows, (a["x"], a["index"])),
        "scatter_rows": (ops.scatter_rows, (a["x"], a["index"], a["x"][:2] * 2)),
        "guidance_combine": (ops.guidance_combine, (a["preds"], a["weights"], 1, True, 0.5, a["rate"])),
    }


@pytest.mark.parametrize("name", list(_op_cases()))
def test_opcheck(name):
    op, args = _op_cases()[name]
    opcheck(op, args)                                               # the public triton_op
    op_name = name.replace("_mean", "").replace("_kmask", "")
    opcheck(getattr(torch.ops.guidance_rt, op_name + "_torch"), args)   # its PyTorch op


@pytest.mark.parametrize("name", ["variant_attention", "variant_attention_kmask"])
def test_opcheck_with_triton_kernels(name):
    """The same checks while eager calls run the Triton kernels (interpreted on CPU)."""
    op, args = _op_cases()[name]
    with triton_run():
        opcheck(op, args)


def _step(q, k, v, kn, vn, mode, beta, head_mask, key_mask, x, perms, table, index, preds, weights, rate):
    xb = K.query_blur(x, 2, 5, 1.0, 1)
    xs = K.token_shuffle(xb, perms, table, 2)
    qb = K.nag_combine(xs, xb, 3.0, 2.5, 0.5).view(R, N, H, D).transpose(1, 2)
    o = K.variant_attention(qb, k, v, mode, beta, head_mask, (2, N))
    o = o + K.variant_attention(qb, k, v, mode, beta, head_mask, (2, N), key_mask)
    z = K.nag_attention(qb, k, v, kn, vn, 3.0, 2.5, 0.5)
    g = K.gather_rows(o + z, index)
    s = K.scatter_rows(o, index, g * 2)
    return K.guidance_combine(preds * s.mean(), weights, 1, True, 0.5, rate)


def test_compiles_without_graph_breaks():
    """fullgraph=True fails on any graph break. aot_eager runs Dynamo and AOTAutograd (fake
    tensors, functionalisation, the triton_op decomposition) without compiling C++; Inductor on
    this CPU also works (about 30 s on 2 cores, so not run here)."""
    import torch._dynamo
    a = _args()
    eager = _step(**a)
    torch._dynamo.reset()
    compiled = torch.compile(_step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(**a), eager)
    explained = torch._dynamo.explain(_step)(**a)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
