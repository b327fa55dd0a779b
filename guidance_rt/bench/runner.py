"""The benchmark harness behind `guidance-rt bench` and the pytest-benchmark suites.

What is measured (shared/perf.md), for each model preset, batch size and guidance configuration,
for every implementation in the same process on the same inputs:

- implementations: ``guidance-rt`` (the packed GuidedDenoiser), ``reference`` (the sequential
  oracle, one plain forward per branch), and the installed peers that do the same job:
  ``diffusers`` (the stock pipelines' denoiser calls: CFG at 2B, the PAG pipelines' packed 3B
  call with diffusers' PAG attention processors, the SD3 pipeline's SLG second call at B with
  ``skip_layers``) and ``diffusers-guiders`` (``diffusers.guiders``, one denoiser call per branch
  as the modular pipelines run them). An implementation that does not offer a configuration has
  no row; a peer that crashes, or whose perturbation changes nothing (its output equals the CFG-only
  prediction), is reported MISSING with the reason; one whose output differs from the reference
  is flagged with the relative difference.
- the guided step: one denoiser call (every branch of the step) at the *probe step*, the first
  step of a ``steps``-step run (from step 1 on, where every peer's window is open) in which the
  most terms are active. Warm-up calls first, then ``repeats`` rounds of timed calls, each round
  one call of every (configuration, implementation) of a preset and batch, so that a burst of
  load on a shared machine lands on all of them alike; inputs rotate over three sets. CUDA events
  on a GPU, ``perf_counter`` elsewhere. Median and interquartile range.
- ratio: the configuration's median over the CFG-only step's median of the same implementation.
- floor: the same ratio in FLOPs of the rows each block really runs in guidance-rt's packed
  forward (``torch.utils.flop_counter`` around the GuidedDenoiser call; on a meta-device copy,
  or on the model itself for small models on the CPU). efficiency = floor / ratio.
- peak memory: CUDA: ``max_memory_allocated`` during one step minus what was allocated before;
  CPU: the peak of live tensor storage created by the step's ATen ops (a dispatch-mode tracker;
  temporaries inside a kernel are not seen). Weights and inputs are excluded on both.
- img/s: batch / (steps x median step), the denoiser's share of an N-step generation.

CPU absolute times say nothing about a GPU; CPU ratios on the tiny presets show the structure
(rows, forks) but not the kernels. Results are dicts (one per row) that the CLI prints and writes
as JSON.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import statistics
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import presets, reference, spec as spec_mod
from ..denoiser import GuidedDenoiser
from ..layers import model_family, resolve_layers
from ..standard import IMPLEMENTATIONS, STANDARD, standard_names
from ..terms import CFG, PAG, SEG, SLG, Guidance

# ------------------------------------------------------------------------------------------------
# Standard configurations (the table: standard.py, which the command line reads without torch)

FAMILY_PRESET = {"unet": "tiny-sdxl", "sd3": "tiny-sd3", "flux": "tiny-flux"}
OURS = ("guidance-rt", "reference")
COLUMNS = ("preset", "family", "batch", "latent", "config", "spec", "guidance", "implementation",
           "status", "reason", "step", "steps", "median_ms", "iqr_ms", "min_ms", "max_ms", "ratio",
           "floor", "efficiency", "peak_memory_mib", "memory_method", "images_per_s",
           "rel_vs_reference", "vs_peer", "vs_peer_impl", "noisy", "flops", "baseline_flops", "block_rows",
           "times_ms")
PEERS = tuple(i for i in IMPLEMENTATIONS if i not in OURS)
NOISY_IQR = 0.2   # a timing whose IQR exceeds this fraction of its median is re-timed, then flagged


class Unsupported(Exception):
    """The implementation does not offer this configuration (no row)."""


@dataclass
class Config:
    name: str
    guidance: Guidance
    spec: str
    standard: bool = False


def standard_configs(family: str) -> list[Config]:
    """The standard set for a family; configurations whose terms do not exist are left out."""
    out = []
    for fam, name, text in STANDARD:
        if fam != family:
            continue
        try:
            g = spec_mod.parse_spec(text)
        except spec_mod.SpecError:
            continue  # e.g. NAG / CSLG not in this build
        out.append(Config(name, g, text, True))
    if family == "flux" and len(out) <= 1:
        return []  # only the plain baseline: nothing guided to show
    return out


def baseline_guidance(g: Guidance) -> Guidance:
    """The CFG-only step of a configuration (no guidance at all when it has no CFG)."""
    c = g.cfg
    if c is None:
        return Guidance()
    if type(c) is CFG:
        return Guidance(c)
    return Guidance(CFG(scale=c.scale, rescale=c.rescale, start=c.start, stop=c.stop))  # SCFG -> CFG


def resolve_configs(items: list[str] | None, family: str) -> list[Config]:
    """--guidance values: standard names (case-insensitive) or specs / JSON / files."""
    if not items:
        return standard_configs(family)
    names = {name.lower(): name for fam, name, _ in STANDARD if fam == family}
    out = []
    for item in items:
        std = [c for c in standard_configs(family) if c.name.lower() == item.strip().lower()]
        if std:
            out.append(std[0])
            continue
        if item.strip().lower() in names:
            raise ValueError(f"configuration {item!r} needs a term this build does not have")
        other = [fam for fam, name, _ in STANDARD if name.lower() == item.strip().lower()]
        if other:
            raise ValueError(f"{item!r} is a standard configuration of {other[0]} models, not of "
                             f"{family} ones; for {family}: {', '.join(standard_names()[family])}")
        g = spec_mod.load_guidance(item)
        out.append(Config(spec_mod.format_spec(g) or "plain", g, spec_mod.format_spec(g)))
    return out


# ------------------------------------------------------------------------------------------------
# Models

@dataclass
class Target:
    label: str
    family: str
    model: torch.nn.Module
    preset: str | None          # preset name, or None for a model folder
    description: str = ""

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _model_class(config: dict):
    import diffusers

    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if name else None
    if cls is None:
        raise ValueError(f"model class {name!r} is not a diffusers model class")
    return cls


def load_model_folder(path: str, *, dtype=torch.float32, device="cpu") -> torch.nn.Module:
    """A denoiser from a local folder: a model saved with save_pretrained (config.json), or a
    pipeline folder (model_index.json) with a ``unet`` or ``transformer`` subfolder."""
    import json

    path = os.path.expanduser(path)
    if os.path.isfile(os.path.join(path, "model_index.json")):
        for sub in ("unet", "transformer"):
            if os.path.isfile(os.path.join(path, sub, "config.json")):
                return load_model_folder(os.path.join(path, sub), dtype=dtype, device=device)
        raise ValueError(f"pipeline folder {path} has no unet/ or transformer/ subfolder")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path} is not a diffusers model folder (no config.json or model_index.json)")
    with open(cfg_path) as f:
        cls = _model_class(json.load(f))
    model = cls.from_pretrained(path, dtype=dtype, local_files_only=True)
    model_family(model)  # a clear error for unsupported classes
    return model.to(device).eval()


def load_target(preset: str, *, dtype=torch.float32, device="cpu", seed: int = 0) -> Target:
    if os.path.isdir(os.path.expanduser(preset)):
        model = load_model_folder(preset, dtype=dtype, device=device)
        return Target(os.path.basename(os.path.normpath(preset)) or preset, model_family(model), model,
                      None, f"{type(model).__name__} from {preset}")
    p = presets.get_preset(preset)
    model = presets.build_model(preset, dtype=dtype, device=device, seed=seed)
    return Target(preset, p.family, model, preset, p.description)


def meta_copy(target: Target, dtype) -> torch.nn.Module:
    if target.preset is not None:
        return presets.build_model(target.preset, dtype=dtype, device="meta")
    with torch.device("meta"):
        return type(target.model).from_config(target.model.config).to(dtype).eval()


# ------------------------------------------------------------------------------------------------
# Inputs and steps

def _cat(values: list, unbatched=("txt_ids", "img_ids"), name: str = ""):
    first = values[0]
    if isinstance(first, torch.Tensor):
        if name in unbatched or first.dim() == 0:
            return first
        return torch.cat(values)
    if isinstance(first, dict):
        return {k: _cat([v[k] for v in values], unbatched, k) for k in first}
    return first


def probe_step(guidance: Guidance, steps: int) -> int:
    """The first step of an N-step run (from step 1 on when possible) with the most active terms."""
    def active(i):
        return sum(1 for t in guidance.terms if t.in_window(i, steps))

    order = list(range(1, steps)) + [0] if steps > 1 else [0]
    return max(order, key=lambda i: (active(i), -order.index(i)))


@dataclass
class Ctx:
    target: Target
    steps: int
    step: int
    seed: int
    dtype: torch.dtype
    device: torch.device

    def generator(self):
        return torch.Generator().manual_seed(self.seed)


@dataclass
class Prepared:
    fn: Callable[[dict], torch.Tensor]
    setup: Callable[[], None] | None = None
    teardown: Callable[[], None] | None = None
    extra: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def active(self):
        if self.setup:
            self.setup()
        try:
            yield
        finally:
            if self.teardown:
                self.teardown()


def _model_call(model, sample, timestep, kwargs, **extra):
    return model(sample, timestep=timestep, **kwargs, **extra, return_dict=False)[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.double() - b.double()).norm()
    n = b.double().norm()
    return float(d / n) if n > 0 else float(d)


# ---------------------------------------------------------------- guidance-rt and the reference

def prepare_packed(ctx: Ctx, g: Guidance) -> Prepared:
    den = GuidedDenoiser(ctx.target.model, g)

    def fn(inp):
        return den(inp["sample"], inp["timestep"], cond=inp["cond"], uncond=inp["uncond"],
                   negative=inp["negative"], step=ctx.step, num_steps=ctx.steps,
                   generator=ctx.generator())

    return Prepared(fn, extra={"denoiser": den})


def prepare_reference(ctx: Ctx, g: Guidance) -> Prepared:
    def fn(inp):
        return reference.step(ctx.target.model, g, inp["sample"], inp["timestep"], cond=inp["cond"],
                              uncond=inp["uncond"], negative=inp["negative"], step=ctx.step,
                              num_steps=ctx.steps, generator=ctx.generator())

    return Prepared(fn)


# ---------------------------------------------------------------- peers

def _split_terms(g: Guidance):
    cfg = g.cfg
    if cfg is not None and type(cfg) is not CFG:
        raise Unsupported(f"no peer offers {type(cfg).__name__}")
    others = [t for t in g.terms if t is not cfg]
    return cfg, others


def _only(term, allowed: set[str], who: str) -> None:
    """A peer understands only some fields of a term: any other one set away from its default
    means the peer does not offer this configuration."""
    import dataclasses as dc

    for f in dc.fields(term):
        if f.name in allowed or f.default is dc.MISSING:
            continue
        if getattr(term, f.name) != f.default:
            raise Unsupported(f"{who} has no {type(term).__name__}.{f.name}")


def _split_peer_terms(g: Guidance):
    cfg, others = _split_terms(g)
    if cfg is not None:
        _only(cfg, {"scale", "start", "stop", "rescale"}, "no peer")
    return cfg, others


def _cfg_rescale(eps, c, r):
    if not r:
        return eps
    from diffusers.guiders.guider_utils import rescale_noise_cfg
    return rescale_noise_cfg(eps, c, r)


def _restore_processors(model, original):
    if hasattr(model, "attn_processors"):
        current = model.attn_processors
        if any(current[k] is not original[k] for k in original):
            model.set_attn_processor(dict(original))


def prepare_diffusers(ctx: Ctx, g: Guidance) -> Prepared:
    """The stock diffusers pipelines' denoiser calls for the same step."""
    cfg, others = _split_peer_terms(g)
    model, family, i, n = ctx.target.model, ctx.target.family, ctx.step, ctx.steps
    w = cfg.scale if cfg is not None and cfg.in_window(i, n) and cfg.scale != 1.0 else None
    rescale = cfg.rescale if cfg is not None else 0.0

    def cfg_call(inp):
        x, t, c, u = inp["sample"], inp["timestep"], inp["cond"], inp["uncond"]
        if w is None:
            e = _model_call(model, x, t, c)
            return e, e, None
        if family == "flux":  # FluxPipeline's true CFG: two calls at B
            ec = _model_call(model, x, t, c)
            eu = _model_call(model, x, t, u)
        else:
            out = _model_call(model, torch.cat([x, x]), t.repeat(2), _cat([u, c]))
            eu, ec = out.chunk(2)
        return eu + w * (ec - eu), ec, eu

    if not others:
        def fn(inp):
            eps, ec, _ = cfg_call(inp)
            return _cfg_rescale(eps, ec, rescale) if w is not None else eps
        return Prepared(fn)
    if len(others) > 1:
        raise Unsupported("no diffusers pipeline combines several perturbation terms")
    term = others[0]
    if isinstance(term, PAG) and family in ("unet", "sd3"):
        return _prepare_pag_pipeline(ctx, term, w, rescale)
    if isinstance(term, SLG) and family == "sd3":
        _only(term, {"scale", "start", "stop", "layers"}, "the SD3 pipeline")
        if w is None:
            raise Unsupported("the SD3 pipeline applies SLG only together with CFG")
        layers = resolve_layers(model, term.layers, "SLG")
        indices = [int(layer.name) for layer in layers]
        s = term.scale
        # StableDiffusion3Pipeline: N*start < i < N*stop (strict)
        on = n * term.start < i < n * term.stop

        def fn(inp):
            eps, ec, _ = cfg_call(inp)
            if on:
                ep = _model_call(model, inp["sample"], inp["timestep"], inp["cond"], skip_layers=indices)
                eps = eps + (ec - ep) * s
            return _cfg_rescale(eps, ec, rescale)
        return Prepared(fn)
    raise Unsupported(f"no diffusers pipeline offers {type(term).__name__} on {family} models")


