"""guidance_rt::variant_attention against a float64 reference written from methods.md 2-3.

Every mode mixed in one packed batch (NORMAL, IDENTITY, SOFT with a head subset, MEAN), with
plain self-attention and with a joint [text, image, text] token layout; odd token counts and head
dims (not block multiples), one and several heads, fp32/fp16/bf16, strided (R, N, H, d) inputs,
poisoned outputs and scratch; key masks on the text keys in every mode.
"""
from __future__ import annotations

import math

import pytest
import torch

from .test_kernels_common import DEVICE, DTYPES, check, triton_run
from .tolerance import FORMULA_ULPS, tolerance

from guidance_rt.kernels import IDENTITY, MEAN, NORMAL, SOFT, variant_attention  # noqa: E402

MODES = [NORMAL, IDENTITY, SOFT, MEAN, SOFT, IDENTITY, NORMAL]


def reference(q, k, v, mode, beta, head_mask, image, dtype=torch.float64, key_mask=None):
    """Explicit attention maps. PAG's map: image query i may see key j iff j is not an image key,
    or j == i (methods.md 2; diffusers' MM-DiT form); with no text that is the identity. SOFT:
    (1 - beta) A + beta A_pag on the selected heads. MEAN rows: plain attention (their image
    queries were made identical by the test, as the op's contract asks). `key_mask` (R, Nk):
    row r's queries see no key j with key_mask[r, j] False, in both maps."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    n, nk, d = q.shape[2], k.shape[2], q.shape[3]
    lo, hi = image if image is not None else (0, nk)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    qi, ki = torch.arange(n), torch.arange(nk)
    img_q, img_k = (qi >= lo) & (qi < hi), (ki >= lo) & (ki < hi)
    allowed = ~(img_q[:, None] & img_k[None, :]) | (qi[:, None] == ki[None, :])
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    normal = torch.softmax(logits.float(), -1).to(dtype) @ v
    pag = torch.softmax(logits.float().masked_fill(~allowed, float("-inf")), -1).to(dtype) @ v
    out = normal.clone()
    for r, m in enumerate(mode.tolist()):
        if m == IDENTITY:
            out[r] = pag[r]
        elif m == SOFT:
            b = float(beta[r])
            mixed = (1 - b) * normal[r] + b * pag[r]
            out[r] = torch.where(head_mask[r].view(-1, 1, 1), mixed, normal[r])
    return out


def make_inputs(rows_modes, heads, n, d, dtype, image, seed=0, nk=None):
    g = torch.Generator().manual_seed(seed)
    nk = n if nk is None else nk
    # (R, N, H, d) memory viewed as (R, H, N, d): the adapters' layout, not contiguous
    q = torch.randn(len(rows_modes), n, heads, d, generator=g).transpose(1, 2)
    k = torch.randn(len(rows_modes), nk, heads, d, generator=g).transpose(1, 2)
    v = torch.randn(len(rows_modes), nk, heads, d, generator=g).transpose(1, 2)
    lo, hi = image if image is not None else (0, n)
    for r, m in enumerate(rows_modes):
        if m == MEAN and lo < hi:   # SEG infinite blur: the caller substitutes the mean query
            q[r, :, lo:hi] = q[r, :, lo:hi].mean(1, keepdim=True)
    mode = torch.tensor(rows_modes, dtype=torch.int32)
    beta = torch.rand(len(rows_modes), generator=g)
    head_mask = torch.rand(len(rows_modes), heads, generator=g) < 0.7   # SoftPAG head subsets
    head_mask[:, 0] = True
    if heads > 1:
        head_mask[:, -1] = False
    cast = lambda t: t.to(dtype).to(DEVICE)
    return cast(q), cast(k), cast(v), mode.to(DEVICE), beta.to(DEVICE), head_mask.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("image", [None, (7, 33), (0, 29), (12, 45)],
                         ids=["self", "text-image-text", "image-text", "text-image"])
def test_all_modes_one_batch(dtype, image):
    n = 45 if image == (12, 45) else 37
    q, k, v, mode, beta, head_mask = make_inputs(MODES, 2, n, 40, dtype, image, seed=n)
    with triton_run():
        out = variant_attention(q, k, v, mode, beta, head_mask, image)
    ref = reference(q.cpu(), k.cpu(), v.cpu(), mode.cpu(), beta.cpu(), head_mask.cpu(), image)
    lowp = reference(q.cpu(), k.cpu(), v.cpu(), mode.cpu(), beta.cpu(), head_mask.cpu(), image, dtype)
    assert out.shape == q.shape and out.dtype == dtype
    check(out.cpu(), ref, lowp, dim=0, what=f"{dtype} image={image}")
    # the output is laid out as (R, N, H, d): heads merge for to_out without a copy
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("d", [16, 64, 80, 160])
def test_head_dims(d):
    """Head dims padded to the next power of two with masks (80 -> 128, 160 -> 256); one head."""
    modes = [IDENTITY, NORMAL, MEAN, SOFT]
    q, k, v, mode, beta, head_mask = make_inputs(modes, 1, 21, d, torch.float16, (3, 21), seed=d)
    with triton_run():
        out = variant_attention(q, k, v, mode, beta, head_mask, (3, 21))
    args = (q.cpu(), k.cpu(), v.cpu(), mode.cpu(), beta.cpu(), head_mask.cpu(), (3, 21))
    check(out.cpu(), reference(*args), reference(*args, dtype=torch.float16), what=f"d={d}")


def test_cross_lengths_and_defaults():
    """Nk != Nq (NORMAL rows: cross-attention); beta, head_mask and image default."""
    q, k, v, mode, _, _ = make_inputs([NORMAL, NORMAL, NORMAL], 3, 19, 24, torch.float32, None, nk=50)
    with triton_run():
        out = variant_attention(q, k, v, mode)
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(24), -1) @ v.double()
    check(out.cpu(), ref.cpu())


def test_self_identity_reads_v_only():
    """PAG on plain self-attention is V: exact, whatever q and k hold (even NaN)."""
    q, k, v, mode, beta, head_mask = make_inputs([IDENTITY, NORMAL], 2, 33, 40, torch.bfloat16, None)
    q[0], k[0] = float("nan"), float("nan")
    with triton_run():
        out = variant_attention(q, k, v, mode, beta, head_mask)
    assert torch.equal(out[0], v[0])
    assert torch.isfinite(out[1]).all()


@pytest.mark.parametrize("image", [None, (5, 30)], ids=["self", "joint"])
def test_pytorch_path_matches_reference(image):
    """The op's CPU implementation (the default on CPU) against the same reference."""
    q, k, v, mode, beta, head_mask = make_inputs(MODES, 2, 30, 40, torch.float32, image)
    out = variant_attention(q.cpu(), k.cpu(), v.cpu(), mode.cpu(), beta.cpu(), head_mask.cpu(), image)
    check(out, reference(q.cpu(), k.cpu(), v.cpu(), mode.cpu(), beta.cpu(), head_mask.cpu(), image))


