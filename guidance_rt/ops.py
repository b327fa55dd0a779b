"""The one dispatch point between the families' packed forwards and guidance_rt.kernels.

Every perturbed operation goes through a torch op of guidance_rt.kernels, on every device: the
op runs its Triton kernels on CUDA (and on CPU tensors inside `kernels.triton_on_cpu()`, in
Triton's interpreter) and its PyTorch implementation elsewhere, so a CPU machine runs the same
code path as a GPU. This module turns the plan's row segments into the ops' per-row tables.

The families project q, k, v themselves (qk-norm, rotary embeddings, joint text streams are
model-specific) and call these functions (methods.md sections 2-5).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels
from .effects import Segment
from .kernels import gather_rows, guidance_combine, nag_attention, nag_combine, scatter_rows, token_shuffle

__all__ = ["sdpa", "blur_queries", "variant_attention", "joint_nag_attention", "attention_runs", "shift_segments",
           "qk_segments", "gather_rows", "scatter_rows", "token_shuffle", "guidance_combine", "nag_attention",
           "nag_combine"]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA; `key_mask` (R, Nk) bool: True where the key takes part (None: all keys)."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)


def blur_queries(q: torch.Tensor, segments: tuple[Segment, ...], grid, image: slice) -> torch.Tensor:
    """SEG's query perturbations (before the head split) on the image tokens of their rows:
    a Gaussian blur on the token grid, or the mean for an infinite sigma. `grid`: (rows, cols),
    or (frames, rows, cols) for video tokens (frame-major): each frame is blurred (or averaged)
    on its own grid."""
    if not any(s.variant is not None and s.variant.blur for s in segments):
        return q
    parts = []
    for s in segments:
        part = q[s.rows]
        if s.variant is not None and s.variant.blur:
            img = part[:, image]
            frames = grid[0] if grid is not None and len(grid) == 3 else 1   # video: a grid per frame
            flat = img.reshape(img.shape[0] * frames, -1, img.shape[-1])
            flat = (flat.mean(1, keepdim=True).expand_as(flat) if s.variant.mean
                    else kernels.query_blur(flat, grid[-2], grid[-1], s.variant.blur))
            img = flat.reshape(img.shape)
            part = part.clone()
            part[:, image] = img
        parts.append(part)
    return torch.cat(parts)


def variant_attention(q, k, v, runs: tuple, image: slice | None = None,
                      key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention with per-row variants. q, k, v: (R, H, N, d) after the query blur; `runs`:
    attention_runs of the rows' segments (() when all are plain). `image`: the image tokens of a
    joint (MM-DiT) sequence, None for self-attention (PAG's map is then the identity).
    `key_mask` (R, Nk) bool: True where the key takes part (None: all keys); image keys must not
    be masked in PAG rows (kernels.variant_attention)."""
    if not runs:
        return sdpa(q, k, v, key_mask)
    span = None if image is None else (image.start or 0, q.shape[2] if image.stop is None else image.stop)
    outs = []
    for lo, hi, tables in runs:
        mask = None if key_mask is None else key_mask[lo:hi]
        if tables is None:
            outs.append(sdpa(q[lo:hi], k[lo:hi], v[lo:hi], mask))
        else:
            outs.append(kernels.variant_attention(q[lo:hi], k[lo:hi], v[lo:hi], *tables, span, mask))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def joint_nag_attention(q, k, v, image: slice, runs: tuple, ps: int, negative: tuple, nag_runs: tuple, step,
                        text_mask: torch.Tensor | None = None, neg_text_mask: torch.Tensor | None = None):
    """Joint (MM-DiT) attention of every row, with NAG (methods.md 5) on the positive rows [ps:]:
    their image queries attend [image; text] and, for the guidance, [image; negative text], and
    the negative text queries attend [negative text; image].

    q, k, v: (R, H, N, d), each row's sequence with its image tokens at `image` (first or last);
    `runs` / `nag_runs`: attention_runs of all rows / of the positive rows' negative stream;
    `negative`: the negative text's (q, k, v), (R - ps, H, Tn, d); `step`: the NagStep;
    text_mask (R, T) / neg_text_mask (R - ps, Tn): True where a text key takes part (None: all).
    Returns (o: (R, H, N, d), the positive rows' image tokens guided; the negative text's output
    (R - ps, H, Tn, d)).

    When every row at this layer attends plainly, the image keys are scored once for both of a
    positive row's softmaxes (nag_attention's shared keys), so the negative stream costs only its
    text. Variant rows (PAG, SEG's mean) change the image part itself: then the negative stream's
    attention runs in full with the positive rows' variants."""
    nq, nk, nv = negative
    rows, n, n_neg = q.shape[0], q.shape[2], nq.shape[2]
    lo, hi = image.start or 0, q.shape[2] if image.stop is None else image.stop
    text = slice(hi, n) if lo == 0 else slice(0, lo)
    ones = lambda r, m: torch.ones(r, m, dtype=torch.bool, device=q.device)
    key_mask = None                       # (R, N) over the whole sequence
    if text_mask is not None:
        parts = [ones(rows, hi - lo), text_mask]
        key_mask = torch.cat(parts if lo == 0 else parts[::-1], 1)
    neg_keys = None if neg_text_mask is None else torch.cat([neg_text_mask, ones(rows - ps, hi - lo)], 1)
    img = lambda t: t[ps:, :, lo:hi]
    neg_seq = lambda t_neg, t: torch.cat([t_neg, img(t)], 2)       # [negative text, image]
    rows_of = lambda m, r: None if m is None else m[r]
    if any(t is not None for r in (runs, nag_runs) for _, _, t in r):
        o = variant_attention(q, k, v, runs, image, key_mask)
        on = variant_attention(neg_seq(nq, q), neg_seq(nk, k), neg_seq(nv, v), nag_runs,
                               slice(n_neg, None), neg_keys)
        heads_last = lambda t: t.transpose(1, 2).flatten(2)        # (R, N, H * d)
        guided = nag_combine(heads_last(img(o)), heads_last(on[:, :, n_neg:]), step.phi, step.tau,
                             step.alpha, step.norm).unflatten(-1, (q.shape[1], -1)).transpose(1, 2)
        o_uncond, o_text, o_neg = o[:ps], o[ps:, :, text], on[:, :, :n_neg]
    else:
        pos_mask, neg_mask = rows_of(key_mask, slice(ps, None)), neg_text_mask
        if (pos_mask is None) != (neg_mask is None):   # the op takes both masks or none
            pos_mask = ones(rows - ps, n) if pos_mask is None else pos_mask
            neg_mask = ones(rows - ps, n_neg) if neg_mask is None else neg_mask
        guided = nag_attention(img(q), k[ps:, :, text], v[ps:, :, text], nk, nv, step.phi, step.tau,
                               step.alpha, step.norm, img(k), img(v),
                               None if pos_mask is None else pos_mask[:, text], neg_mask)
        o_uncond = sdpa(q[:ps], k[:ps], v[:ps], rows_of(key_mask, slice(None, ps)))
        o_text = sdpa(q[ps:, :, text], k[ps:], v[ps:], rows_of(key_mask, slice(ps, None)))
        o_neg = sdpa(nq, neg_seq(nk, k), neg_seq(nv, v), neg_keys)
    o_pos = torch.cat([guided.to(o_text.dtype), o_text] if lo == 0 else [o_text, guided.to(o_text.dtype)], 2)
    return torch.cat([o_uncond, o_pos]), o_neg


