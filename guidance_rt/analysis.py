"""CSLG layer finding (shared/methods.md section 6): which blocks carry a prompt feature.

``find_layers(target, pairs, out_dir=...)`` runs contrastive prompt pairs (two prompts that differ
in one feature, e.g. with and without visible text) from the same seed and the same initial
latent, and ranks the model's blocks two ways:

1. **Contrast** (``mode`` "cosine" or "both"). At the capture step(s) every block's attention
   output is hooked, for both prompts of each pair, and compared by cosine similarity. Per layer:
   ``cosine`` = mean over pairs (and capture steps) of the cosine between the two flattened
   (tokens x channels) attention outputs of a pair; ``first_difference`` = drop from the previous
   block in execution order, ``cos[l-1] - cos[l]`` (the block before the first one counts as 1.0,
   identical); ``relative_change`` = ``first_difference / |cos[l-1]|``. Candidates are the
   blocks with the largest first difference. ``token_cosine`` (mean over tokens of the per-token
   cosine) is reported beside it.
2. **Skip** (``mode`` "skip" or "both"). At the same step and latent, each block alone is
   bypassed (SLG ``skip="block"``: output = input on both streams) and the relative L2 change of
   the prediction ``|p_l - c| / |c|`` is measured, per prompt row.

What is captured (the "attention output"):
- SD3 / SD3.5 joint blocks and FLUX double blocks: the output of ``attn.to_out[0]``, i.e. the
  image tokens of the joint attention after the output projection (SD3.5's extra ``attn2`` is
  not captured).
- FLUX single blocks have no ``to_out``: their attention module's output is captured (all heads
  concatenated, before the block's shared ``proj_out``), image tokens only, so that every FLUX
  block is compared on the same tokens.
- UNet BasicTransformerBlocks: ``attn2.to_out[0]``, the cross-attention, where the prompt enters
  the block (the DiTs' joint attention plays both roles).

Packing: both prompts of a pair, and ``batch_pairs`` pairs, are rows of one forward; forward
hooks reduce each layer's output to per-pair statistics during the forward, so no activation is
kept. Skip mode runs one guidance-rt packed forward per chunk of ``skip_chunk`` layers: the rows
are [all prompts] + [all prompts with block l skipped] for each l of the chunk (GuidedDenoiser's
plan with one SLG branch per layer; a branch forks at its block, so the prefix is shared).

Targets:
- a diffusers pipeline (``pipe.transformer`` / ``pipe.unet``): its own ``__call__`` runs
  ``steps`` steps on the prompts (``output_type="latent"``, one CPU generator per row, the same
  seed for both rows of a pair, so both start from the same latent); the capture is taken at the
  denoiser call of each capture step. With classifier-free guidance the pipeline batches
  [uncond, cond]: the cond half is captured.
- a bare denoiser, or a preset name: there are no text encoders, so each prompt becomes a
  deterministic **pseudo-embedding**: every word (lower-cased ``\\w+`` or a punctuation mark)
  maps to a fixed random vector seeded by the SHA-256 of the word, token i of the text sequence is
  the i-th word's vector (the rest are a fixed padding vector), and the pooled embedding is the
  normalised sum of per-word pooled vectors. Prompts that share words share token embeddings.
  A plain sampling loop with a stock scheduler runs ``steps`` steps (SD3 / FLUX: flow-matching
  Euler with shift 3; UNet: Euler, scaled-linear betas), cond only.

Outputs in ``out_dir``: ``captures.safetensors`` (per capture step and layer: ``cos`` (pairs,),
``token_cos`` (pairs, tokens), ``mean_pos`` / ``mean_neg`` (pairs, channels) token-mean outputs,
``skip`` (pairs, 2) with ``full_captures`` also ``pos`` / ``neg`` (pairs, tokens, channels) in
float16), ``ranking.json`` and ``layers.png``.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from .families import enumerate_layers, family_of, model_family, resolve_layers
from .layers import Layer

__all__ = ["PromptPair", "LayerScore", "LayerRanking", "find_layers", "load_pairs", "SHIPPED_PAIRS",
           "pseudo_embedding", "capture_sites", "skip_changes", "plot_ranking", "format_ranking", "run_cli",
           "MODES"]

SHIPPED_PAIRS = Path(__file__).resolve().parent / "data" / "text_pairs.json"
MODES = ("cosine", "skip", "both")
DEFAULT_BARE_STEPS = 4
DEFAULT_PIPELINE_STEPS = 28


# --------------------------------------------------------------------------------------- pairs

@dataclass(frozen=True)
class PromptPair:
    """Two prompts that differ in one feature: ``positive`` has it, ``negative`` does not."""

    positive: str
    negative: str


def load_pairs(source=None) -> list[PromptPair]:
    """Prompt pairs from a JSON file (default: the shipped visible-text pairs) or a list.

    Accepted JSON: ``{"pairs": [...], ...}`` or a bare list; each pair is
    ``{"positive": "...", "negative": "..."}`` or a two-element list ``["with", "without"]``.
    """
    if source is None:
        source = SHIPPED_PAIRS
    where = "pairs"
    if isinstance(source, (str, Path)):
        path = Path(source)
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"cannot read the pairs file {path}: {e.strerror or e}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    else:
        data = source
    items = data.get("pairs") if isinstance(data, dict) else data
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"{where}: expected a non-empty list of prompt pairs (or {{\"pairs\": [...]}})")
    pairs = []
    for i, item in enumerate(items):
        if isinstance(item, PromptPair):
            pairs.append(item)
            continue
        if isinstance(item, dict):
            if set(item) != {"positive", "negative"}:
                raise ValueError(f"{where}: pair {i} must have exactly the keys 'positive' and 'negative', "
                                 f"got {sorted(item)}")
            pos, neg = item["positive"], item["negative"]
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            pos, neg = item
        else:
            raise ValueError(f"{where}: pair {i} must be {{'positive': ..., 'negative': ...}} or a "
                             f"two-element list, got {item!r}")
        if not isinstance(pos, str) or not isinstance(neg, str) or not pos.strip() or not neg.strip():
            raise ValueError(f"{where}: pair {i} must hold two non-empty prompt strings")
        pairs.append(PromptPair(pos, neg))
    return pairs


# ---------------------------------------------------------------------------- pseudo-embeddings

_WORD = re.compile(r"\w+|[^\w\s]")


def _seeded(key: str) -> torch.Generator:
    seed = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little") & (2**63 - 1)
    return torch.Generator("cpu").manual_seed(seed)


def pseudo_embedding(text: str, length: int, dim: int, pooled_dim: int | None = None):
    """Deterministic stand-in text embeddings for a bare model (no text encoder).

    Returns ``(hidden (length, dim), pooled (pooled_dim,) or None)``: row i is the i-th word's
    fixed random vector (seeded by SHA-256 of ``"{dim}:{word}"``), rows past the words are the
    padding vector; pooled is the sum of the words' pooled vectors divided by sqrt(#words).
    """
    words = _WORD.findall(text.lower())[:length]
    pad = torch.randn(dim, generator=_seeded(f"{dim}:<pad>"))
    hidden = pad.repeat(length, 1)
    for i, w in enumerate(words):
        hidden[i] = torch.randn(dim, generator=_seeded(f"{dim}:{w}"))
    pooled = None
    if pooled_dim:
        pooled = torch.zeros(pooled_dim)
        for w in words:
            pooled += torch.randn(pooled_dim, generator=_seeded(f"pooled:{pooled_dim}:{w}"))
        pooled /= math.sqrt(max(1, len(words)))
    return hidden, pooled


# ------------------------------------------------------------------------------ capture sites

def capture_sites(model: nn.Module) -> list[tuple[Layer, nn.Module, str]]:
    """(layer, module whose output is captured, description) for every block, in execution order."""
    family = family_of(model)
    return [(layer, *family.capture_site(layer, model.get_submodule(layer.path))[:2])
            for layer in enumerate_layers(model)]


def _pair_stats(x: torch.Tensor, full: bool) -> dict:
    """x: (2k, tokens, channels) rows [pos0, neg0, pos1, neg1, ...] -> per-pair statistics."""
    x = x.detach().float()
    a, b = x[0::2], x[1::2]
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    na, nb = fa.norm(dim=1), fb.norm(dim=1)
    dot = (fa * fb).sum(1)
    cos = torch.where((na > 0) & (nb > 0), dot / (na * nb).clamp_min(1e-300),
                      ((na == 0) & (nb == 0)).double())
    tok = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)
    stats = {"cos": cos.float().cpu(), "token_cos": tok.cpu(), "mean_pos": a.mean(1).cpu(),
             "mean_neg": b.mean(1).cpu()}
    if full:
        stats["pos"] = a.half().cpu()
        stats["neg"] = b.half().cpu()
    return stats


def _bind(model: nn.Module, args, kwargs) -> tuple[torch.Tensor, Any, dict]:
    """A denoiser call's (sample, timestep, other keyword arguments without None / return_dict)."""
    sig = inspect.signature(model.forward)
    bound = sig.bind(*args, **kwargs)
    arguments = dict(bound.arguments)
    arguments.update(arguments.pop("kwargs", None) or {})
    arguments.pop("return_dict", None)
    sample_key = "sample" if "sample" in arguments else "hidden_states"
    sample = arguments.pop(sample_key)
    timestep = arguments.pop("timestep", None)
    return sample, timestep, {k: v for k, v in arguments.items() if v is not None}


