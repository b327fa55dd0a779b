"""What every adapter shares: growing the packed batch at forks and per-row helpers.

An adapter owns a model family's forward. It runs stock diffusers submodules (resnets, norms,
projections, unperturbed blocks) on the live rows and takes over only where rows differ: forks,
skipped blocks, shuffled tokens and perturbed attention.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..attention import kernels_for
from ..layers import enumerate_layers
from ..plan import BlockPlan, StepPlan


class Adapter:
    family: str = ""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = enumerate_layers(model)
        self.trace: dict[int, int] | None = None   # position -> rows run, when tracing

    # ---------------------------------------------------------------- rows

    @staticmethod
    def grow(t: torch.Tensor | None, rows: int, plan: StepPlan, cond: slice | None = None) -> torch.Tensor | None:
        """Append cond-row copies for the branches that forked after `t` was computed
        (`cond`: where the cond rows are in `t`, if not at the layout's place)."""
        if t is None or t.shape[0] >= rows:
            return t
        missing = (rows - t.shape[0]) // plan.batch
        cond = t[plan.cond_rows if cond is None else cond]
        return torch.cat([t] + [cond] * missing)

    @staticmethod
    def per_row(t: torch.Tensor | None, plan: StepPlan) -> torch.Tensor | None:
        """A base-row input (uncond, cond) gathered for every row of the layout."""
        if t is None:
            return None
        return t.index_select(0, plan.source(t.device))

    @staticmethod
    def shuffle(x: torch.Tensor, bp: BlockPlan, perms, image: slice = slice(None), first: int = 0) -> torch.Tensor:
        """TPG: permute the image tokens of the shuffled rows (one permutation per term/layer).
        `first`: x holds the run rows from `first` on (NAG's stream: the positive rows; shuffled
        rows are branch rows, never before it)."""
        if not bp.shuffle:
            return x
        n = x[:, image].shape[1]
        kern = kernels_for(x)
        if kern is not None:   # one gather kernel over a device permutation table
            table = torch.full((x.shape[0],), -1, dtype=torch.long)
            for j, (start, end, _) in enumerate(bp.shuffle):
                table[start - first:end - first] = j
            stacked = torch.stack([perms(term, bp.position, n, x.device) for _, _, term in bp.shuffle])
            return kern.token_shuffle(x, stacked, table.to(x.device), image.start or 0)
        x = x.clone()
        for start, end, term in bp.shuffle:
            rows = slice(start - first, end - first)
            perm = perms(term, bp.position, n, x.device)
            x[rows, image] = x[rows, image].index_select(1, perm)
        return x

    @staticmethod
    def drop_rows(t: torch.Tensor | None, spans) -> torch.Tensor | None:
        """Zero the output of a sublayer for skipped rows (SLG attn / ff)."""
        if not spans or t is None:
            return t
        keep = torch.ones(t.shape[0], dtype=t.dtype, device=t.device)
        for start, end in spans:
            keep[start:end] = 0
        return t * keep.view(-1, *([1] * (t.dim() - 1)))

    @staticmethod
    def shift_spans(spans, start: int) -> tuple:
        """Row spans re-based to rows [start, ...) (the positive rows NAG's stream holds)."""
        return tuple((max(a, start) - start, b - start) for a, b in spans if b > start)

    def record(self, position: int, rows: int):
        if self.trace is not None:
            self.trace[position] = rows

    # ---------------------------------------------------------------- checks

    @staticmethod
    def require_processor(attn: nn.Module, allowed: tuple[str, ...], where: str):
        name = type(getattr(attn, "processor", None)).__name__
        if name not in allowed:
            raise NotImplementedError(
                f"{where}: attention processor {name} is not supported on a perturbed layer; "
                f"supported: {', '.join(allowed)} (remove custom processors or pick other layers)")
