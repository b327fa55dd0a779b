"""The plan: for one distinct step configuration, which rows exist and what each layer does.

Row layout of the packed batch (B = user batch):

    [uncond x B] [cond x B] [branch 1 x B] [branch 2 x B] ...

The uncond rows exist only while CFG is active. Perturbed branches are ordered by their fork
point (the first block their perturbation touches), so at every point of the forward the live
rows are a prefix of this layout: before block p only rows of branches that forked earlier exist.
A branch forks by copying the cond rows' hidden state; every per-row input of the model
(timestep embedding, text conditioning, UNet skip connections) is then the cond row's.

A plan is computed once per distinct configuration and cached by the denoiser; the forward only
reads it. Every per-layer decision is precomputed here as row segments: contiguous row ranges
(one per branch, adjacent equal ones merged) with what the layer does to them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layers import Layer
from .terms import PAG, SEG, SLG, TPG, PerturbationTerm

# attention modes of a row segment in a perturbed self-attention
NORMAL, IDENTITY, SOFT, BLUR, MEAN = "normal", "identity", "soft", "blur", "mean"


@dataclass(frozen=True)
class Segment:
    """Rows [start, end) of the rows a block runs on, and the attention mode they get."""

    start: int
    end: int
    mode: str = NORMAL
    beta: float = 1.0            # SOFT: weight of the perturbed map
    heads: tuple | None = None   # SOFT: heads it applies to (None: all)
    sigma: float = 0.0           # BLUR: Gaussian sigma

    @property
    def rows(self) -> slice:
        return slice(self.start, self.end)


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
    """A subset of rows: a slice when contiguous (views, no copy), else an index tensor."""

    def __init__(self, rows: list[int], total: int):
        self.total = total
        self.count = len(rows)
        self.all = rows == list(range(total))
        contiguous = rows == list(range(rows[0], rows[0] + len(rows))) if rows else True
        self.slice = slice(rows[0], rows[0] + len(rows)) if rows and contiguous else None
        self.index = torch.tensor(rows, dtype=torch.long)
        self._on: dict = {}

    def _idx(self, device):
        if device not in self._on:
            self._on[device] = self.index.to(device)
        return self._on[device]

    def take(self, x: torch.Tensor) -> torch.Tensor:
        if self.all:
            return x
        if self.slice is not None:
            return x[self.slice]
        from .attention import kernels_for
        kern = kernels_for(x)
        if kern is not None:
            return kern.gather_rows(x, self._idx(x.device))
        return x.index_select(0, self._idx(x.device))

    def put(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """x with these rows replaced by values (out of place)."""
        if self.all:
            return values
        if self.slice is not None:
            out = x.clone()
            out[self.slice] = values
            return out
        from .attention import kernels_for
        kern = kernels_for(x)
        if kern is not None:
            return kern.scatter_rows(x, self._idx(x.device), values)
        return x.index_copy(0, self._idx(x.device), values)


@dataclass
class BlockPlan:
    """What block `position` does: rows entering after forks, which rows run it, and the
    per-row variants inside it (segments are relative to the rows that run it)."""

    position: int
    rows: int                          # live rows after this block's forks
    forks: int = 0                     # branches that fork at this block (cond copies appended)
    run: RowSet | None = None          # None: all rows run the block
    run_pos: RowSet | None = None      # the same subset among the positive rows (NAG streams)
    shuffle: tuple = ()                # ((start, end, term_index), ...) TPG rows, run-relative
    self_attn: tuple = ()              # Segments covering the run rows; () = all normal
    skip_attn: tuple = ()              # ((start, end), ...) run-relative rows whose attention adds 0
    skip_ff: tuple = ()                # ((start, end), ...) run-relative rows whose ff adds 0
    tokens: int = 0                    # filled by adapters when needed (TPG)

    @property
    def plain(self) -> bool:
        return (self.forks == 0 and self.run is None and not self.shuffle and not self.self_attn
                and not self.skip_attn and not self.skip_ff)


@dataclass
class StepPlan:
    batch: int
    has_uncond: bool
    branches: tuple[Branch, ...]
    blocks: dict[int, BlockPlan]       # only blocks that are not plain
    base_rows: int                     # rows before the first fork: (uncond +) cond
    total_rows: int
    row_source: torch.Tensor           # (total_rows,) index of each row's base row
    nag: bool = False                  # NAG active: positive rows (cond + branches) get it
    tpg_positions: dict = field(default_factory=dict)   # term_index -> tuple of positions
    _row_source_on: dict = field(default_factory=dict)

    @property
    def cond_rows(self) -> slice:
        start = self.batch if self.has_uncond else 0
        return slice(start, start + self.batch)

    @property
    def pos_start(self) -> int:
        """First positive row: everything from here on is conditioned on the positive prompt."""
        return self.cond_rows.start

    def sample_index(self, device) -> torch.Tensor:
        """(total_rows,) the user sample each row belongs to."""
        key = ("sample", device)
        if key not in self._row_source_on:
            self._row_source_on[key] = (torch.arange(self.total_rows) % self.batch).to(device)
        return self._row_source_on[key]

    def branch_rows(self, k: int) -> slice:
        start = self.base_rows + k * self.batch
        return slice(start, start + self.batch)

    def rows_before(self, position: int) -> int:
        """Live rows entering block `position` before its own forks."""
        n = self.base_rows
        for br in self.branches:
            if br.fork < position:
                n += self.batch
        return n

    def source(self, device) -> torch.Tensor:
        if device not in self._row_source_on:
            self._row_source_on[device] = self.row_source.to(device)
        return self._row_source_on[device]



def _segments(spans: list[tuple[int, int, Segment | None]]) -> tuple:
    """Merge adjacent spans with equal variants; spans with None are NORMAL."""
    out: list[Segment] = []
    for start, end, seg in spans:
        proto = seg or Segment(0, 0)
        if out and (out[-1].mode, out[-1].beta, out[-1].heads, out[-1].sigma) == (
                proto.mode, proto.beta, proto.heads, proto.sigma) and out[-1].end == start:
            last = out.pop()
            out.append(Segment(last.start, end, last.mode, last.beta, last.heads, last.sigma))
        else:
            out.append(Segment(start, end, proto.mode, proto.beta, proto.heads, proto.sigma))
    return tuple(out) if any(s.mode != NORMAL for s in out) else ()


def _attn_variant(term: PerturbationTerm) -> Segment | None:
    if isinstance(term, PAG):
        if term.beta == 1.0 and term.heads is None:
            return Segment(0, 0, IDENTITY)
        return Segment(0, 0, SOFT, beta=term.beta, heads=term.heads)
    if isinstance(term, SEG):
        return Segment(0, 0, MEAN) if term.infinite else Segment(0, 0, BLUR, sigma=term.sigma)
    return None


def build_plan(layers_of: dict[int, tuple[Layer, ...]], active: tuple[tuple[int, PerturbationTerm], ...],
               batch: int, has_uncond: bool, nag: bool = False) -> StepPlan:
    """layers_of: term index -> resolved layers; active: (term index, term) of the perturbation
    terms that have a row this step, in Guidance order."""
    branches = []
    for i, t in active:
        layers = layers_of[i]
        if isinstance(t, SLG) and t.weights is not None:   # one branch per skipped layer
            total = sum(t.weights)
            branches += [Branch(i, t, frozenset([l.position]), a / total) for l, a in zip(layers, t.weights)]
        else:
            branches.append(Branch(i, t, frozenset(l.position for l in layers)))
    branches.sort(key=lambda b: (b.fork, b.term_index))
    base = 2 * batch if has_uncond else batch
    total = base + batch * len(branches)
    cond_start = batch if has_uncond else 0
    source = list(range(base)) + [cond_start + j for _ in branches for j in range(batch)]

    blocks: dict[int, BlockPlan] = {}
    positions = sorted(set().union(*(b.positions for b in branches))) if branches else []
    for p in positions:
        live = [k for k, b in enumerate(branches) if b.fork <= p]
        rows = base + batch * len(live)
        forks = sum(1 for b in branches if b.fork == p)
        skipping = [k for k in live if p in branches[k].positions
                    and isinstance(branches[k].term, SLG) and branches[k].term.skip == "block"]
        run_rows = [r for r in range(rows)
                    if not any(base + k * batch <= r < base + (k + 1) * batch for k in skipping)]
        # run-relative start of each live branch that runs the block
        rel: dict[int, int] = {}
        offset = base
        for k in live:
            if k not in skipping:
                rel[k] = offset
                offset += batch
        spans, shuffle, skip_attn, skip_ff = [(0, base, None)], [], [], []
        for k in live:
            if k not in rel:
                continue
            b = branches[k]
            lo, hi = rel[k], rel[k] + batch
            touched = p in b.positions
            spans.append((lo, hi, _attn_variant(b.term) if touched else None))
            if touched and isinstance(b.term, TPG):
                shuffle.append((lo, hi, b.term_index))
            if touched and isinstance(b.term, SLG) and b.term.skip == "attn":
                skip_attn.append((lo, hi))
            if touched and isinstance(b.term, SLG) and b.term.skip == "ff":
                skip_ff.append((lo, hi))
        partial = len(run_rows) < rows
        blocks[p] = BlockPlan(
            position=p, rows=rows, forks=forks,
            run=RowSet(run_rows, rows) if partial else None,
            run_pos=RowSet([r - cond_start for r in run_rows if r >= cond_start], rows - cond_start)
            if partial else None,
            shuffle=tuple(shuffle), self_attn=_segments(spans),
            skip_attn=tuple(skip_attn), skip_ff=tuple(skip_ff))
    tpg_positions = {b.term_index: tuple(sorted(b.positions)) for b in branches if isinstance(b.term, TPG)}
    return StepPlan(batch=batch, has_uncond=has_uncond, branches=tuple(branches), blocks=blocks,
                    base_rows=base, total_rows=total, row_source=torch.tensor(source, dtype=torch.long),
                    nag=nag, tpg_positions=tpg_positions)
