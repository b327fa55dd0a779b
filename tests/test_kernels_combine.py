"""guidance_rt::guidance_combine against a float64 reference written from methods.md 1 and 7:
CFG on and off, several branches, CFG rescale (unbiased per-sample std), S-CFG rate maps for
(C, H, W) and (N, C) predictions, batch > 1, per-sample scales, odd sizes, poisoned output and
scratch.
"""
from __future__ import annotations

import pytest
import torch

from .test_kernels_common import DEVICE, DTYPES, check, triton_run

from guidance_rt.kernels import combine_weights, guidance_combine  # noqa: E402


def reference(out, w, scales, batch, has_uncond, rescale, rate, dtype=torch.float64):
    """w and every scale: a number, or a list with one per sample."""
    out = out.to(dtype)
    base = 2 * batch if has_uncond else batch
    res = []
    for b in range(batch):
        pick = lambda v: v[b] if isinstance(v, list) else v
        w_b, scales_b = pick(w), [pick(s) for s in scales]
        c = out[base - batch + b]
        if has_uncond:
            u = out[b]
            scale = w_b if rate is None else w_b * rate[b if rate.shape[0] > 1 else 0].to(dtype)
            eps = u + scale * (c - u)
        else:
            eps = c.clone()
        for k, s in enumerate(scales_b):
            eps = eps + s * (c - out[base + k * batch + b])
        if rescale > 0:
            n = c.numel()
            std = lambda t: ((t - t.mean()) ** 2).sum().div(n - 1).sqrt()
            eps = rescale * eps * std(c) / std(eps) + (1 - rescale) * eps
        res.append(eps)
    return torch.stack(res).to(dtype)


CASES = {
    "cfg+2": dict(shape=(4, 9, 7), batch=2, has_uncond=True, scales=[3.0, -1.5], rescale=0.0, rate=None),
    "nocfg+1": dict(shape=(37, 5), batch=1, has_uncond=False, scales=[2.5], rescale=0.0, rate=None),
    "cfg-only-rescale": dict(shape=(4, 13, 11), batch=2, has_uncond=True, scales=[], rescale=0.7, rate=None),
    "cfg+1-rescale": dict(shape=(3, 33, 35), batch=1, has_uncond=True, scales=[3.0], rescale=0.5, rate=None),
    "scfg-chw": dict(shape=(4, 6, 5), batch=2, has_uncond=True, scales=[1.0], rescale=0.0, rate=(2, 1, 6, 5)),
    "scfg-nc": dict(shape=(29, 8), batch=2, has_uncond=True, scales=[], rescale=0.3, rate=(2, 29, 1)),
    # per-sample scales (grids): a (1 + K, B) weight table
    "per-sample": dict(shape=(3, 7, 9), batch=3, has_uncond=True, w=[5.0, 1.0, 8.5],
                       scales=[[3.0, 0.0, -1.0], 1.5], rescale=0.4, rate=None),
    "per-sample-scfg": dict(shape=(4, 5, 5), batch=2, has_uncond=True, w=[2.0, 7.5], scales=[[1.0, 2.0]],
                            rescale=0.0, rate=(2, 1, 5, 5)),
    "per-sample-nocfg": dict(shape=(37, 5), batch=2, has_uncond=False, scales=[[2.5, 0.5], [0.0, 1.0]],
                             rescale=0.0, rate=None),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_combine(dtype, case):
    cfg = CASES[case]
    batch, has_uncond, scales = cfg["batch"], cfg["has_uncond"], cfg["scales"]
    rows = batch * ((2 if has_uncond else 1) + len(scales))
    g = torch.Generator().manual_seed(len(case))
    out = torch.randn(rows, *cfg["shape"], generator=g).to(dtype).to(DEVICE)
    rate = None
    if cfg["rate"] is not None:
        rate = (0.8 + 2.2 * torch.rand(*cfg["rate"], generator=g)).to(DEVICE)
    w = cfg.get("w", 5.0)
    weights = combine_weights(w, scales, DEVICE)
    with triton_run():
        eps = guidance_combine(out, weights, batch, has_uncond, cfg["rescale"], rate)
    args = (out.cpu(), w, scales, batch, has_uncond, cfg["rescale"], None if rate is None else rate.cpu())
    assert eps.shape == (batch,) + cfg["shape"] and eps.dtype == dtype
    check(eps.cpu(), reference(*args), reference(*args, dtype=dtype), what=f"{case} {dtype}")


@pytest.mark.parametrize("case", list(CASES))
def test_pytorch_path_matches_reference(case):
    cfg = CASES[case]
    batch, has_uncond, scales = cfg["batch"], cfg["has_uncond"], cfg["scales"]
    rows = batch * ((2 if has_uncond else 1) + len(scales))
    out = torch.randn(rows, *cfg["shape"], dtype=torch.float32)
    rate = None if cfg["rate"] is None else 0.8 + torch.rand(*cfg["rate"])
    w = cfg.get("w", 5.0)
    eps = guidance_combine(out, combine_weights(w, scales, "cpu"), batch, has_uncond, cfg["rescale"], rate)
    check(eps, reference(out, w, scales, batch, has_uncond, cfg["rescale"], rate))


def test_runtime_combine_matches_reference():
    """guidance_rt.combine.combine (the runtime's entry to this op) for a real plan layout: CFG,
    two branches, rescale, plain and per-sample scales."""
    import guidance_rt as grt
    from guidance_rt.combine import combine
    from types import SimpleNamespace
    batch = 2
    plan = SimpleNamespace(batch=batch, has_uncond=True, cond_rows=slice(2, 4),
                           branch_rows=lambda k: slice(4 + 2 * k, 6 + 2 * k))
    out = torch.randn(8, 4, 6, 6, dtype=torch.float32)
    cfg = grt.CFG(scale=4.0, rescale=0.6)
    for w, scales in ((4.0, (3.0, 1.5)), ([4.0, 6.0], (3.0, [1.5, 0.0]))):
        args = (out, w, scales, batch, True, 0.6, None)
        check(combine(out, plan, cfg, combine_weights(w, scales, "cpu"), w), reference(*args), reference(*args, dtype=out.dtype),
              what=f"w {w}, scales {scales}")


def test_rejects_bad_layouts():
    out = torch.zeros(5, 3)
    with pytest.raises(ValueError):
        guidance_combine(out, torch.ones(2), 2, True)           # 5 rows, batch 2
    with pytest.raises(ValueError):
        guidance_combine(torch.zeros(6, 3), torch.ones(3), 2, True)   # K = 1: weights (2,)
    with pytest.raises(ValueError, match=r"\(1 \+ 1, 2\) per sample"):
        guidance_combine(torch.zeros(6, 3), torch.ones(2, 3), 2, True)   # per sample: (2, 2)
    with pytest.raises(ValueError):
        guidance_combine(torch.zeros(4, 3, 2), torch.ones(2), 2, False, rate=torch.ones(2, 3, 2))