@pytest.mark.parametrize("image", [None, (5, 30)], ids=["self", "joint"])
def test_mean_rows_use_one_query(image):
    """MEAN rows compute ONE query row per (row, head), q[img_lo], for all image queries (the
    caller guarantees they are equal; here they are not, to see that the others are unused)."""
    n = 30 if image is None else 37
    q, k, v, _, beta, head_mask = make_inputs([NORMAL, MEAN], 2, n, 24, torch.float32, None, seed=9)
    mode = torch.tensor([MEAN, MEAN], dtype=torch.int32, device=DEVICE)
    lo, hi = image if image is not None else (0, n)
    expected_q = q.clone()
    expected_q[:, :, lo:hi] = q[:, :, lo:lo + 1]
    ref = torch.softmax(expected_q.double() @ k.double().transpose(-1, -2) / math.sqrt(24), -1) @ v.double()
    with triton_run():
        out = variant_attention(q, k, v, mode, beta, head_mask, image)
    check(out.cpu(), ref.cpu())
    check(variant_attention(q.cpu(), k.cpu(), v.cpu(), mode.cpu(), beta.cpu(), head_mask.cpu(), image),
          ref.cpu())


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_flop_formula_counts_what_each_mode_computes():
    """The bench's floors count the op by its formula (a custom op is opaque to the FLOP counter):
    NORMAL rows as torch's SDPA formula, PAG as its image queries' own key plus the text keys (and
    nothing without text), SoftPAG as both on its heads, MEAN as one image query; the same on the
    meta device, where only the plan's host copy of the tables holds the modes."""
    from torch.utils.flop_counter import sdpa_flop_count

    from guidance_rt import ops
    from guidance_rt.effects import AttnVariant, Segment

    rows, heads, n, d, text = 2, 3, 23, 8, 5
    q = torch.randn(rows, heads, n, d)
    sdpa = sdpa_flop_count(q.shape, q.shape, q.shape)
    mode = lambda m: torch.full((rows,), m, dtype=torch.int32)
    assert _flops(lambda: variant_attention(q, q, q, mode(NORMAL))) == sdpa
    assert _flops(lambda: variant_attention(q, q, q, mode(IDENTITY))) == 0
    pair = 4 * d                                     # a dot product and a weighted sum, 2 FLOPs each
    image = n - text                                 # image tokens [text, n)
    pag = rows * heads * (text * n + image * (1 + text)) * pair
    assert _flops(lambda: variant_attention(q, q, q, mode(IDENTITY), image=(text, n))) == pag
    assert _flops(lambda: variant_attention(q, q, q, mode(MEAN), image=(text, n))) == rows * heads * (text + 1) * n * pair
    one_head = torch.tensor([[True, False, False]] * rows)
    soft = variant_attention(q, q, q, mode(SOFT), torch.full((rows,), 0.5), one_head, image=(text, n))
    assert _flops(lambda: variant_attention(q, q, q, mode(SOFT), torch.full((rows,), 0.5), one_head,
                                            image=(text, n))) == sdpa + pag // heads
    assert torch.isfinite(soft).all()
    # a key mask: only each row's unmasked keys count (here 2 text keys of row 1)
    keep = torch.ones(rows, n, dtype=torch.bool)
    keep[1, :2] = False
    assert _flops(lambda: variant_attention(q, q, q, mode(NORMAL), key_mask=keep)) == sdpa - heads * n * 2 * pair
    assert _flops(lambda: variant_attention(q, q, q, mode(IDENTITY), image=(text, n), key_mask=keep)) == \
        pag - heads * (text + image) * 2 * pair

    segments = (Segment(0, 1, AttnVariant(pag=1.0)), Segment(1, 2, AttnVariant(pag=0.5, heads=(0,))))
    counts = []
    for device in ("cpu", "meta"):
        runs = ops.attention_runs(segments, heads, torch.device(device), mean_identical=False)
        x = q.to(device)
        counts.append(_flops(lambda: ops.variant_attention(x, x, x, runs, slice(text, None))))
    assert counts[0] == counts[1] == pag // rows + sdpa // rows + pag // rows // heads