def _rows(value, n: int, total: int, unbatched=("txt_ids", "img_ids"), name: str = ""):
    """The last n of `total` batch rows (the cond half under CFG) of every batched tensor."""
    if isinstance(value, torch.Tensor):
        if name in unbatched or value.dim() == 0 or value.shape[0] != total:
            return value
        return value[total - n:]
    if isinstance(value, dict):
        return {k: _rows(v, n, total, unbatched, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_rows(v, n, total, unbatched, name) for v in value)
    return value


class _Session:
    """Hooks for one batch of prompt rows: counts denoiser calls, and at the capture calls
    records the cond rows' inputs and every layer's per-pair statistics."""

    def __init__(self, model, sites, capture_calls: set[int], rows: int, full: bool, bar=None):
        self.model, self.sites, self.capture_calls = model, sites, capture_calls
        self.rows, self.full, self.bar = rows, full, bar
        self.calls = 0
        self.active: int | None = None
        self.n_img = None
        self.stats: dict[int, dict[str, dict]] = {}     # call -> layer name -> stats
        self.inputs: dict[int, tuple] = {}              # call -> (sample, timestep, kwargs)

    def _pre(self, module, args, kwargs):
        call = self.calls
        self.calls += 1
        if self.bar is not None:
            self.bar.update(1)
        self.active = None
        if call not in self.capture_calls:
            return
        sample, timestep, kw = _bind(module, args, kwargs)
        total = sample.shape[0]
        if total not in (self.rows, 2 * self.rows):
            raise RuntimeError(f"layer finding: the denoiser was called with batch {total}, expected "
                               f"{self.rows} prompt rows (or {2 * self.rows} with classifier-free guidance)")
        self.total = total
        self.n_img = sample.shape[1]   # packed image tokens, for sites whose output ends with them
        t = timestep
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == total:
            t = t[total - self.rows:]
        self.inputs[call] = (sample[total - self.rows:], t, _rows(kw, self.rows, total))
        self.stats[call] = {}
        self.active = call

    def _post(self, module, args, kwargs, output):
        self.active = None

    def _site(self, layer: Layer):
        image_last = family_of(self.model).capture_site(layer, self.model.get_submodule(layer.path))[2]

        def hook(module, args, output):
            if self.active is None:
                return
            x = output[0] if isinstance(output, (tuple, list)) else output
            if x.shape[0] != self.total:
                raise RuntimeError(f"layer finding: {layer.name} saw {x.shape[0]} rows, expected {self.total}")
            x = x[self.total - self.rows:]
            if image_last:
                x = x[:, -self.n_img:]
            self.stats[self.active][layer.name] = _pair_stats(x, self.full)
        return hook

    @contextlib.contextmanager
    def hooks(self):
        handles = [self.model.register_forward_pre_hook(self._pre, with_kwargs=True),
                   self.model.register_forward_hook(self._post, with_kwargs=True)]
        try:
            for layer, module, _ in self.sites:
                handles.append(module.register_forward_hook(self._site(layer)))
            yield self
        finally:
            for h in handles:
                h.remove()


# ------------------------------------------------------------------------------------ runners

def _denoiser_of(target) -> tuple[nn.Module, Any]:
    """(denoiser, pipeline or None) for a denoiser module or a diffusers pipeline."""
    if isinstance(target, nn.Module):
        model_family(target)   # clear error for unsupported models
        return target, None
    for attr in ("transformer", "unet"):
        model = getattr(target, attr, None)
        if isinstance(model, nn.Module):
            model_family(model)
            return model, target
    raise TypeError(f"find_layers needs a diffusers denoiser (UNet2DConditionModel, SD3Transformer2DModel, "
                    f"FluxTransformer2DModel), a pipeline of one, or a preset name; got {type(target).__name__}")


class _BareRunner:
    """Sampling loop for a bare denoiser with pseudo-embeddings (cond only, stock scheduler)."""

    def __init__(self, model: nn.Module, steps: int, height=None, width=None):
        from .presets import example_inputs

        self.model = model
        self.family = family_of(model)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.tmpl = example_inputs(model, batch=1, height=height, width=width, device=self.device,
                                   dtype=self.dtype)
        self.steps = steps

    def _scheduler(self):
        import diffusers as D

        return self.family.scheduler()

    def embed(self, prompts: Sequence[str]) -> dict:
        """The template conditioning with each prompt's pseudo embedding: its text states and
        pooled vector (SD3 / FLUX pooled_projections, SDXL text_embeds) replaced, every other
        per-sample input repeated, shared ones (FLUX's ids) kept."""
        cond = self.tmpl["cond"]
        n = len(prompts)
        ehs = cond["encoder_hidden_states"]
        pooled = cond.get("pooled_projections", (cond.get("added_cond_kwargs") or {}).get("text_embeds"))
        hs, ps = zip(*(pseudo_embedding(p, ehs.shape[1], ehs.shape[2],
                                        None if pooled is None else pooled.shape[-1]) for p in prompts))
        to = dict(device=self.device, dtype=self.dtype)
        unbatched = self.family.unbatched

        def fill(d: dict) -> dict:
            out = {}
            for k, v in d.items():
                if k == "encoder_hidden_states":
                    out[k] = torch.stack(hs).to(**to)
                elif k in ("pooled_projections", "text_embeds"):
                    out[k] = torch.stack(ps).to(**to)
                elif isinstance(v, dict):
                    out[k] = fill(v)
                else:
                    out[k] = v if k in unbatched else v.expand(n, *v.shape[1:]).clone()
            return out

        return fill(cond)

    def latents(self, seeds: Sequence[int]) -> torch.Tensor:
        shape = self.tmpl["sample"].shape[1:]
        return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s))
                            for s in seeds]).to(self.device, self.dtype)

    @torch.no_grad()
    def run(self, prompts: Sequence[str], seeds: Sequence[int]):
        kw = self.embed(prompts)
        sched = self._scheduler()
        with warnings.catch_warnings():   # diffusers' Euler scheduler trips a numpy-2 DeprecationWarning
            warnings.simplefilter("ignore", DeprecationWarning)
            sched.set_timesteps(self.steps, device=self.device)
        x = self.latents(seeds) * getattr(sched, "init_noise_sigma", 1.0)
        n = len(prompts)
        for t in sched.timesteps:
            inp, ts = self.family.model_input(sched, x, t, n)
            pred = self.model(inp, timestep=ts, **kw, return_dict=False)[0]
            x = sched.step(pred, t, x, return_dict=False)[0]


