"""The guidance a pipeline call's own keyword arguments ask for: ``guided(pipe)`` without a Guidance.

Users come with calls written for diffusers or for the methods' own pipelines. Under ``guided(pipe)``
those arguments build one Guidance per call (then the call runs exactly as with that Guidance
given); they are removed before the stock ``__call__`` runs. Names, meanings and defaults:

| argument | guidance-rt | default (source) |
|---|---|---|
| `guidance_scale` (`true_cfg_scale` on FLUX) | `CFG(scale)`, off at <= 1 | the pipeline's own signature |
| `guidance_rescale` (SD, SDXL) | `CFG(rescale)` | 0.0 (the pipeline's own signature) |
| `pag_scale` | `PAG(scale)` | 3.0 (diffusers' PAG pipelines) |
| `pag_adaptive_scale` | `PAG(adaptive_scale)` | 0.0 (diffusers' PAG pipelines) |
| `pag_applied_layers` | `PAG(layers)` | "mid"; SD3 "blocks.1" = block 1 (diffusers' PAG pipelines) |
| `skip_guidance_layers` (SD3) | `SLG(layers)`; SLG is on only with them | None (StableDiffusion3Pipeline) |
| `skip_layer_guidance_scale` (SD3) | `SLG(scale)` | 2.8 (StableDiffusion3Pipeline) |
| `skip_layer_guidance_start` (SD3) | `SLG(start)`, strict: step i > N start | 0.01 (StableDiffusion3Pipeline) |
| `skip_layer_guidance_stop` (SD3) | `SLG(stop)` | 0.2 (StableDiffusion3Pipeline) |
| `seg_scale` | `SEG(scale)` | 3.0 (SEG-SDXL, seed 001, pipeline_seg.py) |
| `seg_blur_sigma` | `SEG(sigma)`; > 9999 infinite | 9999999.0 (SEG-SDXL) |
| `seg_applied_layers` | `SEG(layers)`: down / mid / up | ['mid'] (SEG-SDXL) |
| `seg_applied_layers_index` | `SEG(layers)`: d4, m0, u3; replaces `seg_applied_layers` | None (SEG-SDXL) |
| `tpg_scale` | `TPG(scale)` | 3.0 (DualGuide-SDXL, seed 002) |
| `tpg_applied_layers_index` | `TPG(layers)` | d6-d23 (DualGuide-SDXL's TPG pipeline) |
| `nag_scale` | `NAG(scale)`, phi: 1 = off | 1.0 (the NAG authors' pipelines) |
| `nag_tau` | `NAG(tau)` | 2.5 (the NAG authors' pipelines) |
| `nag_alpha` | `NAG(alpha)` | SD/SDXL 0.5 (the authors' SDXL pipeline), SD3 0.125, FLUX 0.25 (methods.md) |
| `nag_end` | `NAG(stop)`: on while i / N < nag_end | 1.0 (the NAG authors' pipelines) |
| `nag_negative_prompt` | NAG's negative prompt | a string `negative_prompt` (the NAG authors' SDXL pipeline) |

Without either, the authors' pipeline encodes "" as NAG's negative; here that is an error. Their
`nag_end` compares the timestep (off once t < (1 - nag_end) 999); here it is the term's step window.

The NAG arguments are those of the published method (shared/methods.md section 5, the authors'
diffusers pipelines); seed 002's own `do_nag` / `nag_use_l1` variant is refused with an explanation.
A method whose scale argument defaults to "on" (PAG, SEG, TPG) is on when any of its arguments is
given; NAG needs `nag_scale`, SLG `skip_guidance_layers`. An explicit scale of 0 (NAG: 1) turns a
method off, so scale sweeps work. Layer arguments take guidance-rt names (`d6`, `m0`, `mid`, `7`,
`s3`, module paths), diffusers' PAG forms (`down.block_2`, `up.block_1.attentions_0`) and, as
diffusers' PAGMixin does, a regular expression searched in the names of the blocks' self-attention
modules (`blocks.1`, `blocks.(1|2)`); a pattern ending in a number names that block only (`blocks.1`
is not `blocks.10`, as PAGMixin intends; diffusers 0.42.1 takes both for attention modules).
Errors name the argument and the valid choices: a negative scale, a layer that matches nothing, an
unknown argument with a guidance prefix, SLG without CFG (the stock pipeline would silently skip
it), NAG without a negative prompt, method arguments that leave the method off by default.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .families import FAMILIES, PIPELINE_FAMILIES, enumerate_layers, model_family, resolve_layers
from .guidance import Guidance
from .layers import LayerNotFoundError
from .methods import CFG, NAG, PAG, SEG, SLG, TPG, Term


@dataclass(frozen=True)
class Method:
    """One method's pipeline arguments: argument -> the term field it sets (None: not a field)."""

    term: type[Term]
    arguments: dict[str, str | None]
    kinds: tuple[str, ...] | None = None      # the pipelines that take them (None: every one)

    def setting(self, field: str) -> list[str]:
        """The arguments that set `field`, in the order of `arguments`."""
        return [a for a, f in self.arguments.items() if f == field]