MASKED_MODES = [NORMAL, IDENTITY, SOFT, MEAN, NORMAL]


def masked_inputs(dtype):
    """37 tokens [text 0-5, image 6-32, text 33-36]: in the interpreter three query and key
    blocks, the middle query block all image (the PAG map's text-only loops) and MEAN's keys in
    two splits; rows mask different text keys of the first and last key block, the last row
    none."""
    n, image = 37, (6, 33)
    q, k, v, mode, beta, head_mask = make_inputs(MASKED_MODES, 2, n, 24, dtype, image, seed=23)
    key_mask = torch.ones(len(MASKED_MODES), n, dtype=torch.bool)
    key_mask[:4, [1, 34]] = False
    key_mask[1:4, [4, 5, 36]] = False
    return (q, k, v, mode, beta, head_mask, image), key_mask.to(DEVICE)


@pytest.mark.parametrize("triton", [False, True], ids=["pytorch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_key_mask_every_mode(dtype, triton):
    """A key mask in every mode against the float64 reference (whose NORMAL rows are checked
    against SDPA's attn_mask too), on the PyTorch path (CPU) and the Triton kernels."""
    args, key_mask = masked_inputs(dtype)
    cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    if triton:
        with triton_run():
            out = variant_attention(*args, key_mask=key_mask)
    else:
        out = variant_attention(*cpu, key_mask=key_mask.cpu())
    ref = reference(*cpu, key_mask=key_mask.cpu())
    check(out.cpu(), ref, reference(*cpu, dtype, key_mask=key_mask.cpu()), dim=0, what=f"{dtype}")
    q, k, v = (t.double() for t in cpu[:3])
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_mask.cpu()[:, None, None, :])
    normal = [r for r, m in enumerate(MASKED_MODES) if m == NORMAL]
    check(ref[normal], sdpa[normal], what="reference vs SDPA")


def test_key_mask_changes_output():
    """Masked keys change exactly the rows that have some, in every mode."""
    args, key_mask = masked_inputs(torch.float32)
    masked = variant_attention(*args, key_mask=key_mask)
    plain = variant_attention(*args)
    diff = (masked - plain).abs().flatten(1).amax(1)
    assert (diff[:4] > 1e3 * tolerance(masked, plain, FORMULA_ULPS)).all(), diff
    assert diff[4] == 0
