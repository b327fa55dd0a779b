"""ops.joint_nag_attention, the joint (MM-DiT) attention with NAG of SD3, FLUX, FLUX.2 and
Qwen-Image double blocks, against a float64 reference written from methods.md 5: every row
attends its whole [image, text] sequence; a positive row's image queries give Zp (image + text
keys) and Zn (image + negative text keys), blended per token; the negative text's queries attend
[negative text, image]. Both token orders, text key masks, and both code paths: image keys scored
once (plain rows) and the full negative attention (variant rows, forced here with NORMAL-mode
tables, which attend plainly). The FLOP count shows the image keys scored once.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from .test_kernels_nag import blend_reference
from .tolerance import assert_close

import guidance_rt.kernels as K  # noqa: E402
from guidance_rt import ops  # noqa: E402
from guidance_rt.bench.flops import _cpu_sdpa_flops  # noqa: E402

R, PS, H, D, N_IMG, N_TXT, N_NEG = 4, 1, 3, 16, 29, 7, 5
STEP = SimpleNamespace(phi=4.0, tau=2.5, alpha=0.25, norm=1)


def attend(q, k, v, keep=None):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if keep is not None:
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.softmax(s, -1) @ v


def reference(q, k, v, image, text, negative, text_mask, neg_mask):
    """float64; image / text: index tensors of the sequence's tokens."""
    q, k, v = q.double(), k.double(), v.double()
    nq, nk, nv = (t.double() for t in negative)
    keep = torch.ones(R, q.shape[2], dtype=torch.bool)
    if text_mask is not None:
        keep[:, text] = text_mask
    o = attend(q, k, v, keep)
    neg_keep = torch.cat([neg_mask if neg_mask is not None else torch.ones(R - PS, N_NEG, dtype=torch.bool),
                          torch.ones(R - PS, N_IMG, dtype=torch.bool)], 1)
    cat = lambda a, b: torch.cat([a, b[PS:][:, :, image]], 2)
    zn = attend(q[PS:][:, :, image], cat(nk, k), cat(nv, v), neg_keep)
    zp = o[PS:][:, :, image]
    heads_last = lambda t: t.transpose(1, 2).flatten(2)
    guided = blend_reference(heads_last(zp), heads_last(zn), STEP.phi, STEP.tau, STEP.alpha, STEP.norm)
    o[PS:, :, image] = guided.unflatten(-1, (H, D)).transpose(1, 2)
    return o, attend(nq, cat(nk, k), cat(nv, v), neg_keep)


def inputs(image_first: bool, masked: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda r, n: torch.randn(r, n, H, D, generator=g).transpose(1, 2)
    n = N_IMG + N_TXT
    q, k, v = rnd(R, n), rnd(R, n), rnd(R, n)
    negative = (rnd(R - PS, N_NEG), rnd(R - PS, N_NEG), rnd(R - PS, N_NEG))
    image = slice(0, N_IMG) if image_first else slice(N_TXT, None)
    text = torch.arange(N_IMG, n) if image_first else torch.arange(N_TXT)
    text_mask = neg_mask = None
    if masked:   # rows pad their texts differently; the negative text of row 2 keeps one token
        text_mask = torch.ones(R, N_TXT, dtype=torch.bool)
        text_mask[1, 5:], text_mask[3, 2:] = False, False
        neg_mask = torch.ones(R - PS, N_NEG, dtype=torch.bool)
        neg_mask[1, 1:] = False
    return q, k, v, image, text, negative, text_mask, neg_mask


def normal_runs(rows):
    """Variant-attention runs whose rows all attend plainly (NORMAL mode): the full-attention path."""
    return ((0, rows, (torch.full((rows,), K.NORMAL, dtype=torch.int32), torch.ones(rows),
                       torch.ones(rows, H, dtype=torch.bool))),)


@pytest.mark.parametrize("image_first", [True, False], ids=["image-text", "text-image"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("path", ["shared", "full"])
def test_joint_nag_attention(image_first, masked, path):
    q, k, v, image, text, negative, text_mask, neg_mask = inputs(image_first, masked, seed=7)
    runs, nag_runs = ((), ()) if path == "shared" else (normal_runs(R), normal_runs(R - PS))
    o, o_neg = ops.joint_nag_attention(q, k, v, image, runs, PS, negative, nag_runs, STEP, text_mask, neg_mask)
    ref, ref_neg = reference(q, k, v, image, text, negative, text_mask, neg_mask)
    plain = attend(q.double(), k.double(), v.double())
    assert_close(o, ref, effect=(ref - plain)[PS:], what=f"{path} output")
    assert_close(o_neg, ref_neg, what=f"{path} negative text output")


def test_shared_path_scores_the_image_keys_once():
    """FLOPs of the shared path: every row's attention once (uncond rows whole, positive rows'
    text queries and image queries over [image, text]), plus only the image queries against the
    negative text and the negative text's queries; the full path adds the image-image scores again."""
    q, k, v, image, _, negative, _, _ = inputs(False, False, seed=3)
    per_pair = 2 * H * (D + D)             # torch's SDPA count per (query, key) pair
    n = N_IMG + N_TXT
    expected = per_pair * (R * n * n + (R - PS) * (N_IMG * N_NEG + N_NEG * (N_NEG + N_IMG)))
    counts = {}
    for path, runs in (("shared", ((), ())), ("full", (normal_runs(R), normal_runs(R - PS)))):
        with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_flops()) as counter:
            ops.joint_nag_attention(q, k, v, image, runs[0], PS, negative, runs[1], STEP)
        counts[path] = counter.get_total_flops()
    assert counts["shared"] == expected
    assert counts["full"] - counts["shared"] == per_pair * (R - PS) * N_IMG * N_IMG