def _prepare_pag_pipeline(ctx: Ctx, term: PAG, w, rescale) -> Prepared:
    import re

    import diffusers as D

    model, family = ctx.target.model, ctx.target.family
    _only(term, {"scale", "start", "stop", "layers", "adaptive_scale"}, "diffusers' PAG pipelines")
    layers = resolve_layers(model, term.layers, "PAG")
    attn = "attn1" if family == "unet" else "attn"   # the block's self / joint attention
    ids = [rf"^{re.escape(layer.path)}\.{attn}$" for layer in layers]
    if family == "unet":
        pipe = D.StableDiffusionXLPAGPipeline(vae=None, text_encoder=None, text_encoder_2=None,
                                              tokenizer=None, tokenizer_2=None, unet=model,
                                              scheduler=None, pag_applied_layers=ids)
    else:
        pipe = D.StableDiffusion3PAGPipeline(transformer=None, scheduler=None, vae=None,
                                             text_encoder=None, tokenizer=None, text_encoder_2=None,
                                             tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
                                             pag_applied_layers=ids)
        pipe.transformer = model
    original = dict(model.attn_processors)
    do_cfg = w is not None

    def setup():
        pipe._set_pag_attn_processor(pag_applied_layers=ids, do_classifier_free_guidance=do_cfg)

    def teardown():
        _restore_processors(model, original)

    def fn(inp):
        x, t, c, u = inp["sample"], inp["timestep"], inp["cond"], inp["uncond"]
        s = term.scale
        if term.adaptive_scale:
            s = max(0.0, s - term.adaptive_scale * (1000 - float(t.flatten()[0])))
        if do_cfg:   # PAGCFG...Processor: chunk order [uncond, cond, cond-perturbed]
            out = _model_call(model, torch.cat([x] * 3), t.repeat(3), _cat([u, c, c]))
            eu, ec, ep = out.chunk(3)
            eps = eu + w * (ec - eu) + s * (ec - ep)
            return _cfg_rescale(eps, ec, rescale)
        out = _model_call(model, torch.cat([x] * 2), t.repeat(2), _cat([c, c]))
        ec, ep = out.chunk(2)
        return ec + s * (ec - ep)

    return Prepared(fn, setup, teardown)


