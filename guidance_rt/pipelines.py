"""guided(pipe, guidance): stock diffusers pipelines with one packed forward per step.

Inside the context the pipeline's own __call__ runs unchanged, except that
- its denoiser's forward is routed through a GuidedDenoiser (an instance attribute `forward`
  shadows the class method; the model's weights, processors and config are untouched),
- the pipeline object gets a subclass whose __call__ first checks the guidance arguments, sets the
  ones the Guidance implies, and numbers the denoiser calls as steps. With guided(pipe) and no
  Guidance, the call's own guidance arguments (diffusers' and the seed pipelines': guidance_scale,
  pag_scale, seg_scale, nag_scale, ...) build that call's Guidance instead (pipeline_arguments),
  and are removed before the stock __call__ sees them.

The guidance is bound to the caller, not to the shared objects. Each guided() context adds
(pipe, Guidance) to a contextvars.ContextVar, so only the thread (or asyncio task) that entered it
sees it; a pipeline call uses the innermost context for that pipeline and keeps its per-call state
(step counter, generator, negatives) in a second ContextVar, where the patched forward finds it.
The patches are shared and reference-counted under a lock: the first open context on a pipeline
swaps its class, the first on a model sets its `forward`, and the last to exit restores exactly the
original class and the original `forward` entry of the model's __dict__ (present or absent), in
any exit order across threads and also after an exception. Hence:
- nested contexts on one pipeline: the inner Guidance applies inside the inner block, the outer one
  again after it;
- contexts open at the same time in several threads: each thread's calls use its own Guidance;
- a call from a thread with no guided() context for that pipeline is the stock pipeline with the
  model's stock forward, even while another thread has a context open (a thread started inside a
  guided() block starts with an empty context, so it runs stock unless it enters guided() itself);
- a model shared by several pipelines (`Pipeline(**pipe.components)`): its forward serves the
  guided call running in the calling thread, whichever pipeline that call belongs to.
A diffusers pipeline keeps per-call state on the object and on its scheduler (timesteps, step
index, guidance scale), so it cannot run two calls at once. While guided() is open on a pipeline, a
call that would overlap a running call of the same pipeline, or of a pipeline sharing its
scheduler, raises RuntimeError instead of corrupting both: use one pipeline, with its own
scheduler, per thread.

The denoiser call returns the guided prediction for every row the pipeline batched, so the
pipeline's own CFG arithmetic ``u + g (c - u)`` with u == c == eps leaves it exactly unchanged.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from .denoiser import GuidedDenoiser, check_per_sample
from .pipeline_arguments import guidance_for_call, instead, pop_arguments
from .families import PIPELINE_FAMILIES, SUPPORTED_PIPELINES
from .guidance import Guidance


def _pipeline_kind(cls: type) -> str:
    for base in cls.__mro__:
        if base.__name__ in SUPPORTED_PIPELINES:
            return base.__name__
    raise TypeError(f"pipeline {cls.__name__} is not supported by guided(); supported: "
                    f"{', '.join(SUPPORTED_PIPELINES)}")


@dataclass(eq=False)
class _Binding:
    """One open guided() context: the pipeline, its Guidance and what its calls need. Without a
    Guidance (guidances None) each call's own arguments decide (pipeline_arguments)."""

    pipe: object
    model: torch.nn.Module
    den: GuidedDenoiser | None
    kind: str
    guidances: tuple[Guidance, ...] | None
    nag_text: str | None
    original_class: type | None = None   # the pipeline's class before any guided() patch
    last: tuple[Guidance, GuidedDenoiser] | None = None   # without a Guidance: the last call's
    # the family's further denoisers on the pipeline (Adapter.denoiser_attributes): attribute ->
    # model, and their denoisers by (attribute, Guidances), made on first use
    experts: dict = field(default_factory=dict)
    expert_dens: dict = field(default_factory=dict)

    def models(self) -> list:
        return [m for m in (self.model, *self.experts.values()) if m is not None]

    def expert_denoisers(self, guidances: tuple[Guidance, ...], kwargs: dict) -> dict[int, GuidedDenoiser]:
        """id(model) -> the denoiser of every further denoiser of a call: the call's Guidances,
        with CFG's scale replaced by the expert's own scale argument where the call gives it."""
        family = PIPELINE_FAMILIES[self.kind]
        dens = {}
        for attribute, model in self.experts.items():
            own = _expert_guidances(guidances, kwargs.get(family.expert_cfg_arguments.get(attribute, "")))
            key = (attribute, own)
            with _LOCK:   # calls in several threads share the binding
                if key not in self.expert_dens:
                    if len(self.expert_dens) >= 8:
                        self.expert_dens.pop(next(iter(self.expert_dens)))
                    self.expert_dens[key] = GuidedDenoiser(model, list(own) if len(own) > 1 else own[0])
                dens[id(model)] = self.expert_dens[key]
        return dens

    def denoiser_for(self, guidance: Guidance, arguments: dict) -> GuidedDenoiser:
        """The denoiser of a call whose arguments asked for `guidance`; the last one while calls
        repeat it, so its step plans are reused."""
        last = self.last   # read once: a context copied into another thread shares the binding
        if last is None or last[0] != guidance:
            try:
                last = self.last = guidance, GuidedDenoiser(self.model, guidance)
            except ValueError as e:   # name the arguments: the terms only know their own fields
                shown = ", ".join(f"{a}={v!r}" for a, v in arguments.items())
                raise ValueError(f"{shown}: {e}") from None
        return last[1]