METHODS = (
    Method(PAG, {"pag_scale": "scale", "pag_adaptive_scale": "adaptive_scale", "pag_applied_layers": "layers"}),
    Method(SEG, {"seg_scale": "scale", "seg_blur_sigma": "sigma", "seg_applied_layers": "layers",
                 "seg_applied_layers_index": "layers"}),
    Method(TPG, {"tpg_scale": "scale", "tpg_applied_layers_index": "layers"}),
    Method(NAG, {"nag_scale": "scale", "nag_tau": "tau", "nag_alpha": "alpha", "nag_end": "stop",
                 "nag_negative_prompt": None}),
    # StableDiffusion3Pipeline's own SLG arguments: the stock call would run its own second forward
    Method(SLG, {"skip_guidance_layers": "layers", "skip_layer_guidance_scale": "scale",
                 "skip_layer_guidance_start": "start", "skip_layer_guidance_stop": "stop"},
           kinds=("StableDiffusion3Pipeline",)),
)
DEFAULTS = {
    "pag_scale": 3.0, "pag_adaptive_scale": 0.0,                       # diffusers' PAG pipelines
    "skip_layer_guidance_scale": 2.8, "skip_layer_guidance_start": 0.01,
    "skip_layer_guidance_stop": 0.2,                                    # StableDiffusion3Pipeline
    "seg_scale": 3.0, "seg_blur_sigma": 9999999.0,                      # SEG-SDXL (seed 001)
    "tpg_scale": 3.0,                                                   # DualGuide-SDXL (seed 002)
    "nag_scale": 1.0, "nag_tau": 2.5, "nag_end": 1.0,                   # the NAG authors' pipelines
}
# prefixes of guidance arguments: an unknown name with one is a typo or another tool's argument,
# which the stock pipeline would silently swallow (**kwargs) or reject without saying what works
PREFIXES = ("pag_", "seg_", "tpg_", "nag_", "slg_", "skip_", "do_nag")
SEED_002_NAG = ("do_nag", "nag_use_l1")
LEGACY_UNET_LAYER = re.compile(r"^(down|mid|up)\.block_(\d+)(?:\.attentions_(\d+))?$")


def _arguments(kind: str) -> dict[str, Method]:
    """The guidance arguments a pipeline of this kind takes under guided()."""
    return {a: m for m in METHODS if m.kinds is None or kind in m.kinds for a in m.arguments}


def instead(argument: str) -> str:
    """What to write with an explicit Guidance instead of a guidance argument."""
    method, field = next((m, m.arguments[argument]) for m in METHODS if argument in m.arguments)
    if field is None:
        return "guided(pipe, guidance, nag_negative_prompt=...)"
    return f"grt.{method.term.__name__}({field}=...)"


def pop_arguments(pipe_name: str, kind: str, params, kwargs: dict) -> dict:
    """Remove the guidance arguments from a call's keyword arguments and return those given (not
    None). A name with a guidance prefix that is neither one of them nor a parameter of the
    pipeline is an error."""
    valid = _arguments(kind)
    stock = tuple(a for a in (PIPELINE_FAMILIES[kind].cfg_argument,) if a) + (("guidance_rescale",) if "guidance_rescale" in params else ())
    for name in kwargs:
        if name in valid or name in params or not name.startswith(PREFIXES):
            continue
        if name in SEED_002_NAG:
            raise ValueError(f"{pipe_name}({name}=...): {name} belongs to DualGuide-SDXL's own attention-map "
                             "variant, which is not NAG (shared/seeds/README.md); guidance-rt's NAG takes "
                             "nag_scale (> 1), nag_negative_prompt, nag_tau, nag_alpha, nag_end: drop " + name)
        raise ValueError(f"{pipe_name}({name}=...): unknown guidance argument under guided(); valid here: "
                         f"{', '.join(stock + tuple(valid))}")
    popped = {name: kwargs.pop(name) for name in list(kwargs) if name in valid}
    return {name: value for name, value in popped.items() if value is not None}