def _layer_groups(layers) -> list[tuple[str, list[int]]]:
    """diffusers' (fqn, indices) addressing of our blocks: path = fqn.index."""
    groups: dict[str, list[int]] = {}
    for layer in layers:
        fqn, index = layer.path.rsplit(".", 1)
        groups.setdefault(fqn, []).append(int(index))
    return list(groups.items())


def _flatten(d: dict, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}__"))
        else:
            out[prefix + k] = v
    return out


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for k, v in flat.items():
        parts = k.split("__")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def prepare_guiders(ctx: Ctx, g: Guidance) -> Prepared:
    """diffusers.guiders, run as the modular pipelines run them: one denoiser call per branch,
    with the guider's hooks installed around the perturbed call."""
    from diffusers import guiders as G
    from diffusers.hooks import HookRegistry, LayerSkipConfig
    from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceConfig

    cfg, others = _split_peer_terms(g)
    model = ctx.target.model
    w = cfg.scale if cfg is not None else 1.0
    common = dict(guidance_scale=w, guidance_rescale=cfg.rescale if cfg else 0.0,
                  start=cfg.start if cfg else 0.0, stop=cfg.stop if cfg else 1.0)
    if len(others) > 1:
        raise Unsupported("a diffusers guider applies one method")
    hook_names: list[str] = []
    if not others:
        guider = G.ClassifierFreeGuidance(**common)
    else:
        term = others[0]
        if not isinstance(term, (PAG, SEG, SLG)):
            raise Unsupported(f"no diffusers guider for {type(term).__name__}")
        groups = _layer_groups(resolve_layers(model, term.layers, type(term).__name__))
        if isinstance(term, PAG):
            _only(term, {"scale", "start", "stop", "layers"}, "the PAG guider")
            configs = [LayerSkipConfig(indices=ix, fqn=fqn, skip_attention=False,
                                       skip_attention_scores=True, skip_ff=False) for fqn, ix in groups]
            guider = G.PerturbedAttentionGuidance(
                perturbed_guidance_scale=term.scale, perturbed_guidance_start=term.start,
                perturbed_guidance_stop=term.stop, perturbed_guidance_config=configs, **common)
            hook_names = guider._skip_layer_hook_names
        elif isinstance(term, SEG):
            _only(term, {"scale", "start", "stop", "layers", "sigma"}, "the SEG guider")
            configs = [SmoothedEnergyGuidanceConfig(indices=ix, fqn=fqn) for fqn, ix in groups]
            guider = G.SmoothedEnergyGuidance(
                seg_guidance_scale=term.scale, seg_blur_sigma=min(term.sigma, 9999999.0),
                seg_guidance_start=term.start, seg_guidance_stop=term.stop,
                seg_guidance_config=configs, **common)
            hook_names = guider._seg_layer_hook_names
        elif isinstance(term, SLG):
            _only(term, {"scale", "start", "stop", "layers", "skip"}, "the SLG guider")
            configs = [LayerSkipConfig(indices=ix, fqn=fqn, skip_attention=term.skip in ("block", "attn"),
                                       skip_ff=term.skip in ("block", "ff")) for fqn, ix in groups]
            guider = G.SkipLayerGuidance(
                skip_layer_guidance_scale=term.scale, skip_layer_guidance_start=term.start,
                skip_layer_guidance_stop=term.stop, skip_layer_config=configs, **common)
            hook_names = guider._skip_layer_hook_names
        else:
            raise Unsupported(f"no diffusers guider for {type(term).__name__}")

    had = {id(m) for m in model.modules() if "forward" in m.__dict__ or hasattr(m, "_diffusers_hook")}

    def cleanup():
        """Remove the guider's hooks (also after a crash) and the hook registries and forward
        wrappers diffusers leaves on the modules even after its own cleanup."""
        for name in hook_names:
            with contextlib.suppress(Exception):
                HookRegistry.check_if_exists_or_initialize(model).remove_hook(name, recurse=True)
        for m in model.modules():
            if id(m) in had:
                continue
            m.__dict__.pop("forward", None)
            if "_diffusers_hook" in m.__dict__:
                del m._diffusers_hook
        for m in model.modules():   # registries that were there before: their caches are stale
            if "_diffusers_hook" in m.__dict__:
                with contextlib.suppress(Exception):
                    m._diffusers_hook.invalidate_child_registries_cache()

    def fn(inp):
        x, t = inp["sample"], inp["timestep"]
        cond = _flatten(inp["cond"])
        uncond = _flatten(inp["uncond"]) if inp["uncond"] is not None else cond
        data = {k: (cond[k], uncond[k]) for k in cond}
        guider.set_state(step=ctx.step, num_inference_steps=ctx.steps, timestep=t)
        batches = guider.prepare_inputs(data)
        for b in batches:
            guider.prepare_models(model)
            try:
                kwargs = _unflatten({k: getattr(b, k) for k in cond})
                b.noise_pred = _model_call(model, x, t, kwargs)
            finally:
                guider.cleanup_models(model)
        return guider(batches).pred

    return Prepared(fn, teardown=cleanup)


