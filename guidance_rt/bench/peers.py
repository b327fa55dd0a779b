"""The peers: the same guided step as the installed diffusers does it, timed beside guidance-rt's.
``diffusers-pipelines`` makes the stock pipelines' denoiser calls (CFG at 2B, the PAG pipelines'
packed 3B call with their PAG attention processors, the SD3 pipeline's SLG second call with
``skip_layers``); ``diffusers-guiders`` runs ``diffusers.guiders`` with one denoiser call per branch,
as the modular pipelines do (APG and CFG-Zero* through their guiders, alone: a guider applies
one method). A term or field a peer has no equivalent for raises Unsupported rather than being
approximated, and each peer leaves the model as it found it, also after a crash.
"""
from __future__ import annotations

import contextlib

import torch

from ..families import FAMILIES, resolve_layers
from ..guidance import Guidance
from ..methods import APG, CFG, PAG, SEG, SLG, CFGZeroStar
from .targets import Ctx, Prepared, Unsupported


def _model_call(model, sample, timestep, kwargs, **extra):
    return model(sample, timestep=timestep, **kwargs, **extra, return_dict=False)[0]


def _cat(values: list, unbatched=("txt_ids", "img_ids"), name: str = ""):
    first = values[0]
    if isinstance(first, torch.Tensor):
        if name in unbatched or first.dim() == 0:
            return first
        return torch.cat(values)
    if isinstance(first, dict):
        return {k: _cat([v[k] for v in values], unbatched, k) for k in first}
    return first


def _split_terms(g: Guidance, offered=(CFG,)):
    cfg = g.cfg
    if cfg is not None and type(cfg) not in offered:
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


def _split_peer_terms(g: Guidance, offered=(CFG,)):
    cfg, others = _split_terms(g, offered)
    if type(cfg) is CFG:
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
        adapter = FAMILIES[family]
        if adapter.uncond_call:  # FluxPipeline's / QwenImagePipeline's true CFG, WanPipeline's CFG: two calls at B
            ec = _model_call(model, x, t, c)
            eu = _model_call(model, x, t, u)
        else:
            out = _model_call(model, torch.cat([x, x]), t.repeat(2), _cat([u, c]))
            eu, ec = out.chunk(2)
        eps = eu + w * (ec - eu)
        if adapter.cfg_renorm:   # QwenImagePipeline: the per-token norm of the cond prediction
            eps = eps * (torch.norm(ec, dim=-1, keepdim=True) / torch.norm(eps, dim=-1, keepdim=True))
        return eps, ec, eu

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

    cfg, others = _split_peer_terms(g, (CFG, APG, CFGZeroStar))
    model = ctx.target.model
    w = cfg.scale if cfg is not None else 1.0
    common = dict(guidance_scale=w, guidance_rescale=cfg.rescale if cfg else 0.0,
                  start=cfg.start if cfg else 0.0, stop=cfg.stop if cfg else 1.0)
    if len(others) + (type(cfg) in (APG, CFGZeroStar)) > 1:
        raise Unsupported("a diffusers guider applies one method")
    hook_names: list[str] = []
    if isinstance(cfg, APG):
        paper = cfg.formulation == "paper"   # c + (w - 1) update: the original formulation at w - 1
        guider = G.AdaptiveProjectedGuidance(
            **{**common, "guidance_scale": w - 1 if paper else w}, use_original_formulation=paper,
            adaptive_projected_guidance_momentum=cfg.momentum,
            adaptive_projected_guidance_rescale=cfg.norm_threshold, eta=cfg.eta)
    elif isinstance(cfg, CFGZeroStar):
        guider = G.ClassifierFreeZeroStarGuidance(zero_init_steps=cfg.zero_init_steps, **common)
    elif not others:
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