def _run_pipeline(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int, kwargs: dict):
    kwargs = dict(kwargs)
    for key in ("prompt", "generator", "num_inference_steps", "latents", "num_images_per_prompt"):
        if key in kwargs:
            raise ValueError(f"find_layers sets the pipeline's {key!r} itself; leave it out of pipeline_kwargs")
    if kwargs.get("negative_prompt") is not None and type(pipe).__name__.startswith("Flux"):
        raise ValueError("find_layers on a FLUX pipeline runs without true CFG; leave out negative_prompt")
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    kwargs.setdefault("output_type", "latent")
    with torch.no_grad():
        pipe(prompt=list(prompts), num_inference_steps=steps, generator=gens, **kwargs)


# ------------------------------------------------------------------------------------- skip

def skip_changes(model: nn.Module, sample: torch.Tensor, timestep, kwargs: dict,
                 layers: Sequence[Layer], *, chunk: int = 8, bar=None) -> torch.Tensor:
    """Relative L2 change of the prediction when each layer alone is skipped, per row.

    Returns (len(layers), rows): ``|p_l - c| / |c|`` over each row's prediction, where ``c`` is the
    unperturbed prediction and ``p_l`` the one with block l bypassed (output = input). Runs one
    guidance-rt packed forward per chunk of layers (rows: the inputs, then one copy per layer).
    """
    from .denoiser import GuidedDenoiser
    from .guidance import Guidance
    from .methods import SLG

    if chunk < 1:
        raise ValueError(f"skip_chunk must be >= 1, got {chunk}")
    rows = sample.shape[0]
    out = torch.zeros(len(layers), rows, dtype=torch.float64)

    with torch.no_grad():
        for start in range(0, len(layers), chunk):
            part = list(layers[start:start + chunk])
            guidance = Guidance(*[SLG(scale=1.0, layers=[l.name], start=0.0, stop=1.0) for l in part])
            den = GuidedDenoiser(model, guidance, check_inputs=False)
            _, active = den.branch_scales(0, 1, timestep)
            plan = den.plan(rows, False, active)
            t = torch.as_tensor(timestep, device=sample.device)
            t = t.reshape(1).expand(rows) if t.numel() == 1 else t.reshape(rows)
            pred = den.adapter.forward(plan, sample, t, kwargs, None)   # skip rows need no TPG permutation
            c = pred[plan.cond_rows].double().flatten(1)
            cn = c.norm(dim=1).clamp_min(1e-300)
            for k, branch in enumerate(plan.branches):
                p = pred[plan.branch_rows(k)].double().flatten(1)
                out[start + branch.term_index] = ((p - c).norm(dim=1) / cn).cpu()
            if bar is not None:
                bar.update(1)
    return out