PREPARE = {
    "guidance-rt": prepare_packed,
    "reference": prepare_reference,
    "diffusers-pipelines": prepare_diffusers,
    "diffusers-guiders": prepare_guiders,
}


# ------------------------------------------------------------------------------------------------
# Measurement

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, inputs: list[dict], *, warmup: int, repeats: int, device) -> list[float]:
    """Milliseconds per call, after warm-up, rotating over the input sets."""
    with torch.no_grad():
        for k in range(warmup):
            fn(inputs[k % len(inputs)])
        _sync(device)
        if device.type == "cuda":
            events = []
            for k in range(repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn(inputs[k % len(inputs)])
                b.record()
                events.append((a, b))
            torch.cuda.synchronize(device)
            return [a.elapsed_time(b) for a, b in events]
        times = []
        for k in range(repeats):
            t0 = time.perf_counter()
            fn(inputs[k % len(inputs)])
            times.append((time.perf_counter() - t0) * 1e3)
        return times


class TensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storage created by ATen ops inside the mode (views and in-place
    results of existing storage are not new memory). Freed storage is subtracted when its last
    reference dies."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key, n):
        self._seen.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        from torch.utils._pytree import tree_leaves

        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            s = t.untyped_storage()
            key = id(s)
            if key in inputs or key in self._seen:
                continue
            n = s.nbytes()
            self._seen.add(key)
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(s, self._free, key, n)
        return out


def peak_memory(fn, inp, device) -> tuple[int | None, str]:
    """(bytes, method) of one call's peak allocation beyond what existed before it."""
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            out = fn(inp)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - before
            del out
            return peak, "torch.cuda.max_memory_allocated"
        if device.type == "cpu":
            tracker = TensorMemory()
            with tracker:
                out = fn(inp)
            del out
            return tracker.peak, "ATen output storage (dispatch tracker)"
    return None, "n/a"


def _cpu_sdpa_flops():
    """FlopCounterMode has no formula for the CPU flash kernel: the SDPA formula on its shapes."""
    from torch.utils import flop_counter as fc

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return {}

    def formula(query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query, key, value)

    return {op: formula}


def count_flops(model, guidance: Guidance, inp: dict, step: int, steps: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    den = GuidedDenoiser(model, guidance, check_inputs=False)
    with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_flops()) as counter, torch.no_grad():
        den(inp["sample"], inp["timestep"], cond=inp["cond"], uncond=inp["uncond"],
            negative=inp["negative"], step=step, num_steps=steps, generator=torch.Generator().manual_seed(0))
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------------------
# The run

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


def default_presets(guidance: list[str] | None) -> list[str]:
    """Without --preset: the tiny preset of every family that has standard configurations; with
    --guidance, those of the families whose own standard names were given, else tiny-sdxl."""
    if guidance:
        wanted = {g.strip().lower() for g in guidance}
        fams = [fam for fam, names in standard_names().items()
                if standard_configs(fam) and wanted & {n.lower() for n in names if n not in ("CFG", "plain")}]
        return [FAMILY_PRESET[f] for f in fams] or [FAMILY_PRESET["unet"]]
    return [FAMILY_PRESET[f] for f in ("unet", "sd3", "flux") if standard_configs(f)]


def ordered_configs(configs: list[Config]) -> list[Config]:
    """Each configuration's CFG-only step first (added when it is not one of them), then the rest;
    configurations with the same guidance run once."""
    out: list[Config] = []
    for c in configs:
        base = baseline_guidance(c.guidance)
        if not any(x.guidance == base for x in out):
            own = next((x for x in configs if x.guidance == base), None)
            out.append(own or Config("CFG" if base.cfg is not None else "plain", base,
                                     spec_mod.format_spec(base)))
    for c in configs:
        if not any(x.guidance == c.guidance for x in out):
            out.append(c)
    return out


def _is_tiny(preset: str) -> bool:
    """Tiny presets are overhead-bound on a CPU: one intra-op thread is fastest, and stays stable
    when the cores are shared."""
    return preset in presets.PRESETS and presets.PRESETS[preset].tiny


def cpu_threads(o: "Options") -> int:
    names = []
    for p in o.presets:
        names += default_presets(o.guidance) if p == "tiny" else [p]
    return o.threads or (1 if all(_is_tiny(p) for p in names) else torch.get_num_threads())


def _short(e: BaseException, limit: int = 160) -> str:
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tolerance(dtype) -> float:
    return 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2


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
    preset_names = []
    for p in o.presets:
        preset_names += default_presets(o.guidance) if p == "tiny" else [p]
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
        plan = []
        for name in preset_names:
            target = load_target(name, dtype=o.dtype, device=device, seed=o.seed)
            configs = resolve_configs(o.guidance, target.family)
            plan.append((target, configs))
        total = sum(len(ordered_configs(configs)) for _, configs in plan) * len(o.batches) * len(o.implementations)
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, desc="bench", unit="run", file=sys.stderr, leave=False,
                       disable=(None if o.progress is None else not o.progress))
        except ImportError:  # tqdm is a dependency; tolerate its absence anyway
            bar = None
        for target, configs in plan:
            for batch in o.batches:
                rows += _run_target(target, configs, batch, o, device, repeats, warmup, bar, log)
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
    inputs = [presets.example_inputs(target.preset or model, batch=batch, dtype=o.dtype, device=device,
                                     seed=o.seed + k) for k in range(3)]
    h, w = inputs[0]["height"], inputs[0]["width"]
    log(f"{target.label}: {target.description}; {target.params / 1e6:.1f}M parameters; "
        f"batch {batch}, latent {h}x{w}, {o.dtype}".replace("torch.", ""))
    tol = _tolerance(o.dtype)

    # FLOP counts run on a meta-device copy, except for small models on the CPU (there the real
    # forward is quicker than the meta one; the CPU SDPA kernel gets the SDPA formula)
    flop_model, flop_inp = model, inputs[0]
    if device.type != "cpu" or target.params > 5e7:
        try:
            flop_model = meta_copy(target, o.dtype)
            flop_inp = presets.example_inputs(target.preset or model, batch=batch, dtype=o.dtype,
                                              device="meta", seed=o.seed)
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
                       guidance=spec_mod.to_dict(g), latent=[h, w], times_ms=[])
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
                row.update(status="error" if impl in OURS else "missing", reason=f"crashed: {_short(e)}")
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


