"""PackedGuider: a `guider` component for diffusers' modular pipelines that runs every branch of a
step in one packed forward (GuidedDenoiser).

A modular denoise loop (StableDiffusionXLLoopDenoiser, StableDiffusion3LoopDenoiser, ...) drives
its guider once per step:

    guider.set_state(step=i, num_inference_steps=n, timestep=t)
    batches = guider.prepare_inputs({"prompt_embeds": (cond, uncond), ...})
    for batch in batches:
        guider.prepare_models(model)
        batch.noise_pred = model(latents, t, <batch's fields>, return_dict=False)[0]
        guider.cleanup_models(model)
    noise_pred = guider(batches)[0]          # or .pred

diffusers' own guiders return one batch per branch (2 for CFG, 3 for CFG+PAG), each a separate
forward. PackedGuider returns ONE batch holding the cond fields and keeps the (cond, uncond)
pairs. `prepare_models` gives the model an instance `forward` through which the loop's one call
goes: it takes the stock forward back at once, rebuilds the uncond arguments by swapping each
cond field object in the call for its uncond counterpart (by identity, so no argument name of
the loop is assumed), and returns GuidedDenoiser's guided prediction. The combine returns that
prediction unchanged.

The model is stock outside that one call: the instance `forward` is removed when the call starts
(also when the packed forward then raises) or by `cleanup_models` if the call never happens, and
calls from other threads meanwhile go to the stock forward.

`num_conditions` is 2 when the guidance needs the negative conditioning (CFG, NAG): the modular
pipelines read `num_conditions > 1` as "encode the negative prompt". NAG guides away from that
same negative prompt (the uncond conditioning).
"""
from __future__ import annotations

import inspect
import threading

import torch
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

from .denoiser import GuidedDenoiser, check_per_sample
from .pipelines import denoiser_output, forward_arguments, forward_signature
from .spec import load_guidance, to_dict
from .guidance import Guidance

# ControlNet residuals: a modular loop computes them per guider batch from that batch's (cond)
# conditioning, so the packed call has none for the uncond rows
_CONTROL_RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual")


def _swap(value, pairs: dict[int, tuple[object, object]]):
    """`value` with every cond field object in it replaced by its uncond counterpart."""
    pair = pairs.get(id(value))
    if pair is not None and pair[0] is value:
        return pair[1]
    if isinstance(value, dict):
        return {k: _swap(v, pairs) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_swap(v, pairs) for v in value)
    return value


class PackedGuider(BaseGuidance):
    """A diffusers guider (set it as a modular pipeline's `guider` component) whose denoiser call
    per step is one packed forward of every branch of `guidance`.

    `guidance`: a grt.Guidance (or what `spec.load_guidance` reads: a spec string such as
    "cfg=5 pag=3@mid", a JSON dict), or a list of them, one per sample of the pipeline's batch
    (see GuidedDenoiser). `generator` draws TPG's permutations (default: torch's global RNG).
    The guidance is kept in the guider's config as strict JSON, so `new()`, `from_config` and
    `save_pretrained` / `from_pretrained` round-trip it.
    """

    _input_predictions = ["pred"]

    def __init__(self, guidance: Guidance | str | dict | list, generator: torch.Generator | None = None,
                 enabled: bool = True):
        per_sample = isinstance(guidance, (list, tuple))
        items = [load_guidance(g) for g in (guidance if per_sample else [guidance])]
        self.guidances = check_per_sample(items)
        super().__init__(enabled=enabled)
        stored = [to_dict(g) for g in items] if per_sample else to_dict(items[0])
        self.register_to_config(guidance=stored, enabled=enabled)
        self.guidance = items if per_sample else items[0]     # as GuidedDenoiser takes it
        self.generator = generator
        self._needs_negative = any(g.needs_uncond() or g.nag is not None for g in self.guidances)
        self._denoiser: GuidedDenoiser | None = None
        self._pairs: dict[int, tuple[object, object]] = {}   # this step's cond -> uncond fields
        self._restore = None                                 # undoes prepare_models' patch

    @property
    def num_conditions(self) -> int:
        """The conditionings the guidance needs (the loop still gets one batch)."""
        return 2 if self._enabled and self._needs_negative else 1

    @property
    def is_conditional(self) -> bool:
        return True          # the one batch carries the cond fields

    def prepare_inputs(self, data: dict) -> list:
        """One batch with the cond field of each (cond, uncond) pair of `data`."""
        pairs, missing = {}, []
        for name, value in data.items():
            cond, uncond = value if isinstance(value, tuple) else (value, None)
            if cond is None:
                continue
            if uncond is None:
                missing.append(name)
            else:
                pairs[id(cond)] = (cond, uncond)
        if missing and self._enabled and self._needs_negative:
            raise ValueError(f"the Guidance needs the negative conditioning (CFG or NAG) but the pipeline gave "
                             f"no unconditional {', '.join(map(repr, missing))}: pass negative_prompt (or its "
                             "embeddings) to the pipeline")
        self._pairs = pairs
        return [self._prepare_batch(data, 0, self._input_predictions[0])]

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._count_prepared += 1
        if not self._enabled:
            return                     # disabled (e.g. a guidance-distilled UNet): stock cond call
        if self._denoiser is None or self._denoiser.model is not denoiser:
            self._denoiser = GuidedDenoiser(denoiser, self.guidance)
        den = self._denoiser
        had, original = "forward" in denoiser.__dict__, denoiser.__dict__.get("forward")
        stock = denoiser.forward
        signature = forward_signature(denoiser)
        owner = threading.get_ident()

        def restore():
            if denoiser.__dict__.get("forward") is forward:    # only our own patch
                if had:
                    denoiser.__dict__["forward"] = original
                else:
                    del denoiser.__dict__["forward"]

        def forward(*args, **kwargs):
            if threading.get_ident() != owner:
                return stock(*args, **kwargs)
            restore()
            return self._packed_call(den, signature, args, kwargs)

        denoiser.__dict__["forward"] = forward
        self._restore = restore

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None
        self._pairs = {}

    def _packed_call(self, den: GuidedDenoiser, signature: inspect.Signature, args, kwargs):
        sample, timestep, cond, return_dict = forward_arguments(signature, args, kwargs)
        if any(k in cond for k in _CONTROL_RESIDUALS) and any(g.needs_uncond() for g in self.guidances):
            raise NotImplementedError(
                "PackedGuider with CFG does not support the ControlNet denoise loop: the loop "
                "runs the ControlNet once per guider batch, so the packed call has only the cond "
                "rows' residuals; use grt.guided() on StableDiffusionXLControlNetPipeline")
        uncond = _swap(cond, self._pairs)
        nag = self.guidances[0].nag is not None
        eps = den(sample, timestep, cond=cond, uncond=uncond, negative=uncond if nag else None,
                  step=self._step, num_steps=self._num_inference_steps, generator=self.generator)
        return denoiser_output(eps, return_dict, den)

    def __call__(self, data: list) -> GuiderOutput:
        """The packed call's guided prediction (the branches themselves are never materialised)."""
        if len(data) != 1:
            raise ValueError(f"PackedGuider makes one batch per step, got {len(data)}")
        return GuiderOutput(pred=data[0].noise_pred, pred_cond=None, pred_uncond=None)
