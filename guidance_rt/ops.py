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

__all__ = ["sdpa", "blur_queries", "variant_attention", "attention_runs", "shift_segments", "qk_segments", "gather_rows",
           "scatter_rows", "token_shuffle", "guidance_combine", "nag_attention", "nag_combine"]


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