# ------------------------------------------------------------------------------------ ranking

def _num(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


@dataclass
class LayerScore:
    layer: Layer
    cosine: float | None = None            # mean over pairs (and capture steps) of the flattened cosine
    cosine_std: float | None = None        # std of that cosine over pairs
    token_cosine: float | None = None      # mean over tokens of the per-token cosine, mean over pairs
    first_difference: float | None = None  # cos[l-1] - cos[l] (cos[-1] = 1)
    relative_change: float | None = None   # first_difference / |cos[l-1]|
    skip_change: float | None = None       # mean |p_l - c| / |c| on the positive prompts
    skip_change_negative: float | None = None  # the same on the negative prompts

    def to_dict(self) -> dict:
        d = {"name": self.layer.name, "path": self.layer.path, "part": self.layer.part,
             "position": self.layer.position}
        for k in ("cosine", "cosine_std", "token_cosine", "first_difference", "relative_change",
                  "skip_change", "skip_change_negative"):
            d[k] = _num(getattr(self, k))
        if self.skip_change is not None and self.skip_change_negative is not None:
            d["skip_contrast"] = _num(self.skip_change - self.skip_change_negative)
        return d


RANK_KEYS = ("first_difference", "relative_change", "skip_change")


@dataclass
class LayerRanking:
    """Scores of every block in execution order, and rankings by each score."""

    layers: list[LayerScore]
    info: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)    # what find_layers wrote: captures, ranking, plot

    def ranked(self, by: str = "first_difference") -> list[LayerScore]:
        if by not in RANK_KEYS:
            raise ValueError(f"rank by one of {RANK_KEYS}, got {by!r}")
        scored = [s for s in self.layers if getattr(s, by) is not None and not math.isnan(getattr(s, by))]
        return sorted(scored, key=lambda s: (-getattr(s, by), s.layer.position))

    def top(self, k: int = 5, by: str = "first_difference") -> list[str]:
        return [s.layer.name for s in self.ranked(by)[:k]]

    def to_dict(self, top: int = 5) -> dict:
        d = dict(self.info)
        d["layers"] = [s.to_dict() for s in self.layers]
        for key in RANK_KEYS:
            ranked = self.ranked(key)
            if ranked:
                d[f"ranking_{key}"] = [s.layer.name for s in ranked]
        d["candidates"] = self.top(top) if self.ranked("first_difference") else self.top(top, "skip_change")
        return d