class _Call:
    """State of one guided pipeline call: its denoiser, the step counter, generator and captured
    negatives."""

    def __init__(self, binding: _Binding, pipe, generator, den: GuidedDenoiser, nag_text: str | None):
        self.binding, self.pipe = binding, pipe
        self.den, self.nag_text = den, nag_text
        self.calls = 0
        self.state: dict = {}            # the run's memory across steps (APG), per call
        self.generator = generator[0] if isinstance(generator, (list, tuple)) else generator
        self.encoded: list = []          # FLUX: encode_prompt results (positive, then negative)
        self.pending = None              # FLUX true CFG: eps returned again for the uncond call
        self.negative = None             # NAG negative conditioning, encoded once per call
        self.dens = {id(binding.model): den} if binding.model is not None else {}   # id(model) -> denoiser


@dataclass(eq=False)
class _Patch:
    """A patch shared by every open guided() on one object; the last to exit undoes it."""

    undo: Callable[[], None]
    value: object
    count: int = 0


# the guided() contexts open in this thread / task, innermost last
_BOUND: contextvars.ContextVar[tuple[_Binding, ...]] = contextvars.ContextVar("grt_guided", default=())
# the pipeline call running in this thread / task through a guided class (None: a stock call)
_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("grt_guided_call", default=None)
_LOCK = threading.Lock()                  # guards the three registries below
_PIPES: dict[int, _Patch] = {}            # id(pipe) -> its class swap (value: the original class)
_MODELS: dict[int, _Patch] = {}           # id(model) -> its forward patch
_RUNNING: dict[int, tuple[int, str, bool]] = {}   # id(pipe or scheduler) -> (thread, pipeline, guided)


def _acquire(registry: dict[int, _Patch], obj, install) -> object:
    """Count one more user of obj's patch; the first runs install() -> (undo, value)."""
    patch = registry.get(id(obj))
    if patch is None:
        patch = registry[id(obj)] = _Patch(*install(obj))
    patch.count += 1
    return patch.value


def _release(registry: dict[int, _Patch], obj):
    patch = registry[id(obj)]
    patch.count -= 1
    if patch.count == 0:
        del registry[id(obj)]
        patch.undo()


def _swap_class(pipe):
    original = type(pipe)
    pipe.__class__ = _guided_class(original)
    return (lambda: setattr(pipe, "__class__", original)), original


def _patch_forward(model):
    had_forward, original_forward = "forward" in model.__dict__, model.__dict__.get("forward")
    model.__dict__["forward"] = _patched_forward(model, model.forward)

    def undo():
        if had_forward:
            model.__dict__["forward"] = original_forward
        else:
            model.__dict__.pop("forward", None)

    return undo, None


def _binding_for(pipe) -> _Binding | None:
    """The innermost guided() context on `pipe` open in this thread / task."""
    return next((b for b in reversed(_BOUND.get()) if b.pipe is pipe), None)


