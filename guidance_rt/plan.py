"""The plan: for one distinct step configuration, which rows exist and what each layer does.

Row layout of the packed batch (B = user batch):

    [uncond x B] [cond x B] [branch 1 x B] [branch 2 x B] ...

The uncond rows exist only while CFG is active. Perturbed branches are ordered by their fork
point (the first block their perturbation touches), so at every point of the forward the live
rows are a prefix of this layout: before block p only rows of branches that forked earlier exist.
A branch forks by copying the cond rows' hidden state; every per-row input of the model
(timestep embedding, text conditioning, UNet skip connections) is then the cond row's.

The plan asks each method which branches it adds and what it does where (methods.base); it
knows no method by name. It is computed once per distinct configuration and device, and holds
every per-layer decision as data: row segments with their attention variants, and the index
tensors, masks and tables the forward needs (the family adds its attention tables,
Adapter.prepare), already on the device. The forward only reads it: no Python decision on tensor
values and no tensor built from host data during a step, so torch.compile captures it whole.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import ops
from .effects import Segment
from .layers import Layer
from .methods import PerturbationTerm


@dataclass(frozen=True)
class Branch:
    term_index: int
    term: PerturbationTerm
    positions: frozenset[int]   # blocks its perturbation touches
    weight: float = 1.0         # share of the term's guidance (SLG weighted multi-skip)

    @property
    def fork(self) -> int:
        return min(self.positions)


class RowSet:
    """A subset of rows: a slice when contiguous (views, no copy), else an index tensor on the
    plan's device."""

    def __init__(self, rows: list[int], total: int, device):
        self.total = total
        self.count = len(rows)
        self.all = rows == list(range(total))
        contiguous = rows == list(range(rows[0], rows[0] + len(rows))) if rows else True
        self.slice = slice(rows[0], rows[0] + len(rows)) if rows and contiguous else None
        self.index = torch.tensor(rows, dtype=torch.long, device=device)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        if self.all:
            return x
        if self.slice is not None:
            return x[self.slice]
        return ops.gather_rows(x, self.index)

    def put(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """x with these rows replaced by values (out of place)."""
        if self.all:
            return values
        if self.slice is not None:
            out = x.clone()
            out[self.slice] = values
            return out
        return ops.scatter_rows(x, self.index, values)


def _keep_mask(spans: tuple, rows: int, device) -> torch.Tensor | None:
    """(rows, 1, 1) bool: False on the rows whose sublayer output is dropped (multiplying by it
    keeps the output's dtype)."""
    if not spans:
        return None
    keep = torch.ones(rows, 1, 1, dtype=torch.bool)
    for start, end in spans:
        keep[start:end] = False
    return keep.to(device)


@dataclass
class BlockPlan:
    """What block `position` does: rows entering after forks, which rows run it, and the
    per-row variants inside it (segments are relative to the rows that run it). Its device
    tables (keep masks, the shuffle table; the attention's row tables from Adapter.prepare) are
    built with the plan, never during a step."""

    position: int
    rows: int                          # live rows after this block's forks
    forks: int = 0                     # branches that fork at this block (cond copies appended)
    run: RowSet | None = None          # None: all rows run the block
    run_pos: RowSet | None = None      # the same subset among the positive rows (NAG streams)
    shuffle: tuple = ()                # ((start, end, term_index), ...) TPG rows, run-relative
    self_attn: tuple = ()              # Segments covering the run rows; () = all plain
    skip_attn: tuple = ()              # ((start, end), ...) run-relative rows whose attention adds 0
    skip_ff: tuple = ()                # ((start, end), ...) run-relative rows whose ff adds 0
    device: torch.device | None = None
    pos_start: int | None = None       # NAG: the first positive row; tables also cover the rows from it
    # the family's attention tables (ops.attention_runs), set once per plan by Adapter.prepare:
    # of the segments its attention sees, and of NAG's negative stream (the positive rows)
    attn: tuple = ()
    nag_attn: tuple = ()
    pos_attn: tuple = field(init=False, default=())   # self_attn of the positive rows, re-based to 0
    plain: bool = field(init=False, default=True)     # every row runs the stock block
    _tables: dict = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self):
        self.plain = (self.forks == 0 and self.run is None and not self.shuffle and not self.self_attn
                      and not self.skip_attn and not self.skip_ff)
        if self.pos_start is not None:
            self.pos_attn = ops.shift_segments(self.self_attn, self.pos_start)
        for first in (0,) if self.pos_start is None else (0, self.pos_start):
            for which, spans in (("attn", self.skip_attn), ("ff", self.skip_ff)):
                spans = tuple((max(a, first) - first, b - first) for a, b in spans if b > first)
                self._tables[which, first] = _keep_mask(spans, self.run_rows - first, self.device)
            if self.shuffle:
                table = torch.full((self.run_rows - first,), -1, dtype=torch.long)
                for j, (start, end, _) in enumerate(self.shuffle):
                    table[start - first:end - first] = j
                self._tables["shuffle", first] = table.to(self.device)

    @property
    def run_rows(self) -> int:
        return self.run.count if self.run is not None else self.rows

    def keep(self, which: str, first: int = 0) -> torch.Tensor | None:
        """The keep mask of the attention ("attn") or feed-forward ("ff") outputs of the run rows
        from `first` (0 or pos_start) on (NAG's negative stream holds the positive rows only)."""
        return self._tables[which, first]

    def shuffle_table(self, first: int = 0) -> torch.Tensor:
        """(run rows from `first`,) int64: the index of each row's permutation among
        self.shuffle, -1 for rows kept in order (the token_shuffle op's table)."""
        return self._tables["shuffle", first]