def _noisy(row: dict) -> bool:
    return row["median_ms"] is not None and row["iqr_ms"] > NOISY_IQR * row["median_ms"]


def _retime_noisy(timed, baselines: dict, inputs, repeats: int, device, bar=None) -> None:
    """Time the rows whose IQR exceeds NOISY_IQR of the median once more (with the baselines their
    ratios divide by, interleaved as before) and keep the new times; rows still that noisy are
    flagged, so the table says the figure is noise instead of showing it as a result."""
    noisy = {id(row) for row, _, _ in timed if row["noisy"]}
    if not noisy:
        return
    partners = {id(baselines[row["_baseline"]]) for row, _, _ in timed
                if id(row) in noisy and row["_baseline"] in baselines}
    again = [entry for entry in timed if id(entry[0]) in noisy | partners]
    _time_interleaved(again, inputs, repeats, device, bar)


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


def summary(rows: list[dict]) -> str:
    """One line per (preset, batch, configuration): guidance-rt's speed-up over each working peer
    (peer ms / guidance-rt ms), and what each other peer does (applies nothing, crashed, differs,
    has no such method)."""
    lines = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["preset"], r["batch"], r["config"]), []).append(r)
    for (preset, batch, config), group in groups.items():
        parts = []
        for r in group:
            impl = r["implementation"]
            if impl not in PEERS:
                continue
            if r["vs_peer"] is not None:
                parts.append(f"{r['vs_peer']:.2f}x {impl}" + (" (noisy)" if r["noisy"] else ""))
            elif r["status"] == "unsupported":
                parts.append(f"{impl} has no such method")
            elif r["status"] == "missing" and r["reason"].startswith("applies nothing"):
                parts.append(f"{impl} applies nothing")
            elif r["status"] in ("missing", "differs"):
                parts.append(f"{impl} {r['reason'].split(':')[0]}")
        if parts:
            lines.append(f"  {preset} b{batch} {config}: " + ", ".join(parts))
    if not lines:
        return ""
    return "guidance-rt's speed-up over each peer (peer ms / guidance-rt ms):\n" + "\n".join(lines) + "\n"