def _number(argument: str, value, lo: float = 0.0, hi: float = math.inf, off: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        bounds = f"a number >= {lo:g}" + (f" and <= {hi:g}" if hi < math.inf else "")
        raise ValueError(f"{argument}={value!r}: must be {bounds}{off}")
    return float(value)


def _term(cls: type[Term], fields: dict, given: dict) -> Term:
    """The term, its own validation errors prefixed with the arguments that made it."""
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        shown = ", ".join(f"{a}={v!r}" for a, v in given.items())
        raise type(e)(f"{shown}: {e}") from None


def layer_names(model, argument: str, value) -> tuple[str, ...]:
    """The blocks a layer argument names, as guidance-rt layer names in execution order."""
    items = [value] if isinstance(value, (str, int)) else list(value) if isinstance(value, (list, tuple)) else None
    if items is None:
        raise TypeError(f"{argument}={value!r}: give a layer name or a list of them")
    if not items:
        raise ValueError(f"{argument}=[] names no layer; give at least one, or set the method's scale to 0 "
                         "to turn it off")
    family = model_family(model)
    chosen = {}
    for item in items:
        for layer in _blocks(model, family, argument, item):
            chosen[layer.position] = layer
    return tuple(chosen[p].name for p in sorted(chosen))


def _blocks(model, family: str, argument: str, item):
    legacy = LEGACY_UNET_LAYER.match(item) if family == "unet" and isinstance(item, str) else None
    name = item
    if legacy:   # diffusers' documented "down.block_2.attentions_1": down_blocks.2.attentions.1
        part, block, attention = legacy.groups()
        name = "mid_block" if part == "mid" and block == "0" else f"{part}_blocks.{block}"
        name += f".attentions.{attention}" if attention is not None else ""
    try:
        return resolve_layers(model, name, argument)
    except LayerNotFoundError as error:
        found = _pattern_blocks(model, family, item) if isinstance(item, str) else []
        if found:
            return found
        raise LayerNotFoundError(f"{error}; diffusers' forms work too ('down.block_2.attentions_1', or a "
                                 "regular expression on the blocks' self-attention module names such as "
                                 "'blocks.1')") from None


def _pattern_blocks(model, family: str, pattern: str) -> list:
    """diffusers' PAGMixin rule: the pattern searched in each block's self-attention module name; a
    pattern ending in a number must end a name component there (blocks.1 is not blocks.10)."""
    try:
        regex = re.compile(pattern)
    except re.error:
        return []
    whole = pattern.rsplit(".", 1)[-1].isdigit()
    found = []
    for layer in enumerate_layers(model):
        name = f"{layer.path}.{FAMILIES[family].self_attention}"
        if any(not whole or name[m.end():m.end() + 1] in ("", ".") for m in regex.finditer(name)):
            found.append(layer)
    return found


def guidance_for_call(pipe_name: str, kind: str, model, params, kwargs: dict,
                      given: dict) -> tuple[Guidance, str | None]:
    """The Guidance (and NAG's negative prompt) that a call's arguments ask for. `kwargs` holds
    the stock arguments (read, not changed); `given` the guidance arguments popped from them."""
    terms = []
    scale_arg = PIPELINE_FAMILIES[kind].cfg_argument
    w = _number(scale_arg, kwargs.get(scale_arg, params[scale_arg].default), off=" (<= 1: no CFG)") \
        if scale_arg else 1.0   # None: the pipeline has no CFG
    rescale = kwargs.get("guidance_rescale") or 0.0
    if w > 1:
        terms.append(_term(CFG, dict(scale=w, rescale=rescale), {scale_arg: w, "guidance_rescale": rescale}))
    elif rescale:
        raise ValueError(f"guidance_rescale={rescale!r} rescales CFG, which {scale_arg}={w:g} turns off; "
                         f"give {scale_arg} > 1 or leave guidance_rescale out")
    valid = _arguments(kind)
    by_method = {}
    for name, value in given.items():
        by_method.setdefault(valid[name].term, {})[name] = value
    nag_text = None
    for method in METHODS:
        args = by_method.get(method.term)
        if not args:
            continue
        if method.term is NAG:
            term, nag_text = _nag(args, kwargs)
        elif method.term is SLG:
            term = _slg(model, args, cfg_on=w > 1, scale_arg=scale_arg)
        else:
            term = _perturbation(model, method, args)
        if term is not None:
            terms.append(term)
    return Guidance(*terms), nag_text


def _perturbation(model, method: Method, args: dict) -> Term | None:
    """PAG, SEG or TPG: on (at the source's default scale) when any of its arguments is given."""
    [scale_arg] = method.setting("scale")
    scale = _number(scale_arg, args.get(scale_arg, DEFAULTS[scale_arg]), off=f" (0: no {method.term.__name__})")
    if scale == 0:
        return None
    fields = {"scale": scale}
    # SEG-SDXL: seg_applied_layers_index, when given, replaces seg_applied_layers
    layer_args = [a for a in method.setting("layers") if a in args]
    if layer_args:
        fields["layers"] = layer_names(model, layer_args[-1], args[layer_args[-1]])
    for argument, field in method.arguments.items():
        if field not in ("scale", "layers"):
            fields[field] = _number(argument, args.get(argument, DEFAULTS[argument]))
    return _term(method.term, fields, args)


def _nag(args: dict, kwargs: dict) -> tuple[Term | None, str | None]:
    if "nag_scale" not in args:
        raise ValueError(f"{', '.join(args)} given without nag_scale, whose default 1.0 is NAG off (as in the "
                         "NAG pipelines): give nag_scale > 1, e.g. 5")
    phi = _number("nag_scale", args["nag_scale"], lo=1.0, off=" (NAG's phi: 1 = off, paper scale = phi - 1)")
    if phi == 1:
        return None, None
    text = args.get("nag_negative_prompt")
    if text is None and isinstance(kwargs.get("negative_prompt"), str):
        text = kwargs["negative_prompt"]     # the NAG authors' SDXL pipeline falls back to it
    if not isinstance(text, str):
        raise ValueError(f"nag_scale={args['nag_scale']!r} needs a negative prompt to guide away from: pass "
                         "nag_negative_prompt='...' (a string; a string negative_prompt serves too)")
    fields = dict(scale=phi, tau=args.get("nag_tau", DEFAULTS["nag_tau"]), alpha=args.get("nag_alpha"),
                  stop=args.get("nag_end", DEFAULTS["nag_end"]))
    return _term(NAG, fields, args), text


def _slg(model, args: dict, cfg_on: bool, scale_arg: str) -> Term | None:
    if "skip_guidance_layers" not in args:
        raise ValueError(f"{', '.join(args)} given without skip_guidance_layers: SLG needs the blocks to "
                         "skip, e.g. skip_guidance_layers=[7, 8, 9]")
    scale = _number("skip_layer_guidance_scale", args.get("skip_layer_guidance_scale",
                                                          DEFAULTS["skip_layer_guidance_scale"]), off=" (0: no SLG)")
    if scale == 0:
        return None
    if not cfg_on:   # the stock pipeline would silently skip SLG here
        raise ValueError(f"skip_guidance_layers needs {scale_arg} > 1: StableDiffusion3Pipeline applies SLG "
                         "only with CFG (for SLG without CFG use guided(pipe, grt.Guidance(grt.SLG(...))))")
    start = _number("skip_layer_guidance_start", args.get("skip_layer_guidance_start",
                                                          DEFAULTS["skip_layer_guidance_start"]), hi=1.0)
    stop = _number("skip_layer_guidance_stop", args.get("skip_layer_guidance_stop",
                                                        DEFAULTS["skip_layer_guidance_stop"]), hi=1.0)
    if start > stop:
        raise ValueError(f"skip_layer_guidance_start={start:g} must not exceed skip_layer_guidance_stop={stop:g}")
    # the pipeline's window is N start < i < N stop: a strict lower bound, which the half-open
    # term window start <= i / N reproduces from the next float above start (start == stop: empty)
    fields = dict(scale=scale, layers=layer_names(model, "skip_guidance_layers", args["skip_guidance_layers"]),
                  start=min(math.nextafter(start, 1.0), stop), stop=stop)
    return _term(SLG, fields, args)