@dataclass(frozen=True)
class Permutations:
    """TPG's permutations of one step, in one device tensor: at each shuffling block, one
    permutation of its image tokens per entry of BlockPlan.shuffle."""

    table: torch.Tensor
    slots: dict   # position -> (offset in table, permutations, tokens)

    def at(self, position: int) -> torch.Tensor:
        offset, count, tokens = self.slots[position]
        return self.table[offset:offset + count * tokens].view(count, tokens)


@dataclass
class StepPlan:
    batch: int
    has_uncond: bool
    branches: tuple[Branch, ...]
    blocks: dict[int, BlockPlan]       # only blocks that are not plain
    base_rows: int                     # rows before the first fork: (uncond +) cond
    total_rows: int
    row_source: torch.Tensor           # (total_rows,) index of each row's base row, on the device
    sample_index: torch.Tensor         # (total_rows,) the user sample each row belongs to
    nag: bool = False                  # NAG active: positive rows (cond + branches) get it
    shuffled: dict = field(default_factory=dict)   # term_index -> positions it shuffles at
    other_blocks: dict = field(default_factory=dict)   # position -> BlockPlan of every other block
    device: torch.device | None = None

    @property
    def cond_rows(self) -> slice:
        start = self.batch if self.has_uncond else 0
        return slice(start, start + self.batch)

    @property
    def pos_start(self) -> int:
        """First positive row: everything from here on is conditioned on the positive prompt."""
        return self.cond_rows.start

    def branch_rows(self, k: int) -> slice:
        start = self.base_rows + k * self.batch
        return slice(start, start + self.batch)

    def block(self, position: int) -> BlockPlan:
        """The plan of any block, plain or not (built with the plan: a step constructs none)."""
        return self.blocks.get(position) or self.other_blocks[position]

    def rows_before(self, position: int) -> int:
        """Live rows entering block `position` before its own forks."""
        return self.base_rows + self.batch * sum(1 for br in self.branches if br.fork < position)


def _segments(spans: list[tuple[int, int, object]]) -> tuple:
    """Merge adjacent spans with equal variants; () when every row is plain."""
    out: list[Segment] = []
    for start, end, variant in spans:
        if out and out[-1].variant == variant and out[-1].end == start:
            out[-1] = Segment(out[-1].start, end, variant)
        else:
            out.append(Segment(start, end, variant))
    return tuple(out) if any(s.variant is not None for s in out) else ()


def build_plan(layers_of: dict[int, tuple[Layer, ...]], active: tuple[tuple[int, PerturbationTerm], ...],
               batch: int, has_uncond: bool, nag: bool = False, device=None, n_blocks: int = 0) -> StepPlan:
    """layers_of: term index -> resolved layers; active: (term index, term) of the perturbation
    terms that have a row this step, in Guidance order; n_blocks: the model's addressable blocks."""
    branches = []
    for i, t in active:
        branches += [Branch(i, t, positions, weight)
                     for positions, weight in t.branches(tuple(l.position for l in layers_of[i]))]
    branches.sort(key=lambda b: (b.fork, b.term_index))
    effects = [b.term.effect() for b in branches]
    base = 2 * batch if has_uncond else batch
    total = base + batch * len(branches)
    cond_start = batch if has_uncond else 0
    pos_start = cond_start if nag else None
    source = list(range(base)) + [cond_start + j for _ in branches for j in range(batch)]

    blocks: dict[int, BlockPlan] = {}
    positions = sorted(set().union(*(b.positions for b in branches))) if branches else []
    for p in positions:
        live = [k for k, b in enumerate(branches) if b.fork <= p]
        rows = base + batch * len(live)
        forks = sum(1 for b in branches if b.fork == p)
        touched = {k for k in live if p in branches[k].positions}
        skipping = {k for k in touched if effects[k].skip == "block"}
        run_rows = [r for r in range(rows)
                    if not any(base + k * batch <= r < base + (k + 1) * batch for k in skipping)]
        spans, shuffle, skip_attn, skip_ff = [(0, base, None)], [], [], []
        lo = base   # run-relative start of the next live branch that runs the block
        for k in live:
            if k in skipping:
                continue
            hi, e = lo + batch, effects[k]
            spans.append((lo, hi, e.attention if k in touched else None))
            if k in touched:
                if e.shuffle:
                    shuffle.append((lo, hi, branches[k].term_index))
                if e.skip == "attn":
                    skip_attn.append((lo, hi))
                if e.skip == "ff":
                    skip_ff.append((lo, hi))
            lo = hi
        partial = len(run_rows) < rows
        blocks[p] = BlockPlan(
            position=p, rows=rows, forks=forks,
            run=RowSet(run_rows, rows, device) if partial else None,
            run_pos=RowSet([r - cond_start for r in run_rows if r >= cond_start], rows - cond_start, device)
            if partial else None,
            shuffle=tuple(shuffle), self_attn=_segments(spans),
            skip_attn=tuple(skip_attn), skip_ff=tuple(skip_ff), device=device, pos_start=pos_start)
    shuffled = {b.term_index: tuple(sorted(b.positions)) for b, e in zip(branches, effects) if e.shuffle}
    plan = StepPlan(batch=batch, has_uncond=has_uncond, branches=tuple(branches), blocks=blocks,
                    base_rows=base, total_rows=total,
                    row_source=torch.tensor(source, dtype=torch.long, device=device),
                    sample_index=(torch.arange(total) % batch).to(device), nag=nag, shuffled=shuffled,
                    device=torch.device(device) if device is not None else None)
    plan.other_blocks.update((p, BlockPlan(p, plan.rows_before(p), pos_start=pos_start))
                      for p in range(n_blocks) if p not in blocks)
    return plan
