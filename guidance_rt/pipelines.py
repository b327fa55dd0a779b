"""guided(pipe, guidance): stock diffusers pipelines with one packed forward per step.

Inside the context the pipeline's own __call__ runs unchanged, except that
- its denoiser's forward is routed through a GuidedDenoiser (an instance attribute `forward`
  shadows the class method; the model's weights, processors and config are untouched),
- the pipeline object gets a subclass whose __call__ first checks the guidance arguments, sets the
  ones the Guidance implies, and numbers the denoiser calls as steps.
On exit, also after an exception, the pipeline's class and the model's `forward` are restored.

The denoiser call returns the guided prediction for every row the pipeline batched, so the
pipeline's own CFG arithmetic ``u + g (c - u)`` with u == c == eps leaves it exactly unchanged.
"""
from __future__ import annotations

import contextlib
import inspect

import torch

from .denoiser import GuidedDenoiser, check_per_sample
from .terms import Guidance

# pipeline class -> (denoiser attribute, family)
SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": "unet",
    "StableDiffusionXLPipeline": "unet",
    "StableDiffusionXLControlNetPipeline": "unet",
    "StableDiffusion3Pipeline": "transformer",
    "FluxPipeline": "transformer",
}
# arguments that would apply guidance outside the Guidance: (pipeline argument, what to use instead)
FOREIGN_GUIDANCE = {
    "skip_guidance_layers": "grt.SLG(layers=...)",
    "skip_layer_guidance_scale": "grt.SLG(scale=...)",
    "pag_scale": "grt.PAG(scale=...)",
}


def _pipeline_kind(pipe) -> str:
    for cls in type(pipe).__mro__:
        if cls.__name__ in SUPPORTED_PIPELINES:
            return cls.__name__
    raise TypeError(f"pipeline {type(pipe).__name__} is not supported by guided(); supported: "
                    f"{', '.join(SUPPORTED_PIPELINES)}")


class _Session:
    """State of one guided pipeline call: the step counter, generator and captured negatives."""

    def __init__(self, den: GuidedDenoiser, kind: str):
        self.den, self.kind = den, kind
        self.reset(None)

    def reset(self, generator):
        self.calls = 0
        self.generator = generator[0] if isinstance(generator, (list, tuple)) else generator
        self.encoded: list = []          # FLUX: encode_prompt results (positive, then negative)
        self.pending = None              # FLUX true CFG: eps returned again for the uncond call
        self.pipe = None
        self.negative = None             # NAG negative conditioning, encoded once per call


