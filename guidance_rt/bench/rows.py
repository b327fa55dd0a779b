"""The result row's vocabulary, shared by every other module of the harness (so it imports none of
them): COLUMNS, the keys every row has; which implementations are ours and which are peers; and how
a failure is written into a row, the same wherever it happens (preparing, checking, timing): an
error for our implementations, MISSING for a peer, with a one-line reason.
"""
from __future__ import annotations

from ..standard import IMPLEMENTATIONS


OURS = ("guidance-rt", "reference")
COLUMNS = ("preset", "family", "batch", "latent", "size", "config", "spec", "guidance", "implementation",
           "status", "reason", "step", "steps", "median_ms", "iqr_ms", "min_ms", "max_ms", "ratio",
           "floor", "efficiency", "peak_memory_mib", "memory_method", "images_per_s",
           "rel_vs_reference", "vs_peer", "vs_peer_impl", "noisy", "flops", "baseline_flops", "block_rows",
           "times_ms")
PEERS = tuple(i for i in IMPLEMENTATIONS if i not in OURS)


def _short(e: BaseException, limit: int = 160) -> str:
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(row: dict, reason: str) -> None:
    row.update(status="error" if row["implementation"] in OURS else "missing", reason=reason)