def _block_rows(den, inp, ctx) -> int | None:
    try:
        den.adapter.trace = {}
        with torch.no_grad():
            den(inp["sample"], inp["timestep"], cond=inp["cond"], uncond=inp["uncond"],
                negative=inp["negative"], step=ctx.step, num_steps=ctx.steps, generator=ctx.generator())
        return int(sum(den.adapter.trace.values()))
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            den.adapter.trace = None


def _check(row, prepared: Prepared, impl, inputs, ref, ref_base, o: Options, device, warmup,
           tol) -> Callable | None:
    """Run once and compare with the reference (a crash, a non-finite or a no-op result makes the
    row MISSING, a different one DIFFERS), measure peak memory, warm up. Returns the function to
    time, or None."""
    try:
        with prepared.active():
            with torch.no_grad():
                out = prepared.fn(inputs[0])
            if not torch.isfinite(out).all():
                row.update(status="error" if impl in OURS else "missing", reason="non-finite output")
                return None
            if isinstance(ref, torch.Tensor):
                rel = _rel(out, ref)
                row["rel_vs_reference"] = rel
                effect = _rel(ref, ref_base) if isinstance(ref_base, torch.Tensor) else None
                if (impl != "reference" and effect is not None and effect > 2 * tol
                        and _rel(out, ref_base) < 0.1 * effect):
                    row.update(status="error" if impl in OURS else "missing",
                               reason=f"applies nothing: equals the CFG-only prediction (rel "
                                      f"{_rel(out, ref_base):.1e}) where the reference moves it by {effect:.1e}")
                    return None
                if rel > tol:
                    row.update(status="differs", reason=f"differs from the reference by {rel:.1e} (relative)")
            elif impl != "reference":
                row["reason"] = f"reference unavailable ({ref})"
            del out
            peak, method = peak_memory(prepared.fn, inputs[0], device)
            row.update(peak_memory_mib=None if peak is None else peak / 2**20, memory_method=method)
            fn = torch.compile(prepared.fn) if o.compile else prepared.fn
            time_calls(fn, inputs, warmup=warmup, repeats=0, device=device)
            return fn
    except Exception as e:
        row.update(status="error" if impl in OURS else "missing", reason=f"crashed: {_short(e)}")
        return None