def _split(value, batch: int, half: int):
    """Half `half` (0 uncond, 1 cond) of a pipeline-batched argument."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] != 2 * batch:
            return value
        return value[half * batch:(half + 1) * batch]
    if isinstance(value, dict):
        return {k: _split(v, batch, half) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_split(v, batch, half) for v in value)
    return value


def _check_arguments(pipe_name: str, kind: str, guidances: tuple[Guidance, ...], kwargs: dict):
    for name, instead in FOREIGN_GUIDANCE.items():
        if kwargs.get(name) not in (None, [], ()):
            raise ValueError(f"{pipe_name}({name}=...) contradicts guided(): the Guidance "
                             f"decides the guidance; use {instead} instead")
    cfg = guidances[0].cfg            # every per-sample Guidance has CFG, or none has
    scale_arg = "true_cfg_scale" if kind == "FluxPipeline" else "guidance_scale"
    wanted = sorted({g.cfg.scale for g in guidances}) if cfg is not None else [1.0]
    if cfg is not None and wanted[0] <= 1.0:
        raise ValueError(f"guided(): CFG(scale={wanted[0]}) needs scale > 1 in a pipeline (drop the CFG "
                         "term to run without an unconditional branch)")
    given = kwargs.get(scale_arg)
    if given is not None and not (wanted == [given] or (cfg is None and given <= 1.0)):
        raise ValueError(f"{pipe_name}({scale_arg}={given}) contradicts the Guidance "
                         f"({'CFG scale ' + '/'.join(map(str, wanted)) if cfg else 'no CFG term'}); "
                         f"leave {scale_arg} out")
    # the pipeline only needs to know that CFG is on (its own arithmetic leaves eps unchanged)
    kwargs[scale_arg] = wanted[-1]
    rescale = kwargs.get("guidance_rescale")   # rescale is shared by per-sample Guidances
    if rescale not in (None, 0, 0.0) and (cfg is None or rescale != cfg.rescale):
        raise ValueError(f"guidance_rescale={rescale} contradicts the Guidance; use grt.CFG(rescale=...)")
    if kind == "FluxPipeline" and cfg is not None and kwargs.get("negative_prompt") is None \
            and kwargs.get("negative_prompt_embeds") is None:
        raise ValueError("FluxPipeline with a CFG term needs negative_prompt (true CFG)")


def _denoiser_forward(session: _Session, original_forward):
    den = session.den

    def forward(*args, **kwargs):
        pipe_steps = session.pipe._num_timesteps
        sig = inspect.signature(original_forward)
        bound = sig.bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        extra = arguments.pop("kwargs", {}) or {}
        arguments.update(extra)
        return_dict = arguments.pop("return_dict", True)
        sample_key = "sample" if "sample" in arguments else "hidden_states"
        sample = arguments.pop(sample_key)
        timestep = arguments.pop("timestep")
        arguments = {k: v for k, v in arguments.items() if v is not None}

        if session.kind == "FluxPipeline" and session.pending is not None:
            out, session.pending = session.pending, None     # the true-CFG uncond call of this step
            return _wrap(out, return_dict, den)
        step = session.calls
        session.calls += 1
        if session.kind == "FluxPipeline":
            cond, uncond = arguments, None
            if den.guidance.cfg is not None and len(session.encoded) >= 2:
                neg_embeds, neg_pooled, neg_ids = session.encoded[1]
                uncond = dict(arguments, encoder_hidden_states=neg_embeds, pooled_projections=neg_pooled,
                              txt_ids=neg_ids)
            batch = sample.shape[0]
            t = timestep
        else:
            batch = sample.shape[0]
            packed = session.pipe.do_classifier_free_guidance
            if den.guidance.cfg is not None and not packed:
                raise ValueError(f"{type(session.pipe).__name__} runs without classifier-free guidance "
                                 "(e.g. a time_cond_proj_dim model) but the Guidance has a CFG term")
            if packed:
                batch //= 2
            cond = _split(arguments, batch, 1) if packed else arguments
            uncond = _split(arguments, batch, 0) if packed else None
            t = _split(timestep, batch, 1) if isinstance(timestep, torch.Tensor) else timestep
            sample = sample[batch:] if packed else sample
        if step >= pipe_steps:
            raise RuntimeError(f"guided(): denoiser called {step + 1} times in a {pipe_steps}-step run; "
                               "only pipelines that call the denoiser once per step are supported")
        negative = None
        if session.nag_text is not None:
            if session.negative is None:
                session.negative = _encode_nag_negative(session.pipe, session.original_class, session.kind,
                                                        session.nag_text)
            negative = _rows(session.negative, sample.shape[0])
        eps = den(sample, t, cond=cond, uncond=uncond, negative=negative, step=step, num_steps=pipe_steps,
                  generator=session.generator)
        if session.kind == "FluxPipeline":
            if uncond is not None:
                session.pending = eps
            return _wrap(eps, return_dict, den)
        if packed:
            eps = torch.cat([eps, eps])
        return _wrap(eps, return_dict, den)

    return forward


def _encode_nag_negative(pipe, original_class, kind: str, text: str) -> dict:
    """The NAG negative prompt through the pipeline's own text encoders (one row)."""
    device = pipe._execution_device
    encode = lambda **kw: original_class.encode_prompt(pipe, **kw)
    if kind == "FluxPipeline":
        embeds, pooled, ids = encode(prompt=text, prompt_2=None, device=device, num_images_per_prompt=1)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": ids}
    if kind == "StableDiffusion3Pipeline":
        embeds, _, pooled, _ = encode(prompt=text, prompt_2=None, prompt_3=None, device=device,
                                      num_images_per_prompt=1, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    if kind == "StableDiffusionPipeline":
        embeds, _ = encode(prompt=text, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    else:
        embeds = encode(prompt=text, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    return {"encoder_hidden_states": embeds}


def _rows(d: dict, batch: int, unbatched=("txt_ids", "img_ids")) -> dict:
    return {k: v if k in unbatched else v.expand(batch, *v.shape[1:]) for k, v in d.items()}


def _wrap(out, return_dict, den):
    if not return_dict:
        return (out,)
    if den.family == "unet":
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
        return UNet2DConditionOutput(sample=out)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    return Transformer2DModelOutput(sample=out)


@contextlib.contextmanager
def guided(pipe, guidance: Guidance | list[Guidance], *, nag_negative_prompt: str | None = None):
    """Run a stock diffusers pipeline's own __call__ with one packed forward per step.
    With a NAG term, `nag_negative_prompt` is encoded by the pipeline's own text encoders.
    A list of Guidances gives every image of the pipeline's batch its own (see GuidedDenoiser:
    they may differ only in scales and step windows), all in one packed forward per step."""
    guidances = check_per_sample(guidance)
    kind = _pipeline_kind(pipe)
    if guidances[0].nag is not None and nag_negative_prompt is None:
        raise ValueError("the Guidance has a NAG term: pass guided(pipe, guidance, nag_negative_prompt=...) "
                         "(NAG guides away from that prompt)")
    model = getattr(pipe, SUPPORTED_PIPELINES[kind])
    den = GuidedDenoiser(model, guidance)
    session = _Session(den, kind)
    session.nag_text = nag_negative_prompt if guidances[0].nag is not None else None
    original_class = type(pipe)
    session.original_class = original_class
    had_forward = "forward" in model.__dict__
    original_forward = model.__dict__.get("forward")
    stock_forward = model.forward

    def __call__(self, *args, **kwargs):
        params = inspect.signature(original_class.__call__).parameters
        bound = inspect.signature(original_class.__call__).bind(self, *args, **kwargs)
        kwargs = {k: v for k, v in bound.arguments.items() if k != "self"}
        kwargs.update(kwargs.pop("kwargs", {}) if "kwargs" in params else {})
        _check_arguments(original_class.__name__, kind, guidances, kwargs)
        if "guidance_rescale" in params:
            kwargs["guidance_rescale"] = 0.0   # the Guidance's CFG term rescales
        session.reset(kwargs.get("generator"))
        session.pipe = self
        return original_class.__call__(self, **kwargs)

    members = {"__call__": __call__}
    if kind == "FluxPipeline":
        def encode_prompt(self, *args, **kwargs):
            result = original_class.encode_prompt(self, *args, **kwargs)
            session.encoded.append(result)
            return result
        members["encode_prompt"] = encode_prompt
    guided_class = type(f"Guided{original_class.__name__}", (original_class,), members)

    forward = _denoiser_forward(session, stock_forward)
    try:
        pipe.__class__ = guided_class
        model.forward = forward
        yield pipe
    finally:
        pipe.__class__ = original_class
        if had_forward:
            model.forward = original_forward
        else:
            model.__dict__.pop("forward", None)