def _rank(layers: list[Layer], cos: dict[str, list[torch.Tensor]] | None,
          tok: dict[str, list[torch.Tensor]] | None, skip: dict[str, list[torch.Tensor]] | None) -> list[LayerScore]:
    scores = []
    prev = 1.0
    for layer in layers:
        s = LayerScore(layer)
        if cos is not None:
            c = torch.cat(cos[layer.name]).double()
            s.cosine = float(c.mean())
            s.cosine_std = float(c.std(unbiased=False)) if c.numel() > 1 else 0.0
            s.token_cosine = float(torch.cat([t.mean(-1) for t in tok[layer.name]]).double().mean())
            s.first_difference = prev - s.cosine
            s.relative_change = s.first_difference / abs(prev) if abs(prev) > 1e-12 else float("nan")
            prev = s.cosine
        if skip is not None and layer.name in skip:
            v = torch.cat(skip[layer.name]).double()     # (pairs * steps, 2)
            s.skip_change = float(v[:, 0].mean())
            s.skip_change_negative = float(v[:, 1].mean())
        scores.append(s)
    return scores


def plot_ranking(ranking: LayerRanking, path, *, top: int = 5, title: str | None = None) -> Path:
    """cosine per layer with the top candidates (by first difference) marked; first difference
    and, when measured, skip-mode change below. Saved as PNG with matplotlib's Agg backend."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    scores = ranking.layers
    names = [s.layer.name for s in scores]
    x = list(range(len(scores)))
    has_cos = any(s.cosine is not None for s in scores)
    has_skip = any(s.skip_change is not None for s in scores)
    panels = [p for p, on in (("cos", has_cos), ("diff", has_cos), ("skip", has_skip)) if on]
    if not panels:
        raise ValueError("nothing to plot: the ranking has neither cosine nor skip scores")
    width = min(40.0, max(8.0, 0.22 * len(scores)))
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 2.8 * len(panels) + 0.8), sharex=True,
                             squeeze=False)
    axes = axes[:, 0]
    cand = set(ranking.top(top)) if has_cos else set(ranking.top(top, "skip_change"))
    cidx = [i for i, n in enumerate(names) if n in cand]
    # part boundaries (down | mid | up, double | single)
    bounds = [i - 0.5 for i in range(1, len(scores)) if scores[i].layer.part != scores[i - 1].layer.part]
    for ax, panel in zip(axes, panels):
        for b in bounds:
            ax.axvline(b, color="0.7", lw=0.8, ls="--")
        if panel == "cos":
            y = [s.cosine for s in scores]
            ax.plot(x, y, "-o", ms=3, color="tab:blue", label="cosine(pos, neg)")
            ax.plot(cidx, [y[i] for i in cidx], "o", ms=9, mfc="none", mec="tab:red", mew=2,
                    label=f"top {len(cidx)} by first difference")
            for i in cidx:
                ax.annotate(names[i], (i, y[i]), textcoords="offset points", xytext=(0, -14),
                            ha="center", color="tab:red", fontsize=8)
            ax.set_ylabel("mean cosine")
            ax.legend(loc="lower left", fontsize=8)
        elif panel == "diff":
            y = [s.first_difference for s in scores]
            ax.bar(x, y, color=["tab:red" if n in cand else "tab:gray" for n in names])
            ax.axhline(0, color="k", lw=0.5)
            ax.set_ylabel("first difference\ncos[l-1] - cos[l]")
            rel = [s.relative_change for s in scores]
            ax2 = ax.twinx()
            ax2.plot(x, rel, ".", color="tab:orange", ms=4)
            ax2.set_ylabel("relative change", color="tab:orange")
        else:
            y = [s.skip_change if s.skip_change is not None else 0.0 for s in scores]
            yn = [s.skip_change_negative if s.skip_change_negative is not None else 0.0 for s in scores]
            ax.bar(x, y, color="tab:green", label="positive prompts")
            ax.plot(x, yn, "_", color="k", ms=8, label="negative prompts")
            ax.set_ylabel("skip change\n|p_l - c| / |c|")
            ax.legend(loc="upper right", fontsize=8)
    step = max(1, len(names) // 60)
    axes[-1].set_xticks(x[::step])
    axes[-1].set_xticklabels(names[::step], rotation=90, fontsize=7)
    axes[-1].set_xlabel("layer (execution order)")
    fig.suptitle(title or "CSLG layer finding")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ driver

def _normalise_steps(capture_steps, steps: int) -> list[int]:
    if isinstance(capture_steps, int):
        capture_steps = [capture_steps]
    out = []
    for s in capture_steps:
        if isinstance(s, bool) or not isinstance(s, int) or not -steps <= s < steps:
            raise ValueError(f"capture step {s!r} is outside a {steps}-step run (use 0..{steps - 1} or -1 for the last)")
        out.append(s % steps)
    if not out:
        raise ValueError("capture_steps must name at least one step")
    return sorted(set(out))


def find_layers(target, pairs=None, *, out_dir=None, mode: str = "both", steps: int | None = None,
                capture_steps: int | Iterable[int] = -1, seed: int = 0, batch_pairs: int = 4,
                skip_chunk: int = 8, skip_layers=None, height: int | None = None, width: int | None = None,
                top: int = 5, full_captures: bool = False, pipeline_kwargs: dict | None = None,
                device=None, dtype: torch.dtype | None = None, progress: bool = True) -> LayerRanking:
    """Rank the blocks of a model by how much they separate contrastive prompt pairs.

    target: a diffusers pipeline, a bare denoiser, or a preset name (built with random weights).
    pairs: a JSON path, a list of pairs, or None for the shipped visible-text pairs.
    mode: "cosine" (attention-output contrast), "skip" (skip-one-layer change) or "both".
    steps: sampling steps (default 4 for a bare model, 28 for a pipeline); capture_steps: which
    denoiser calls are captured (default -1, the last). Pair i uses seed ``seed + i`` for both
    its prompts. height / width: latent pixels of a bare model's sample (a pipeline takes its
    own ``height`` / ``width`` in pipeline_kwargs). skip_layers: restrict skip mode to these
    layers (any layer spec). Writes captures.safetensors, ranking.json and layers.png to out_dir
    when given.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if batch_pairs < 1:
        raise ValueError(f"batch_pairs must be >= 1, got {batch_pairs}")
    pair_list = load_pairs(pairs)
    if isinstance(target, str):
        from .presets import build_model
        target = build_model(target, device=device or "cpu", dtype=dtype or torch.float32)
    model, pipe = _denoiser_of(target)
    family = model_family(model)
    if pipe is None:
        steps = steps or DEFAULT_BARE_STEPS
        runner = _BareRunner(model, steps, height, width)
    else:
        steps = steps or DEFAULT_PIPELINE_STEPS
        if height is not None or width is not None:
            raise ValueError("with a pipeline, pass height / width (image pixels) in pipeline_kwargs")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    cap = _normalise_steps(capture_steps, steps)
    sites = capture_sites(model)
    layers = [l for l, _, _ in sites]
    skip_set = list(resolve_layers(model, skip_layers, "skip_layers")) if skip_layers is not None else layers
    do_cos, do_skip = mode in ("cosine", "both"), mode in ("skip", "both")

    batches = [list(range(i, min(i + batch_pairs, len(pair_list)))) for i in range(0, len(pair_list), batch_pairs)]
    n_chunks = math.ceil(len(skip_set) / skip_chunk) if do_skip else 0
    total = len(batches) * (steps + len(cap) * n_chunks)
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc=f"layers ({family})", unit="fwd", disable=not progress)

    cos = {l.name: [] for l in layers} if do_cos else None
    tok = {l.name: [] for l in layers} if do_cos else None
    skip = {l.name: [] for l in skip_set} if do_skip else None
    tensors: dict[str, list[torch.Tensor]] = {}
    try:
        for idx in batches:
            prompts = [p for i in idx for p in (pair_list[i].positive, pair_list[i].negative)]
            seeds = [seed + i for i in idx for _ in (0, 1)]
            session = _Session(model, sites if do_cos else [], set(cap), len(prompts), full_captures, bar)
            with session.hooks():
                if pipe is None:
                    runner.run(prompts, seeds)
                else:
                    _run_pipeline(pipe, prompts, seeds, steps, pipeline_kwargs or {})
            if session.calls != steps:
                raise RuntimeError(f"layer finding: the denoiser ran {session.calls} times in a {steps}-step "
                                   "run; only pipelines that call it once per step are supported")
            for call in cap:
                if do_cos:
                    for layer in layers:
                        st = session.stats[call][layer.name]
                        cos[layer.name].append(st["cos"])
                        tok[layer.name].append(st["token_cos"])
                        for k, v in st.items():
                            tensors.setdefault(f"step{call}/{layer.name}/{k}", []).append(v)
                if do_skip:
                    sample, t, kw = session.inputs[call]
                    ch = skip_changes(model, sample, t, kw, skip_set, chunk=skip_chunk, bar=bar)
                    for j, layer in enumerate(skip_set):
                        v = ch[j].view(-1, 2).float()            # (pairs, [pos, neg])
                        skip[layer.name].append(v)
                        tensors.setdefault(f"step{call}/{layer.name}/skip", []).append(v)
    finally:
        bar.close()

    scores = _rank(layers, cos, tok, skip)
    info = {
        "model": type(model).__name__, "family": family, "mode": mode,
        "input": "pipeline" if pipe is not None else "bare model with pseudo-embeddings",
        "pairs": len(pair_list), "steps": steps, "capture_steps": cap, "seed": seed,
        "metric": {
            "cosine": "cosine between the pair's flattened (tokens x channels) attention outputs, "
                      "mean over pairs and capture steps",
            "first_difference": "cos[l-1] - cos[l] in execution order (cos[-1] = 1)",
            "relative_change": "first_difference / |cos[l-1]|",
            "skip_change": "|p_l - c| / |c|: prediction with block l bypassed vs unperturbed, "
                           "mean over positive prompts (skip_change_negative: negative prompts)",
        },
        "sites": {l.name: desc for l, _, desc in sites},
        "prompt_pairs": [{"positive": p.positive, "negative": p.negative} for p in pair_list],
    }
    ranking = LayerRanking(scores, info)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        flat = {k: torch.cat(v).contiguous() for k, v in tensors.items()}
        meta = {"layers": json.dumps([l.name for l in layers]), "capture_steps": json.dumps(cap),
                "pairs": json.dumps(info["prompt_pairs"]), "sites": json.dumps(info["sites"]),
                "rows": "per pair, in pairs-file order; pos = positive prompt, neg = negative prompt"}
        if flat:
            save_file(flat, str(out / "captures.safetensors"), metadata=meta)
            ranking.paths["captures"] = str(out / "captures.safetensors")
        (out / "ranking.json").write_text(json.dumps(ranking.to_dict(top), indent=2) + "\n")
        ranking.paths["ranking"] = str(out / "ranking.json")
        ranking.paths["plot"] = str(plot_ranking(ranking, out / "layers.png", top=top,
                                                 title=f"CSLG layer finding: {type(model).__name__}, "
                                                       f"{len(pair_list)} pairs"))
    return ranking