def _time_interleaved(entries, inputs, repeats: int, device, bar=None) -> None:
    """`repeats` rounds; each round times one call of every entry (inputs rotate per round)."""
    times: dict[int, list[float]] = {id(row): [] for row, _, _ in entries}
    failed: set[int] = set()
    if bar is not None and entries:
        bar.set_description(f"timing {entries[0][0]['preset']} b{entries[0][0]['batch']}")
        bar.total += repeats
        bar.refresh()
    for r in range(repeats):
        if bar is not None and entries:
            bar.update(1)
        for row, prepared, fn in entries:
            if id(row) in failed:
                continue
            try:
                with prepared.active():
                    times[id(row)] += time_calls(fn, [inputs[r % len(inputs)]], warmup=0, repeats=1,
                                                 device=device)
            except Exception as e:
                failed.add(id(row))
                row.update(status="error" if row["implementation"] in OURS else "missing",
                           reason=f"crashed while timed: {_short(e)}")
    for row, _, _ in entries:
        t = times[id(row)]
        if id(row) in failed or not t:
            continue
        q = statistics.quantiles(t, n=4) if len(t) >= 2 else [t[0]] * 3
        med = statistics.median(t)
        row.update(median_ms=med, iqr_ms=q[2] - q[0], min_ms=min(t), max_ms=max(t), times_ms=t,
                   images_per_s=row["batch"] * 1000.0 / (med * row["steps"]))
        row["noisy"] = _noisy(row)


# ------------------------------------------------------------------------------------------------
# Environment and output

