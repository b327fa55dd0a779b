"""The run: options, and for each preset, batch and configuration one row per implementation, built
in the order the measures need: every row prepared and checked first (check.py), then the timed
calls of all of them interleaved (timing.py), then the ratios, floors and vs-peer figures that
relate rows to each other.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import presets, spec as spec_mod
from ..denoiser import GuidedDenoiser
from ..standard import IMPLEMENTATIONS, standard_names
from ..guidance import Guidance
from .check import _check, _tolerance
from .configs import Config, baseline_guidance, default_presets, ordered_configs, probe_step, resolve_configs
from .flops import _block_rows, count_flops
from .implementations import PREPARE, prepare_reference
from .rows import COLUMNS, PEERS, _fail, _short
from .targets import Ctx, Prepared, Target, Unsupported, load_target, meta_copy, preset_size_problem, size_problem
from .timing import _retime_noisy, _time_interleaved


@dataclass
class Options:
    presets: list[str] = field(default_factory=lambda: ["tiny"])
    guidance: list[str] | None = None
    implementations: tuple[str, ...] = IMPLEMENTATIONS
    batches: tuple[int, ...] = (1,)
    steps: int = 30
    repeats: int | None = None
    warmup: int | None = None
    dtype: torch.dtype = torch.float32
    device: str | None = None
    compile: bool = False
    seed: int = 0
    progress: bool | None = None    # None: a bar when stderr is a terminal
    threads: int | None = None      # CPU intra-op threads; None: 1 for tiny presets, else torch's
    size: tuple[int, int] | None = None   # (width, height) image pixels; None: each preset's default


# FLOPs are counted on a meta-device copy on a GPU and for models above this many parameters (on
# the model itself for smaller ones on the CPU, where the real forward is quicker than the meta one)
META_FLOPS_PARAMS = 5e7


def _is_tiny(preset: str) -> bool:
    """Tiny presets are overhead-bound on a CPU: one intra-op thread is fastest, and stays stable
    when the cores are shared."""
    return preset in presets.PRESETS and presets.PRESETS[preset].tiny


def _preset_names(o: Options) -> list[str]:
    """The presets of --preset, with "tiny" standing for the default ones."""
    names = []
    for p in o.presets:
        names += default_presets(o.guidance) if p == "tiny" else [p]
    return names


def cpu_threads(o: Options) -> int:
    return o.threads or (1 if all(_is_tiny(p) for p in _preset_names(o)) else torch.get_num_threads())


def run(options: Options | None = None, log: Callable[[str], None] | None = None, **kw) -> list[dict]:
    """Run the benchmark; returns one dict per (preset, batch, configuration, implementation)
    row with every key of COLUMNS."""
    o = options or Options(**kw)
    log = log or (lambda s: None)
    device = torch.device(o.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    repeats = o.repeats or (50 if device.type == "cuda" else 10)
    warmup = o.warmup if o.warmup is not None else (10 if device.type == "cuda" else 2)
    if o.compile:
        warmup = max(warmup, 3)
    preset_names = _preset_names(o)
    std = {n.lower() for names in standard_names().values() for n in names}
    for item in o.guidance or []:   # spec errors before any model is built
        if item.strip().lower() not in std:
            spec_mod.load_guidance(item)
    unknown_impls = [i for i in o.implementations if i not in PREPARE]
    if unknown_impls:
        raise ValueError(f"unknown implementation(s) {unknown_impls}; valid: {', '.join(PREPARE)}")
    for b in o.batches:
        if b < 1:
            raise ValueError(f"batch sizes must be >= 1, got {b}")
    if o.size is not None:   # presets' sizes are checked before any model is built
        for name in preset_names:
            if name in presets.PRESETS:
                why = preset_size_problem(o.size, name)
                if why:
                    raise ValueError(why)

    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(o))
    from diffusers.utils import logging as dlog
    verbosity = dlog.get_verbosity()
    dlog.set_verbosity_error()   # guiders warn that they are experimental on every construction
    with contextlib.suppress(Exception):   # importing the PAG pipelines warns about torchvision
        from transformers.utils import logging as tlog
        t_verbosity = tlog.get_verbosity()
        tlog.set_verbosity_error()
    rows: list[dict] = []
    bar = None
    try:
        # a preset's model is built when its turn comes, so one full-size model is in memory at a
        # time; a folder is loaded now (its family is known only then)
        plan = []
        for name in preset_names:
            target = None if name in presets.PRESETS else load_target(name, dtype=o.dtype, device=device, seed=o.seed)
            if o.size is not None and target is not None:
                why = size_problem(o.size, target.label, target.family, dict(target.model.config),
                                   target.vae_factor)
                if why:
                    raise ValueError(why)
            plan.append([name, target, presets.PRESETS[name].family if target is None else target.family])
        families = {family for _, _, family in plan}
        plan = [(name, target, resolve_configs(o.guidance, family, families)) for name, target, family in plan]
        total = sum(len(ordered_configs(configs)) for _, _, configs in plan) * len(o.batches) * len(o.implementations)
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, desc="bench", unit="run", file=sys.stderr, leave=False,
                       disable=(None if o.progress is None else not o.progress))
        except ImportError:  # tqdm is a dependency; tolerate its absence anyway
            bar = None
        for name, target, configs in plan:
            target = target or load_target(name, dtype=o.dtype, device=device, seed=o.seed)
            for batch in o.batches:
                rows += _run_target(target, configs, batch, o, device, repeats, warmup, bar, log)
            target = None
    finally:
        if bar is not None:
            bar.close()
        dlog.set_verbosity(verbosity)
        torch.set_num_threads(threads)
        with contextlib.suppress(Exception):
            tlog.set_verbosity(t_verbosity)
    return rows


def _run_target(target: Target, configs: list[Config], batch: int, o: Options, device,
                repeats: int, warmup: int, bar, log) -> list[dict]:
    model = target.model
    # --size (image pixels) as latent pixels; None: the preset's (a folder's config's) default
    lh, lw = (o.size[1] // target.vae_factor, o.size[0] // target.vae_factor) if o.size else (None, None)
    inputs = [presets.example_inputs(target.preset or model, batch=batch, height=lh, width=lw, dtype=o.dtype,
                                     device=device, seed=o.seed + k) for k in range(3)]
    h, w = inputs[0]["height"], inputs[0]["width"]
    size = f"{w * target.vae_factor}x{h * target.vae_factor}"   # image pixels, WxH as --size takes it
    log(f"{target.label}: {target.description}; {target.params / 1e6:.1f}M parameters; "
        f"batch {batch}, {size} pixels (latent {h}x{w}), {o.dtype}".replace("torch.", ""))
    tol = _tolerance(o.dtype)

    # FLOP counts run on a meta-device copy, except for small models on the CPU (there the real
    # forward is quicker than the meta one; the CPU SDPA kernel gets the SDPA formula)
    flop_model, flop_inp = model, inputs[0]
    if device.type != "cpu" or target.params > META_FLOPS_PARAMS:
        try:
            flop_model = meta_copy(target, o.dtype)
            flop_inp = presets.example_inputs(target.preset or model, batch=batch, height=h, width=w,
                                              dtype=o.dtype, device="meta", seed=o.seed)
        except Exception:
            flop_model, flop_inp = model, inputs[0]
    flops_cache: dict[tuple, int | None] = {}

    def flops(g: Guidance, step: int):
        key = (g, step)
        if key not in flops_cache:
            try:
                flops_cache[key] = count_flops(flop_model, g, flop_inp, step, o.steps)
            except Exception:
                try:  # e.g. an op without a meta kernel: count on the real model
                    flops_cache[key] = count_flops(model, g, inputs[0], step, o.steps)
                except Exception:
                    flops_cache[key] = None
        return flops_cache[key]

    rows: list[dict] = []
    timed: list[tuple[dict, Prepared, Callable]] = []
    baselines: dict[tuple, dict] = {}   # (impl, baseline guidance) -> its measured row
    ref_outputs: dict[tuple, torch.Tensor | str] = {}

    def reference_output(g: Guidance, step: int, ctx: Ctx):
        key = (g, step)
        if key not in ref_outputs:
            try:
                with torch.no_grad():
                    ref_outputs[key] = prepare_reference(ctx, g).fn(inputs[0])
            except Exception as e:
                ref_outputs[key] = _short(e)
        return ref_outputs[key]

    for config in ordered_configs(configs):
        g = config.guidance
        step = probe_step(g, o.steps)
        base = baseline_guidance(g)
        ctx = Ctx(target, o.steps, step, o.seed, o.dtype, device)
        try:  # layer names are checked against this model once, for a clear error
            GuidedDenoiser(model, g)
        except Exception as e:
            raise ValueError(f"configuration {config.name!r} on {target.label}: {e}") from None
        f_cfg, f_base = flops(g, step), flops(base, step)
        floor = f_cfg / f_base if f_cfg and f_base else None
        ref = reference_output(g, step, ctx)
        ref_base = reference_output(base, step, ctx)
        for impl in o.implementations:
            if bar is not None:
                bar.set_description(f"{target.label} b{batch} {config.name} {impl}")
            row = dict.fromkeys(COLUMNS)
            row.update(preset=target.label, family=target.family, batch=batch, config=config.name,
                       spec=config.spec, implementation=impl, status="ok", reason="",
                       flops=f_cfg, baseline_flops=f_base, floor=floor, step=step, steps=o.steps,
                       guidance=spec_mod.to_dict(g), latent=[h, w], size=size, times_ms=[])
            try:
                prepared = PREPARE[impl](ctx, g)
            except Unsupported as e:
                if bar is not None:
                    bar.update(1)
                row.update(status="unsupported", reason=str(e))
                row["_baseline"] = None
                rows.append(row)
                continue
            except Exception as e:
                prepared = None
                _fail(row, f"crashed: {_short(e)}")
            if prepared is not None:
                fn = _check(row, prepared, impl, inputs, ref, ref_base, o, device, warmup, tol)
                if fn is not None:
                    timed.append((row, prepared, fn))
            if bar is not None:
                bar.update(1)
            if impl == "guidance-rt" and row["status"] == "ok" and "denoiser" in (prepared.extra if prepared else {}):
                row["block_rows"] = _block_rows(prepared.extra["denoiser"], inputs[0], ctx)
            if g == base:
                baselines[(impl, base)] = row
            row["_baseline"] = (impl, base)
            rows.append(row)

    # timed calls interleaved over every (configuration, implementation): a burst of load on a
    # shared machine then lands on all of them alike, not on one
    _time_interleaved(timed, inputs, repeats, device, bar)
    _retime_noisy(timed, baselines, inputs, repeats, device, bar)
    for row in rows:
        b = baselines.get(row.pop("_baseline", None))
        if row["median_ms"] is not None and b is not None and b.get("median_ms"):
            row["ratio"] = row["median_ms"] / b["median_ms"]
            if row["floor"]:
                row["efficiency"] = row["floor"] / row["ratio"]
    _compare_with_peers(rows)
    return rows


def _compare_with_peers(rows: list[dict]) -> None:
    """vs_peer: on each working peer's row, its ms / guidance-rt's ms (how many times faster
    guidance-rt is); on guidance-rt's row, the same for the fastest working peer."""
    ours = {(r["preset"], r["batch"], r["config"]): r for r in rows
            if r["implementation"] == "guidance-rt" and r["status"] == "ok" and r["median_ms"]}
    for r in rows:
        o = ours.get((r["preset"], r["batch"], r["config"]))
        if o is None or r["implementation"] not in PEERS or r["status"] != "ok" or not r["median_ms"]:
            continue
        r["vs_peer"], r["vs_peer_impl"] = r["median_ms"] / o["median_ms"], r["implementation"]
        if o["vs_peer"] is None or r["vs_peer"] < o["vs_peer"]:
            o["vs_peer"], o["vs_peer_impl"] = r["vs_peer"], r["implementation"]