def run_cli(args) -> LayerRanking:
    """``guidance-rt layers``: a preset (random weights) or a local pipeline folder."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    if args.preset:
        from .presets import build_model, get_preset
        if get_preset(args.preset).tiny and torch.device(device).type == "cpu":
            torch.set_num_threads(1)   # tiny models: one intra-op thread is fastest (as guidance-rt bench)
        target = build_model(args.preset, device=device, dtype=dtype)
    else:
        folder = Path(args.model)
        if not folder.is_dir():
            raise ValueError(f"--model {folder} is not a local pipeline folder (nothing is downloaded)")
        from diffusers import DiffusionPipeline
        target = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True).to(device)
        target.set_progress_bar_config(disable=True)
    pairs = args.pairs if args.pairs is not None else SHIPPED_PAIRS
    return find_layers(target, pairs, out_dir=args.out, mode=args.mode, steps=args.steps,
                       capture_steps=args.capture_steps or -1, seed=args.seed, batch_pairs=args.batch_pairs,
                       skip_chunk=args.skip_chunk, skip_layers=args.skip_layers, top=args.top,
                       full_captures=args.full_captures, progress=True)


def format_ranking(ranking: LayerRanking, top: int = 5) -> str:
    """A short text table of the top candidates (for the command line)."""
    lines = []
    if ranking.ranked("first_difference"):
        lines.append(f"top {top} by first difference (cos[l-1] - cos[l]):")
        for s in ranking.ranked("first_difference")[:top]:
            lines.append(f"  {s.layer.name:>6}  cosine {s.cosine:.4f}  first diff {s.first_difference:+.4f}  "
                         f"relative {s.relative_change:+.4f}")
    if ranking.ranked("skip_change"):
        lines.append(f"top {top} by skip change |p_l - c| / |c|:")
        for s in ranking.ranked("skip_change")[:top]:
            lines.append(f"  {s.layer.name:>6}  positive {s.skip_change:.4f}  negative {s.skip_change_negative:.4f}")
    for k, v in ranking.paths.items():
        lines.append(f"{k}: {v}")
    return "\n".join(lines)