@contextlib.contextmanager
def _exclusive(pipe, name: str, guided: bool):
    """Refuse a call that would overlap a running call of the pipeline or of its scheduler: the
    pipeline object and its scheduler hold the call's state (timesteps, step index, scales)."""
    label = f"{name} at {id(pipe):#x}"
    me = threading.get_ident()
    keys = (id(pipe), id(pipe.scheduler))
    with _LOCK:
        for key in keys:
            if key in _RUNNING:
                thread, other, other_guided = _RUNNING[key]
                where = "in another thread" if thread != me else "in this thread (this call is made inside it)"
                running = f"a {'guided ' if other_guided else ''}call {where}"
                if key == id(pipe):
                    raise RuntimeError(f"pipeline {label} is already running {running}; diffusers pipelines "
                                       "keep per-call state (scheduler, timesteps) on the object: use one "
                                       "pipeline per thread")
                raise RuntimeError(f"pipeline {label} shares its scheduler with pipeline {other}, which is "
                                   f"running {running}; the scheduler keeps per-call state (timesteps, step "
                                   "index): give each pipeline its own, e.g. "
                                   "scheduler=type(s).from_config(s.config)")
        for key in keys:
            _RUNNING[key] = (me, label, guided)
    try:
        yield
    finally:
        with _LOCK:
            for key in keys:
                del _RUNNING[key]


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


def _expert_guidances(guidances: tuple[Guidance, ...], scale) -> tuple[Guidance, ...]:
    """The Guidances of a further denoiser whose own CFG scale argument is `scale` (None: not
    given, the Guidances as they are): CFG's (or its replacement's) scale set to it."""
    if scale is None or guidances[0].cfg is None:
        return guidances
    return tuple(g.replace(g.terms.index(g.cfg), scale=float(scale)) for g in guidances)