def environment(device: str | torch.device | None = None) -> dict:
    """Versions, the commit measured, and the device (nvidia-ml-py data on CUDA when installed)."""
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env: dict[str, Any] = {
        "guidance_rt": version("guidance-rt"), "torch": torch.__version__,
        "diffusers": version("diffusers"), "transformers": version("transformers"),
        "triton": version("triton"), "python": platform.python_version(),
        "commit": _git_commit(), "threads": torch.get_num_threads(), "device_type": dev.type,
        "platform": platform.platform(),
    }
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        env["device"] = {"name": props.name, "memory_total_mib": props.total_memory / 2**20,
                         "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
        env["device"].update(nvml_info(idx))
    else:
        env["device"] = {"name": _cpu_name(), "cores": os.cpu_count()}
    return env


def nvml_info(index: int = 0) -> dict:
    """Clocks, power and memory from nvidia-ml-py (pynvml); {} when it is not installed."""
    try:
        import pynvml
    except ImportError:
        return {"nvml": "nvidia-ml-py not installed"}
    out: dict[str, Any] = {}
    try:
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)

        def get(key, f, *args, scale=1.0):
            try:
                v = f(h, *args)
                out[key] = v / scale if isinstance(v, (int, float)) else (v.decode() if isinstance(v, bytes) else v)
            except Exception:
                pass

        get("nvml_name", pynvml.nvmlDeviceGetName)
        get("driver", lambda _h: pynvml.nvmlSystemGetDriverVersion())
        get("sm_clock_mhz", pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_SM)
        get("sm_clock_max_mhz", pynvml.nvmlDeviceGetMaxClockInfo, pynvml.NVML_CLOCK_SM)
        get("mem_clock_mhz", pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_MEM)
        get("mem_clock_max_mhz", pynvml.nvmlDeviceGetMaxClockInfo, pynvml.NVML_CLOCK_MEM)
        get("power_w", pynvml.nvmlDeviceGetPowerUsage, scale=1000.0)
        get("power_limit_w", pynvml.nvmlDeviceGetEnforcedPowerLimit, scale=1000.0)
        get("temperature_c", pynvml.nvmlDeviceGetTemperature, pynvml.NVML_TEMPERATURE_GPU)
        try:
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.update(memory_used_mib=mem.used / 2**20, memory_total_mib_nvml=mem.total / 2**20)
        except Exception:
            pass
    except Exception as e:
        out["nvml"] = f"unavailable: {_short(e)}"
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return out


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "") if sha else None
    except Exception:
        return None


def _fmt(v, spec: str, missing: str = "-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return missing
    return format(v, spec)


def format_table(rows: list[dict]) -> str:
    """The bench table: one block per (preset, batch)."""
    shown = [r for r in rows if r["status"] != "unsupported"]
    head = ("configuration", "implementation", "ms/step", "IQR", "ratio", "floor", "eff",
            "peak MiB", "img/s", "vs ref", "vs peer", "note")
    lines = []
    groups: dict[tuple, list[dict]] = {}
    for r in shown:
        groups.setdefault((r["preset"], r["batch"]), []).append(r)
    for (preset, batch), group in groups.items():
        latent = group[0].get("latent") or ["?", "?"]
        lines.append(f"{preset}  batch {batch}  latent {latent[0]}x{latent[1]}  "
                     f"step {group[0]['step']} of {group[0]['steps']}")
        table = [head]
        last = None
        for r in group:
            note = r["reason"] if r["status"] == "ok" else f"{r['status'].upper()}: {r['reason']}"
            if r["noisy"]:
                noise = f"NOISY: IQR {r['iqr_ms'] / r['median_ms']:.0%} of the median after re-timing"
                note = f"{noise}; {note}" if note else noise
            table.append((r["config"] if r["config"] != last else "", r["implementation"],
                          _fmt(r["median_ms"], ".2f"), _fmt(r["iqr_ms"], ".2f"), _fmt(r["ratio"], ".2f"),
                          _fmt(r["floor"], ".2f"), _fmt(r["efficiency"], ".2f"),
                          _fmt(r["peak_memory_mib"], ".1f"), _fmt(r["images_per_s"], ".3g"),
                          _fmt(r["rel_vs_reference"], ".0e"), _fmt(r["vs_peer"], ".2f"), note))
            last = r["config"]
        widths = [max(len(str(row[i])) for row in table) for i in range(len(head) - 1)]
        for k, row in enumerate(table):
            cells = [str(c).ljust(widths[i]) if i < 2 else str(c).rjust(widths[i])
                     for i, c in enumerate(row[:-1])]
            lines.append("  " + "  ".join(cells) + ("  " + row[-1] if row[-1] else ""))
            if k == 0:
                lines.append("  " + "  ".join("-" * wd for wd in widths))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def to_json_ready(value):
    """Strict-JSON form: non-finite floats become strings, tuples lists, dtypes names."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): to_json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_ready(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def report(rows: list[dict], options: Options, device=None) -> dict:
    o = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options)
    env = environment(device or options.device)
    if env["device_type"] == "cpu":
        env["threads"] = cpu_threads(options)   # what the run used
    return to_json_ready({"environment": env, "options": o,
                          "columns": list(COLUMNS), "results": rows})