def attention_runs(segments: tuple[Segment, ...], heads: int, device, mean_identical: bool) -> tuple:
    """variant_attention's work for these segments, built once per plan: consecutive row runs
    (lo, hi, tables). Rows plain attention serves go to SDPA (its best backend; tables None), so
    normal rows never run slower than SDPA; only the variant rows go to the op, with its per-row
    (mode, beta, head mask) tables on the device. `mean_identical`: the image queries of
    mean-blurred rows are all equal (no rotary embedding after the mean), so one query row per
    (row, head) is exact."""
    if not segments:
        return ()
    return tuple((lo, hi, None if run is None else _row_tables(run, hi - lo, heads, device, mean_identical))
                 for lo, hi, run in _runs(segments, mean_identical))


def _plain(s: Segment, mean_identical: bool) -> bool:
    """Rows SDPA serves: no variant, or a finite blur (its query is already blurred), or the
    mean when one query row per (row, head) would not be exact."""
    v = s.variant
    return v is None or (not v.pag and (not v.mean or not mean_identical))


def _runs(segments: tuple[Segment, ...], mean_identical: bool):
    """Consecutive rows grouped into runs (lo, hi, segments re-based to lo), or (lo, hi, None)
    for rows plain attention serves."""
    runs = []
    for s in segments:
        plain = _plain(s, mean_identical)
        if runs and (runs[-1][2] is None) == plain and runs[-1][1] == s.start:
            runs[-1][1] = s.end
            if not plain:
                runs[-1][2].append(s)
        else:
            runs.append([s.start, s.end, None if plain else [s]])
    return tuple((lo, hi, None if run is None else shift_segments(tuple(run), lo)) for lo, hi, run in runs)


def _row_tables(segments: tuple[Segment, ...], rows: int, heads: int, device: torch.device,
                mean_identical: bool):
    """The op's per-row mode, beta and head mask for these segments."""
    mode = torch.full((rows,), kernels.NORMAL, dtype=torch.int32)
    beta = torch.ones(rows, dtype=torch.float32)
    mask = torch.ones(rows, heads, dtype=torch.bool)
    for s in segments:
        v = s.variant
        if v is None:
            continue
        if v.pag:
            mode[s.rows] = kernels.IDENTITY if v.identity else kernels.SOFT
            beta[s.rows] = v.pag
            if v.heads is not None:
                mask[s.rows] = False
                mask[s.rows, list(v.heads)] = True
        elif v.mean and mean_identical:
            mode[s.rows] = kernels.MEAN
    return kernels.table_to(mode, device), beta.to(device), kernels.table_to(mask, device)


def shift_segments(segments: tuple[Segment, ...], start: int) -> tuple[Segment, ...]:
    """The segments of rows [start, ...) re-based to start at 0 (the positive rows for NAG)."""
    return tuple(Segment(max(s.start, start) - start, s.end - start, s.variant)
                 for s in segments if s.end > max(s.start, start))


def qk_segments(segments: tuple[Segment, ...]) -> tuple[tuple[Segment, ...], list[slice]]:
    """Segments of the rows that need q and k when PAG-identity rows need only V
    (self-attention): those segments re-based onto the gathered rows, and their row slices."""
    kept, rows, offset = [], [], 0
    for s in segments:
        if s.variant is not None and s.variant.identity:
            continue
        n = s.end - s.start
        kept.append(Segment(offset, offset + n, s.variant))
        rows.append(s.rows)
        offset += n
    return tuple(kept), rows