def check_arguments(pipe_name: str, kind: str, guidances: tuple[Guidance, ...], kwargs: dict):
    cfg = guidances[0].cfg            # every per-sample Guidance has CFG, or none has
    family = PIPELINE_FAMILIES[kind]
    scale_arg = family.cfg_argument
    if scale_arg is None:   # a pipeline without CFG (guidance-distilled: no unconditional branch)
        if cfg is not None:
            raise ValueError(f"{pipe_name} has no classifier-free guidance ({family.title} is guidance-distilled: "
                             "no unconditional branch); drop the CFG term (NAG takes a negative prompt)")
        return
    wanted = sorted({g.cfg.scale for g in guidances}) if cfg is not None else [1.0]
    if cfg is not None and wanted[0] <= 1.0:
        raise ValueError(f"guided(): {type(cfg).__name__}(scale={wanted[0]}) needs scale > 1 in a pipeline (drop the CFG "
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
    for arg in family.expert_cfg_arguments.values():   # a further denoiser's own CFG scale
        scale = kwargs.get(arg)
        if scale is None:
            continue
        if cfg is None and scale > 1.0:
            raise ValueError(f"{pipe_name}({arg}={scale}) contradicts the Guidance (no CFG term): "
                             f"{arg} is the CFG scale of the second denoiser; leave {arg} out or add a CFG term")
        if cfg is not None and scale <= 1.0:
            raise ValueError(f"{pipe_name}({arg}={scale}) contradicts the Guidance ({type(cfg).__name__} term): "
                             f"{arg} replaces its scale on the second denoiser and needs scale > 1 there")
    if family.uncond_call and family.cfg_needs_negative and cfg is not None and kwargs.get("negative_prompt") is None \
            and kwargs.get("negative_prompt_embeds") is None:
        raise ValueError(f"{pipe_name} with a CFG term needs negative_prompt (true CFG)")


def forward_signature(model) -> inspect.Signature:
    """The signature of the model class's forward: pipelines pass its arguments, and an instance
    `forward` set on the model may be a bare (*args, **kwargs) wrapper."""
    return inspect.signature(type(model).forward.__get__(model))


def forward_arguments(signature: inspect.Signature, args, kwargs):
    """A denoiser call's (sample, timestep, its other arguments without the Nones, return_dict)."""
    arguments = dict(signature.bind(*args, **kwargs).arguments)
    arguments.update(arguments.pop("kwargs", None) or {})
    return_dict = arguments.pop("return_dict", True)
    sample = arguments.pop("sample" if "sample" in arguments else "hidden_states")
    timestep = arguments.pop("timestep")
    return sample, timestep, {k: v for k, v in arguments.items() if v is not None}, return_dict


def _patched_forward(model, stock):
    """The model's forward while guided() is open on it: the guided prediction for a guided call
    of a pipeline on this model running in this thread / task, else the stock forward."""
    signature = forward_signature(model)

    def forward(*args, **kwargs):
        call = _CALL.get()
        if call is None or id(model) not in call.dens:
            return stock(*args, **kwargs)
        return _guided_forward(call, signature, args, kwargs, call.dens[id(model)])

    return forward


def _guided_forward(call: _Call, signature: inspect.Signature, args, kwargs, den: GuidedDenoiser):
    binding = call.binding
    pipe_steps = call.pipe._num_timesteps
    sample, timestep, arguments, return_dict = forward_arguments(signature, args, kwargs)

    uncond_call = PIPELINE_FAMILIES[binding.kind].uncond_call
    if uncond_call and call.pending is not None:
        out, call.pending = call.pending, None     # the true-CFG uncond call of this step
        return denoiser_output(out, return_dict, den)
    step = call.calls
    call.calls += 1
    if uncond_call:
        cond, uncond = arguments, None
        family = PIPELINE_FAMILIES[binding.kind]
        if den.guidance.cfg is not None and len(call.encoded) > family.uncond_encoding:
            uncond = family.uncond_arguments(arguments, call.encoded[family.uncond_encoding])
        batch = sample.shape[0]
        t = timestep
    else:
        batch = sample.shape[0]
        packed = PIPELINE_FAMILIES[binding.kind].cfg_argument is not None and call.pipe.do_classifier_free_guidance
        if den.guidance.cfg is not None and not packed:
            raise ValueError(f"{type(call.pipe).__name__} runs without classifier-free guidance "
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
    if call.nag_text is not None:
        if call.negative is None:
            call.negative = PIPELINE_FAMILIES[binding.kind].encode_negative(
                call.pipe, binding.original_class, binding.kind, call.nag_text)
        negative = _rows(call.negative, sample.shape[0])
    eps = den(sample, t, cond=cond, uncond=uncond, negative=negative, step=step, num_steps=pipe_steps,
              generator=call.generator, state=call.state)
    if uncond_call:
        if uncond is not None:
            call.pending = eps
        return denoiser_output(eps, return_dict, den)
    if packed:
        eps = torch.cat([eps, eps])
    return denoiser_output(eps, return_dict, den)


def _rows(d: dict, batch: int, unbatched=("txt_ids", "img_ids")) -> dict:
    return {k: v if k in unbatched else v.expand(batch, *v.shape[1:]) for k, v in d.items()}


def denoiser_output(out, return_dict, den):
    """The guided prediction in the form the model's own forward returns (tuple or output class)."""
    return den.adapter.output(out, return_dict)


@functools.cache
def _guided_class(original_class: type) -> type:
    """The subclass a pipeline wears while any guided() is open on it. Its calls take their
    Guidance from the calling thread's / task's innermost guided() on that pipeline; without one
    they run the stock __call__."""
    kind = _pipeline_kind(original_class)

    def __call__(self, *args, **kwargs):
        binding = _binding_for(self)
        call = None
        if binding is not None:
            name = original_class.__name__
            signature = inspect.signature(original_class.__call__)
            params = signature.parameters
            # removed first: the stock __call__ must never see them (SD3 would run its own SLG)
            given = pop_arguments(name, kind, params, kwargs)
            bound = signature.bind(self, *args, **kwargs)
            args, kwargs = (), {k: v for k, v in bound.arguments.items() if k != "self"}
            kwargs.update(kwargs.pop("kwargs", {}) if "kwargs" in params else {})
            if binding.guidances is None:
                guidance, nag_text = guidance_for_call(name, kind, binding.model, params, kwargs, given)
                guidances, den = (guidance,), binding.denoiser_for(guidance, given)
            else:
                for arg, value in given.items():
                    if not (isinstance(value, (list, tuple)) and not value):   # [] asks for nothing
                        raise ValueError(f"{name}({arg}=...) contradicts guided(): the Guidance decides the "
                                         f"guidance; use {instead(arg)} instead")
                guidances, den, nag_text = binding.guidances, binding.den, binding.nag_text
            check_arguments(name, kind, guidances, kwargs)
            if "guidance_rescale" in params:
                kwargs["guidance_rescale"] = 0.0   # the Guidance's CFG term rescales
            call = _Call(binding, self, kwargs.get("generator"), den, nag_text)
            call.dens.update(binding.expert_denoisers(guidances, kwargs))
        with _exclusive(self, original_class.__name__, call is not None):
            # None for a stock call, so that one made inside a guided call (from a callback) runs stock
            token = _CALL.set(call)
            try:
                return original_class.__call__(self, *args, **kwargs)
            finally:
                _CALL.reset(token)

    members = {"__call__": __call__}
    if PIPELINE_FAMILIES[kind].uncond_call:   # its uncond text comes from a second encode_prompt call
        def encode_prompt(self, *args, **kwargs):
            result = original_class.encode_prompt(self, *args, **kwargs)
            call = _CALL.get()
            if call is not None and call.pipe is self:
                call.encoded.append(result)
            return result
        members["encode_prompt"] = encode_prompt
    return type(f"Guided{original_class.__name__}", (original_class,), members)


@contextlib.contextmanager
def guided(pipe, guidance: Guidance | list[Guidance] | None = None, *, nag_negative_prompt: str | None = None):
    """Run a stock diffusers pipeline's own __call__ with one packed forward per step.
    With a NAG term, `nag_negative_prompt` is encoded by the pipeline's own text encoders.
    A list of Guidances gives every image of the pipeline's batch its own (see GuidedDenoiser:
    they may differ only in scales and step windows), all in one packed forward per step.
    Without a Guidance, each call's own arguments decide (guidance_scale, pag_scale, seg_scale,
    nag_scale, ...: see pipeline_arguments).
    The guidance applies to calls from the thread / task that entered the context; contexts nest
    and may be open in several threads at once (see the module docstring)."""
    kind = _pipeline_kind(type(pipe))
    model = getattr(pipe, SUPPORTED_PIPELINES[kind])
    experts = {a: getattr(pipe, a) for a in PIPELINE_FAMILIES[kind].denoiser_attributes
               if getattr(pipe, a, None) is not None}
    if model is None and experts:   # e.g. Wan 2.2 with boundary_ratio 1: the second expert only
        attribute, model = next(iter(experts.items()))
        del experts[attribute]
    if guidance is None:
        if nag_negative_prompt is not None:
            raise ValueError("guided(pipe, nag_negative_prompt=...) goes with a Guidance that has a NAG term; "
                             "without a Guidance pass nag_scale=... and nag_negative_prompt=... to the call")
        binding = _Binding(pipe, model, None, kind, None, None, experts=experts)
    else:
        guidances = check_per_sample(guidance)
        if guidances[0].nag is not None and nag_negative_prompt is None:
            raise ValueError("the Guidance has a NAG term: pass guided(pipe, guidance, nag_negative_prompt=...) "
                             "(NAG guides away from that prompt)")
        binding = _Binding(pipe, model, GuidedDenoiser(model, guidance), kind, guidances,
                           nag_negative_prompt if guidances[0].nag is not None else None, experts=experts)
    with _LOCK:   # the models first: if patching them fails, nothing is left patched
        for m in binding.models():
            _acquire(_MODELS, m, _patch_forward)
        binding.original_class = _acquire(_PIPES, pipe, _swap_class)
    try:
        _BOUND.set(_BOUND.get() + (binding,))
        yield pipe
    finally:
        # removed by identity, not by token reset: contexts may exit in any order
        _BOUND.set(tuple(b for b in _BOUND.get() if b is not binding))
        with _LOCK:
            _release(_PIPES, pipe)
            for m in binding.models():
                _release(_MODELS, m)
