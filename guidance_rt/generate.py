"""`guidance-rt generate`: images from a stock diffusers pipeline under ``guided(pipe, guidance)``.

Every PNG carries its full settings as text chunks (``guidance-rt``: JSON of ``Settings``; plus
readable ``prompt``, ``guidance``, ... chunks), so ``--from-image`` re-runs it: same model, prompt,
guidance, steps, size, seed, batch, scheduler, dtype and device give the same pixels bit for bit
(image ``index`` of a batch is re-made by re-running the whole batch: batched numerics can differ
from a batch of one).

Seeds: image i of a batch uses ``torch.Generator("cpu").manual_seed(seed + i)`` (the pipeline's
per-image generators), so initial noise does not depend on the device.

Grids (``--grid PARAM=v1,v2,... [PARAM2=...]``): PARAM is ``term.field`` (``pag.scale``,
``seg.sigma``, ``slg.layers``, ``cfg.rescale``) or a term alone for its scale (``pag=0,1.5,3``);
values are spec values (``inf``, ``none``), list values in brackets (``slg.layers=[7,8,9],[8]``).
A term the guidance does not have is added with its defaults. Every cell uses the same seed;
the grid PNG gets labels, and each cell is also written as its own reproducible PNG. Cells that
share a step configuration (they differ only in scales) form one group (``step_configuration``),
and a group runs as one packed batch: one pipeline call whose images each have their own
Guidance (``guided(pipe, [g_1, ..., g_n])``). A cell's PNG records its group (``pack``: every
image's guidance) and its place in it, and ``--from-image`` re-runs the group.

Settings files: ``--save-settings FILE.json`` writes the run's complete settings (the JSON the PNG
stores; written once the pipeline is loaded, before generating; with ``--dry-run`` nothing is
generated), and ``--settings FILE.json`` runs them as ``--from-image`` runs a PNG's.

Checks, all before any weights load: the settings of a PNG, of a settings file and of the command
line go through one table, ``SCHEMA`` (type, range and check of every field; a PNG's problems read
"corrupt guidance-rt metadata: <field>: <problem>", a file's "corrupt guidance-rt settings: ...",
the command line's name the option). Then the model's family and blocks come from its configs
alone (``inspect_model``: a meta-device denoiser), and ``prepare`` checks the guidance, every grid
cell and packed group, the size and NAG's negative prompt against them, as GuidedDenoiser and
guided() will. A hub id read from a PNG or a settings file is downloaded only with
``--allow-download``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import itertools
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import spec as spec_mod
from .preset_configs import tiny_preset_problem
from .guidance import Guidance
from .methods import CFG, NAG

METADATA_KEY = "guidance-rt"


class ModelMissing(Exception):
    """The model is neither a local folder nor available from the hub cache / network."""


@dataclass
class Settings:
    prompt: str = "a photo of a cat"
    negative_prompt: str | None = None
    nag_negative_prompt: str | None = None  # NAG's negative (needed when the guidance has NAG)
    guidance: str | None = None           # canonical spec string (None: the family's default)
    steps: int = 30
    width: int | None = None              # pixels (None: the model's default)
    height: int | None = None
    seed: int = 0
    batch: int = 1
    index: int = 0                        # this image's position in its batch
    pack: list[str] | None = None         # grid cells run together: every image's guidance spec
                                          # (then batch = len(pack) and every image uses `seed`)
    model: str | None = None              # local folder or hub id
    preset: str | None = None             # or a tiny preset with random weights
    dtype: str | None = None
    device: str | None = None
    threads: int | None = None            # CPU: intra-op threads (they change the bits)
    scheduler: dict | None = None         # {"class": ..., "config": {...}}
    pipeline: str | None = None
    grid: list[str] | None = None         # the grid's PARAM=values (grid images only)
    label: str | None = None              # a grid cell's label
    guidance_json: dict | None = None
    versions: dict = field(default_factory=dict)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(spec_mod.jsonable(dataclasses.asdict(self)), allow_nan=False, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "Settings":
        """Settings from their JSON, every field present and checked by SCHEMA (SettingsError)."""
        try:
            data = json.loads(text)
        except RecursionError:
            raise SettingsError("not valid JSON: nested too deeply") from None
        except json.JSONDecodeError as e:
            raise SettingsError(f"not valid JSON: {e}") from None
        except ValueError:   # the one other: an integer beyond Python's 4300-digit conversion limit
            raise SettingsError("not valid JSON for Python: an integer of more than 4300 digits") from None
        if not isinstance(data, dict):
            raise SettingsError(f"expected a JSON object of settings, got {_json_type(data)}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            raise SettingsError(f"unknown field {_show(unknown[0])} (fields: {', '.join(names)})")
        missing = [n for n in names if n not in data]
        if missing:
            raise SettingsError("missing", missing[0])
        settings = cls(**data)
        validate(settings)
        return settings


# ------------------------------------------------------------------------------------ checks

MAX_SEED = 2**64 - 1       # torch.Generator.manual_seed takes 0 <= seed < 2**64
MAX_STEPS = 10_000
MAX_SIDE = 16_384          # pixels
MAX_BATCH = 1_024
MAX_THREADS = 1_024
DTYPES = ("float32", "float16", "bfloat16")
DEVICE_TYPES = ("cpu", "cuda", "mps")
MAX_CONFIG_INT = 10**6     # scheduler config integers (num_train_timesteps sizes its arrays)


class SettingsError(ValueError):
    """A bad Settings value: ``field`` (None: the settings as a whole) and ``problem``."""

    def __init__(self, problem: str, field: str | None = None):
        self.problem, self.field = problem, field
        super().__init__(f"{field}: {problem}" if field else problem)


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "an object", None: "null"}


def _json_type(value) -> str:
    return _TYPE_NAMES.get(None if value is None else type(value), type(value).__name__)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_problem(value, types: tuple) -> str | None:
    if any(value is None if t is None else isinstance(value, t) and not (t is int and isinstance(value, bool))
           for t in types):
        return None
    wanted = " or ".join(_TYPE_NAMES[t] for t in types)
    return f"must be {wanted}, got {_json_type(value)} {_show(value)}"


def _between(lo: int, hi: int):
    def check(value, s):
        return None if lo <= value <= hi else f"must be between {lo} and {hi}, got {_show(value)}"
    return check


def _one_of(*choices: str):
    def check(value, s):
        return None if value in choices else f"must be one of {', '.join(choices)}, got {_show(value)}"
    return check


def _spec_problem(text: str) -> str | None:
    try:
        spec_mod.parse_spec(text)
    except spec_mod.SpecError as e:
        return f"not a guidance spec: {e.reason}"
    return None


def _check_guidance_json(value, s):
    try:
        g = spec_mod.from_dict(value)
    except spec_mod.SpecError as e:
        return e.reason
    if s.guidance is None or g != spec_mod.parse_spec(s.guidance):
        return f"{spec_mod.format_spec(g)!r} does not match guidance {s.guidance!r}"
    return None


def _check_seed(value, s):
    last = 0 if s.pack else s.batch - 1     # image i of a batch is seeded seed + i (a pack: seed)
    if 0 <= value <= MAX_SEED - last:
        return None
    why = f" and image i of the batch of {s.batch} is seeded seed + i" if last else ""
    return f"must be between 0 and {MAX_SEED - last} (torch.Generator seeds are below 2**64{why}), got {value}"


def _check_index(value, s):
    if 0 <= value < s.batch:
        return None
    return f"must be between 0 and {s.batch - 1} (batch {s.batch}), got {value}"


def _check_pack(value, s):
    from .denoiser import check_per_sample

    if not all(isinstance(v, str) for v in value):
        return "must be a list of guidance specs"
    if len(value) != s.batch:
        return f"has {len(value)} guidance specs but the batch has {s.batch} images"
    problem = next(filter(None, map(_spec_problem, value)), None)
    if problem:
        return problem
    try:
        check_per_sample([spec_mod.parse_spec(v) for v in value])
    except ValueError as e:
        return str(e)
    if value[s.index] != s.guidance:
        return f"image {s.index}'s entry {value[s.index]!r} is not its guidance {s.guidance!r}"
    return None


def _check_model(value, s):
    if not value.strip():
        return "must not be empty"
    return f"both a model and a preset ({s.preset!r}) are set" if s.preset is not None else None


def _check_device(value, s):
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        return f"{_show(value)} is not a device name (cpu, cuda, cuda:1, mps)"
    if device.type not in DEVICE_TYPES:
        return f"device type must be one of {', '.join(DEVICE_TYPES)}, got {_show(value)}"
    return None


def _check_scheduler(value, s):
    import diffusers

    if set(value) != {"class", "config"}:
        return 'must be {"class": NAME, "config": {...}}, got keys ' + _show(sorted(value))
    name, config = value["class"], value["config"]
    cls = getattr(diffusers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)
            and cls is not diffusers.SchedulerMixin):
        return (f"class {_show(name)} is not a diffusers scheduler (a SchedulerMixin subclass) "
                "available here")
    if not isinstance(config, dict):
        return f"config must be an object, got {_json_type(config)}"
    params = inspect.signature(cls.__init__).parameters
    for key, v in config.items():
        default = params[key].default if key in params else None
        problem = _config_value_problem(v, default)
        if problem:
            return f"config {key}: {problem}"
    try:
        cls.from_config(config)
    except Exception as e:  # a diffusers constructor given a config from outside: any error type
        return f"{name}.from_config rejects the config: {type(e).__name__}: {_first_line(e)}"
    return None


def _config_value_problem(value, default) -> str | None:
    """A scheduler config value of the wrong JSON type for its parameter (the type of the
    parameter's default), not finite, or an integer large enough to size huge arrays."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be finite, got {value}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CONFIG_INT:
        return f"must be at most {MAX_CONFIG_INT} in size, got {_show(value)}"
    expected = {bool: (bool,), int: (int,), float: (int, float), str: (str,), list: (list,),
                tuple: (list,)}.get(type(default))
    if expected is not None:
        return _type_problem(value, expected)
    return None


def _check_grid(value, s):
    if not all(isinstance(v, str) for v in value):
        return "must be a list of PARAM=v1,v2,... strings"
    if s.batch != 1:
        return f"makes one image per cell, so the batch must be 1, got {s.batch}"
    try:
        parse_grid(value)
    except ValueError as e:
        return str(e)
    return None


def _check_versions(value, s):
    bad = [k for k, v in value.items() if not isinstance(v, (str, type(None)))]
    return f"{bad[0]} must be a version string or null" if bad else None


def _check_pipeline(value, s):
    from .pipelines import SUPPORTED_PIPELINES

    return _one_of(*SUPPORTED_PIPELINES)(value, s)


@dataclass(frozen=True)
class Rule:
    """A Settings field: the JSON types its value may have (None: null), a check of a value of
    those types, null apart (returns the problem or None; sees the fields checked before it), and
    the generate option that sets it (named in problems with the command line's values)."""

    types: tuple
    check: Callable[[Any, Settings], str | None] | None = None
    flag: str | None = None


# Every field of Settings, in the order they are checked (a check may read the fields above it).
SCHEMA: dict[str, Rule] = {
    "prompt": Rule((str,), None, "--prompt"),
    "negative_prompt": Rule((str, None), None, "--negative-prompt"),
    "nag_negative_prompt": Rule((str, None), None, "--nag-negative-prompt"),
    "guidance": Rule((str, None), lambda v, s: _spec_problem(v), "--guidance"),
    "guidance_json": Rule((dict, None), _check_guidance_json),
    "steps": Rule((int,), _between(1, MAX_STEPS), "--steps"),
    "width": Rule((int, None), _between(1, MAX_SIDE), "--size width"),
    "height": Rule((int, None), _between(1, MAX_SIDE), "--size height"),
    "batch": Rule((int,), _between(1, MAX_BATCH), "--batch"),
    "index": Rule((int,), _check_index),
    "pack": Rule((list, None), _check_pack),
    "seed": Rule((int,), _check_seed, "--seed"),
    "preset": Rule((str, None), lambda v, s: tiny_preset_problem(v), "--preset"),
    "model": Rule((str, None), _check_model, "--model"),
    "dtype": Rule((str, None), _one_of(*DTYPES), "--dtype"),
    "device": Rule((str, None), _check_device, "--device"),
    "threads": Rule((int, None), _between(1, MAX_THREADS)),
    "scheduler": Rule((dict, None), _check_scheduler),
    "pipeline": Rule((str, None), _check_pipeline),
    "grid": Rule((list, None), _check_grid, "--grid"),
    "label": Rule((str, None)),
    "versions": Rule((dict,), _check_versions),
}


def validate(settings: Settings, *, by_flag: bool = False) -> None:
    """Check every field with SCHEMA; the first problem is a SettingsError naming the field (with
    `by_flag`, the option that sets it, for settings from a command line)."""
    for name, rule in SCHEMA.items():
        value = getattr(settings, name)
        problem = _type_problem(value, rule.types)
        if problem is None and value is not None and rule.check is not None:
            problem = rule.check(value, settings)
        if problem:
            raise SettingsError(problem, (rule.flag or name) if by_flag else name)
    if settings.model is None and settings.preset is None:
        raise SettingsError("neither a model nor a preset is given", "model")


# ------------------------------------------------------------------------------------ models

def _versions() -> dict:
    import importlib.metadata as md
    import platform

    out = {"torch": torch.__version__, "python": platform.python_version()}
    for pkg in ("diffusers", "transformers", "guidance-rt"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else that is not a folder is a bad path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def missing_model_message(model: str, reason: str, no_download: str | None = None) -> str:
    """One line: why `model` is not here and what to do. `no_download`: why downloads are off."""
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    why = (f" ({no_download})" if no_download else
           " (HF_HUB_OFFLINE is set, so nothing is downloaded)" if offline else " and could not be downloaded")
    return (f"model {model!r} is not on this machine{why}: {reason}. Download it first "
            f"(`huggingface-cli download {model}`, then it is found in the hub cache), or point --model at "
            "a local folder holding a diffusers pipeline saved with save_pretrained (model_index.json with "
            "unet/ or transformer/ subfolders); `--preset tiny-sdxl` runs without any weights (random, "
            "for smoke tests)")


def _first_line(err: BaseException) -> str:
    text = str(err)
    return (text.splitlines()[0].rstrip(".") if text else type(err).__name__)[:300]


def _read_config(model: str, filename: str, no_download: str | None) -> dict:
    """A JSON config of a pipeline folder or hub model (from the hub cache only if `no_download`)."""
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        file = os.path.join(path, filename)
        if not os.path.isfile(file):
            if filename == "model_index.json":
                raise ValueError(f"{model} is not a diffusers pipeline folder (no model_index.json); save "
                                 "one with pipe.save_pretrained(folder)")
            raise ValueError(f"{model} has no {filename}")
    elif _looks_like_path(model):
        raise ModelMissing(f"model folder {model!r} does not exist; --model takes a local pipeline folder "
                           "(save_pretrained) or a Hugging Face hub id")
    else:
        from huggingface_hub import hf_hub_download

        try:
            file = hf_hub_download(model, filename, local_files_only=no_download is not None)
        except (OSError, ValueError) as e:   # not cached / no network / not a valid repo id
            raise ModelMissing(missing_model_message(model, _first_line(e), no_download)) from None
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"{model}: cannot read {filename}: {_first_line(e)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{model}: {filename} is not a JSON object")
    return data


@dataclass
class ModelInfo:
    """What generate checks before loading any weights, read from the preset's config or from
    model_index.json and the denoiser's config.json."""

    name: str                      # the preset or --model as given
    family: str
    pipeline: str                  # the stock pipeline class
    denoiser: torch.nn.Module      # built on the meta device: every block, no weights
    multiple: int                  # image sides must be multiples of this (VAE factor x patch)
    max_side: int | None           # SD3: the largest side its position embedding covers, pixels


def inspect_model(settings: Settings, no_download: str | None = None) -> ModelInfo:
    """The model's family and block structure from configs alone (no weights, well under a
    second): a preset's config, or a pipeline folder's / hub model's config files (read from the
    hub cache only when `no_download` says why downloads are off)."""
    import diffusers

    from . import presets
    from .families import FAMILIES, SUPPORTED_CLASSES, SUPPORTED_PIPELINES, family_of

    if settings.preset:
        p = presets.get_preset(settings.preset)
        name, vae_factor = p.name, presets._VAE_SCALE
        denoiser = presets.build_model(p.name, device="meta")
        # the stock pipeline presets.build_pipeline puts around this family
        pipeline = FAMILIES[p.family].pipeline_class(p.config)
    else:
        name = settings.model
        index = _read_config(name, "model_index.json", no_download)
        pipeline = index.get("_class_name")
        if pipeline not in SUPPORTED_PIPELINES:
            raise ValueError(f"{name} is a {_show(pipeline)} pipeline, which guided() does not support; "
                             f"supported: {', '.join(SUPPORTED_PIPELINES)}")
        sub = "unet" if isinstance(index.get("unet"), list) else "transformer"
        entry = index.get(sub)
        cls_name = entry[-1] if isinstance(entry, list) and entry else None
        if cls_name not in SUPPORTED_CLASSES:
            raise ValueError(f"{name}: its {sub} is {cls_name!r}; guidance-rt serves "
                             f"{', '.join(SUPPORTED_CLASSES)}")
        config = _read_config(name, f"{sub}/config.json", no_download)
        try:
            with torch.device("meta"):
                denoiser = getattr(diffusers, cls_name).from_config(config).eval()
        except Exception as e:  # a diffusers constructor given a config from outside: any error type
            raise ValueError(f"{name}: {sub}/config.json does not build a {cls_name}: "
                             f"{_first_line(e)}") from None
        channels = (_read_config(name, "vae/config.json", no_download) if index.get("vae") else {}).get(
            "block_out_channels")
        # the pipelines' vae_scale_factor: 2 ** (VAE levels - 1), 8 without a VAE
        vae_factor = 2 ** (len(channels) - 1) if isinstance(channels, list) and channels else 8
    family = family_of(denoiser)
    limit = family.latent_limit(denoiser.config)
    return ModelInfo(name, family.name, pipeline, denoiser, vae_factor * family.latent_multiple(denoiser.config),
                     limit * vae_factor if limit else None)


class _TorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


@contextlib.contextmanager
def _no_torchvision_notice():
    """Importing a pipeline's module makes transformers say that its image processors (IP-Adapter
    feature extractors, which generate never uses) would like torchvision: that notice only is
    dropped, at the logger that emits it."""
    logger = logging.getLogger("transformers.utils.import_utils")
    notice = _TorchvisionNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def load_pipeline(settings: Settings, dtype: torch.dtype, device: torch.device,
                  no_download: str | None = None, progress: bool = False):
    """The stock pipeline (inspect_model has checked the model first); `progress`: its own bar of
    the steps of each call, on stderr."""
    from diffusers import DiffusionPipeline

    from . import presets

    with _no_torchvision_notice():
        if settings.preset:
            pipe = presets.build_pipeline(settings.preset, seed=0)
            if dtype != torch.float32:
                pipe = pipe.to(dtype=dtype)
        else:
            path = os.path.expanduser(settings.model)
            local = os.path.isdir(path)
            try:
                pipe = DiffusionPipeline.from_pretrained(path if local else settings.model, dtype=dtype,
                                                         local_files_only=local or no_download is not None)
            except (OSError, ValueError) as e:   # weights missing from the cache or the download
                if local:
                    raise
                raise ModelMissing(missing_model_message(settings.model, _first_line(e), no_download)) from None
    pipe = pipe.to(device)
    # the pipeline's bar counts steps as the pipeline does (scheduler order included); cleared when
    # a call ends, so a grid's calls reuse one line under the images bar
    pipe.set_progress_bar_config(disable=not progress, desc="steps", leave=False)
    return pipe


def check_device(device: torch.device) -> None:
    """The device exists on this machine."""
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= n:
            have = f"{n} CUDA device(s), cuda:0-cuda:{n - 1}" if n else "no CUDA device"
            raise ValueError(f"--device: {device} is not on this machine ({have}); pass --device cpu"
                             + (" or one of those" if n else ""))
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device: mps is not available on this machine; pass --device cpu")


def _denoiser(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer or getattr(pipe, "transformer_2", None)


def _family(pipe) -> str:
    from .families import model_family
    return model_family(_denoiser(pipe))


def _family_class(family: str):
    from .families import FAMILIES
    return FAMILIES[family]


def default_size(pipe) -> tuple[int, int]:
    den = _denoiser(pipe)
    size = getattr(pipe, "default_sample_size", None) or den.config.get("sample_size")
    if size is None and _family_class(_family(pipe)).default_pixels is not None:
        return _family_class(_family(pipe)).default_pixels
    if isinstance(size, (tuple, list)):
        size = size[0]
    px = int(size) * int(getattr(pipe, "vae_scale_factor", 8))
    return px, px


def _apply_scheduler(pipe, scheduler: dict | None, corrupt: str):
    """A PNG's or file's scheduler (SCHEMA checked that from_config takes it) on the pipeline it
    fits; `corrupt` starts the error that it does not."""
    if not scheduler or _scheduler_of(pipe) == scheduler:
        return
    import diffusers

    compatible = sorted(c.__name__ for c in pipe.scheduler.compatibles)
    if scheduler["class"] not in compatible:
        raise ValueError(f"{corrupt}: scheduler: {scheduler['class']} does not fit "
                         f"{type(pipe).__name__}; compatible: {', '.join(compatible)}")
    pipe.scheduler = getattr(diffusers, scheduler["class"]).from_config(scheduler["config"])


def _scheduler_of(pipe) -> dict:
    return {"class": type(pipe.scheduler).__name__, "config": json.loads(pipe.scheduler.to_json_string())}


# ------------------------------------------------------------------------------------ running

def size_problem(width: int | None, height: int | None, *, name: str, pipeline: str, multiple: int,
                 max_side: int | None = None) -> str | None:
    """What is wrong with an image size in pixels for a model (None: nothing): sides must be
    multiples of `multiple` (VAE factor x patch) and at most `max_side`; None is the model's
    default. Shared by generate --size and bench --size."""
    m = multiple
    sides = [v for v in (width, height) if v is not None]
    size = f"{width or 'default'}x{height or 'default'}"
    if any(v % m for v in sides):
        near = "x".join("default" if v is None else str(max(m, round(v / m) * m)) for v in (width, height))
        return (f"size {size} does not fit {name} ({pipeline}): width and height must be "
                f"multiples of {m}; nearest: {near}")
    if max_side and any(v > max_side for v in sides):
        return (f"size {size} does not fit {name}: its position embedding covers at most "
                f"{max_side} pixels a side")
    return None


def _check_size(s: Settings, info: ModelInfo) -> None:
    why = size_problem(s.width, s.height, name=info.name, pipeline=info.pipeline, multiple=info.multiple,
                       max_side=info.max_side)
    if why:
        raise ValueError(why)


def check_guidance(info: ModelInfo, guidances: list[Guidance], settings: Settings | None = None) -> None:
    """Everything GuidedDenoiser checks against the model's blocks (layers, every term field),
    for guidances run together in one batch; with `settings`, also what guided() checks about the
    pipeline call those settings make. ValueError naming the guidance."""
    from .denoiser import GuidedDenoiser
    from .pipelines import check_arguments

    try:
        GuidedDenoiser(info.denoiser, guidances if len(guidances) > 1 else guidances[0])
        if settings is not None:
            check_arguments(info.pipeline, info.pipeline, tuple(guidances),
                             _call_kwargs(settings, info.family, guidances[0]))
    except (ValueError, TypeError, NotImplementedError) as e:
        more = f" (and {len(guidances) - 1} more run with it)" if len(guidances) > 1 else ""
        raise ValueError(f"guidance {spec_mod.format_spec(guidances[0])!r}{more} does not fit "
                         f"{info.name}: {e}") from None


def prepare(settings: Settings, info: ModelInfo, explicit_negative: bool) -> tuple[Settings, Guidance]:
    """Every check that needs the model's structure but no weights: the guidance (the family's
    default when none is given) and each grid cell or packed group as GuidedDenoiser and guided()
    take them, the image size, NAG's negative prompt. Returns the settings with the canonical
    guidance and NAG's negative prompt, and the Guidance."""
    s = copy.deepcopy(settings)
    g = spec_mod.parse_spec(s.guidance if s.guidance is not None else _family_class(info.family).default_guidance)
    s.guidance, s.guidance_json = spec_mod.format_spec(g), spec_mod.to_dict(g)
    _check_size(s, info)
    if s.grid is not None:
        cells = plan_grid(s, g, parse_grid(s.grid))
        runs = [[c.guidance for c in cells if c.group == k] for k in sorted({c.group for c in cells})]
    else:
        runs = [[spec_mod.parse_spec(text) for text in s.pack] if s.pack else [g]]
    if s.nag_negative_prompt is None and any(x.nag is not None for run in runs for x in run):
        if not explicit_negative:   # the API raises too: NAG without a negative prompt is a mistake
            raise ValueError('NAG needs a negative prompt to guide away from: pass --nag-negative-prompt '
                             'TEXT (--nag-negative-prompt "" for an empty one), or --negative-prompt TEXT to '
                             'use that')
        s.nag_negative_prompt = s.negative_prompt
    for run in runs:
        check_guidance(info, run, s)
    return s, g


def finish(settings: Settings, pipe) -> Settings:
    """The settings only the loaded pipeline knows: default size, pipeline class, scheduler, CPU
    threads and versions."""
    s = copy.deepcopy(settings)
    w, h = default_size(pipe)
    s.width, s.height = s.width if s.width is not None else w, s.height if s.height is not None else h
    s.pipeline = type(pipe).__name__
    s.scheduler = _scheduler_of(pipe)
    s.threads = torch.get_num_threads() if _denoiser(pipe).device.type == "cpu" else None
    s.versions = _versions()
    return s


def _call_kwargs(settings: Settings, family: str, first: Guidance) -> dict:
    """The pipeline call's arguments, generators apart."""
    negative = settings.negative_prompt
    if _family_class(family).uncond_call and first.cfg is not None and negative is None:
        negative = ""   # true CFG (FLUX) needs a negative prompt
    kwargs: dict[str, Any] = dict(prompt=settings.prompt, num_inference_steps=settings.steps,
                                  height=settings.height, width=settings.width)
    if negative is not None:
        kwargs["negative_prompt"] = negative
    return kwargs


def generate(pipe, settings: Settings, guidance: Guidance) -> list:
    """The batch's PIL images. With ``settings.pack`` (a packed grid group) image i has the
    guidance ``pack[i]`` and every image the seed ``settings.seed``; `guidance` is then unused."""
    from .pipelines import guided

    if settings.steps < 1 or settings.batch < 1:
        raise ValueError("--steps and --batch must be >= 1")
    if settings.pack:
        guidance = [spec_mod.parse_spec(text) for text in settings.pack]
        seeds = [settings.seed] * len(settings.pack)
    else:
        seeds = [settings.seed + i for i in range(settings.batch)]
    first = guidance[0] if isinstance(guidance, list) else guidance
    gens = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    family = _family_class(_family(pipe))
    kwargs = dict(_call_kwargs(settings, _family(pipe), first), generator=gens)
    kwargs[family.batch_argument] = len(seeds)
    if getattr(pipe, "default_num_frames", None):   # a tiny video preset's frames (build_pipeline)
        kwargs["num_frames"] = pipe.default_num_frames
    extra = {}
    if first.nag is not None:
        extra["nag_negative_prompt"] = settings.nag_negative_prompt
    if family.pipeline_output != "images":
        kwargs["output_type"] = "pil"   # a video: each result is its list of PIL frames
    with torch.no_grad(), guided(pipe, guidance, **extra):
        return [list(x) if isinstance(x, (list, tuple)) else x
                for x in getattr(pipe(**kwargs), family.pipeline_output)]


def png_info(settings: Settings):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(METADATA_KEY, settings.to_json())
    readable = {
        "prompt": settings.prompt, "negative_prompt": settings.negative_prompt or "",
        "nag_negative_prompt": settings.nag_negative_prompt or "",
        "guidance": settings.guidance or "", "model": settings.model or f"preset:{settings.preset}",
        "seed": f"{settings.seed} (image {settings.index} of a batch of {settings.batch})",
        "steps": str(settings.steps), "size": f"{settings.width}x{settings.height}",
        "scheduler": (settings.scheduler or {}).get("class", ""),
        "software": "guidance-rt " + str(settings.versions.get("guidance-rt")),
    }
    if settings.label:
        readable["label"] = settings.label
    for k, v in readable.items():
        info.add_itxt(k, v)
    return info


CORRUPT_PNG = "corrupt guidance-rt metadata"
CORRUPT_FILE = "corrupt guidance-rt settings"


def read_settings(path: str) -> Settings:
    """A PNG's settings, every field checked (ValueError "corrupt guidance-rt metadata: ...")."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            text = getattr(im, "text", {}).get(METADATA_KEY) or im.info.get(METADATA_KEY)
    except Exception as e:  # Pillow reports damaged files as OSError, SyntaxError, EOFError, zlib.error, ...
        raise ValueError(f"cannot read {path}: {_first_line(e)}") from None
    if not text:
        raise ValueError(f"{path} has no guidance-rt settings (it was not written by guidance-rt generate)")
    return _parsed(text, CORRUPT_PNG)


def read_settings_file(path: str) -> Settings:
    """A settings file's settings (--save-settings writes them), every field checked (ValueError
    "corrupt guidance-rt settings: ...")."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {_first_line(e)}") from None
    return _parsed(text, CORRUPT_FILE)


def _parsed(text: str, corrupt: str) -> Settings:
    """Settings from their JSON, every field checked; a problem is a ValueError "<corrupt>: ..."."""
    try:
        return Settings.from_json(text)
    except SettingsError as e:
        raise ValueError(f"{corrupt}: {e}") from None


def save(image, settings: Settings, path: str) -> str:
    """An image as a PNG, a video (a list of frames) as an animated PNG, both carrying the
    settings (read_settings reads either)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if isinstance(image, list):
        image[0].save(path, format="PNG", save_all=True, append_images=image[1:], loop=0,
                      duration=VIDEO_FRAME_MS, pnginfo=png_info(settings))
    else:
        image.save(path, pnginfo=png_info(settings))
    return path


VIDEO_FRAME_MS = 62   # Wan's 16 frames per second


def write_settings(settings: Settings, path: str) -> str:
    """The settings as a file for --settings: the JSON a PNG stores, indented for reading."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(settings.to_json(indent=1) + "\n")
    return path


def _numbered(out: str, i: int, n: int, tag: str = "") -> str:
    if n == 1 and not tag:
        return out
    stem, ext = os.path.splitext(out)
    return f"{stem}-{tag}{i}{ext or '.png'}"


# ------------------------------------------------------------------------------------ grids

@dataclass
class Axis:
    param: str            # as written: pag.scale
    term: str             # lower-case term name
    field: str
    values: list
    texts: list[str]


def _split_values(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    if depth != 0:
        raise ValueError(f"unbalanced brackets in {text!r}")
    return out


def parse_grid(items: list[str]) -> list[Axis]:
    axes = []
    names = spec_mod.term_names()
    for item in items:
        m = re.match(r"^([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?=(.+)$", item.strip())
        if not m:
            raise ValueError(f"--grid {item!r}: expected PARAM=v1,v2,... with PARAM term.field "
                             f"(e.g. pag.scale=0,1.5,3) or a term alone for its scale")
        term, fld, values = m.group(1).lower(), m.group(2) or "scale", m.group(3)
        if term not in names:
            raise ValueError(f"--grid {item!r}: unknown term {term!r}; valid terms: {', '.join(names)}")
        cls = spec_mod.term_class(term)
        fields = spec_mod.term_fields(cls)
        if fld not in fields:
            raise ValueError(f"--grid {item!r}: {term} has no field {fld!r}; valid: {', '.join(fields)}")
        texts = [v.strip() for v in _split_values(values)]
        if any(not t for t in texts):
            raise ValueError(f"--grid {item!r}: empty value")
        parsed = []
        for t in texts:
            if t.startswith("[") and t.endswith("]"):
                t = t[1:-1] if "," in t else t[1:-1] + ","   # a bracketed value is a list
            try:
                parsed.append(spec_mod.parse_value(t))
            except ValueError as e:
                raise ValueError(f"--grid {item!r}: {e}") from None
        axes.append(Axis(f"{term}.{fld}", term, fld, parsed, texts))
    params = [a.param for a in axes]
    if len(set(params)) != len(params):
        raise ValueError(f"--grid: a parameter is given twice ({params})")
    return axes


def cell_guidance(base: Guidance, assignment: list[tuple[Axis, Any]]) -> Guidance:
    terms = list(base.terms)
    for axis, value in assignment:
        cls = spec_mod.term_class(axis.term)
        idx = next((i for i, t in enumerate(terms) if type(t) is cls), None)
        values = {} if idx is None else {k: getattr(terms[idx], k) for k in spec_mod.term_fields(cls)}
        try:
            term = spec_mod.build_term(cls, {**values, axis.field: value})
        except spec_mod.SpecError as e:
            raise ValueError(f"--grid {axis.param}={_show(value)}: {e.reason}") from None
        if idx is None:
            terms.append(term)
        else:
            terms[idx] = term
    # CFG (or a term in its place) with scale <= 1 is CFG off: no uncond branch (guided() wants
    # scale > 1 or no CFG term, the pipelines' guidance_scale convention; a CFG-Zero* cell
    # loses its zero-init steps with it)
    terms = [t for t in terms if not (isinstance(t, CFG) and t.scale <= 1.0)]
    return Guidance(*terms)


def step_configuration(g: Guidance, steps: int) -> tuple:
    """Which terms run in every step of an N-step run, and everything about them that one packed
    batch must share (Guidance.structure). Cells with equal keys differ only in scales and run
    as one batch with per-sample scales, without a row any of them does not need."""
    structure = dict(enumerate(g.structure()))
    out = []
    for i in range(steps):
        active = []
        for k, t in enumerate(g.terms):
            if t.in_window(i, steps) and t.scale != t.off_scale:
                active.append(structure[k])
        out.append(tuple(active))
    return tuple(out)


@dataclass
class Cell:
    label: str
    guidance: Guidance
    settings: Settings
    image: Any = None
    group: int = 0


def plan_grid(base: Settings, guidance: Guidance, axes: list[Axis]) -> list[Cell]:
    cells = []
    for combo in itertools.product(*[list(zip(a.values, a.texts)) for a in axes]):
        assignment = [(a, v) for a, (v, _) in zip(axes, combo)]
        label = " ".join(f"{a.param}={t}" for a, (_, t) in zip(axes, combo))
        g = cell_guidance(guidance, assignment)
        s = copy.deepcopy(base)
        s.guidance, s.guidance_json, s.label, s.grid = spec_mod.format_spec(g), spec_mod.to_dict(g), label, None
        s.batch, s.index = 1, 0
        cells.append(Cell(label, g, s))
    keys: dict[tuple, int] = {}
    for c in cells:
        c.group = keys.setdefault(step_configuration(c.guidance, base.steps), len(keys))
    return cells


def run_grid(pipe, cells: list[Cell], log: Callable[[str], None] = lambda s: None,
             progress: bool = False) -> list[Cell]:
    """Every cell in the same seed; each group of cells sharing a step configuration is one
    packed batch (one pipeline call with per-sample Guidances). `progress`: a bar of the images
    on stderr when there are several calls (the pipeline's own bar counts each call's steps)."""
    from tqdm.auto import tqdm

    groups = sorted({c.group for c in cells})
    log(f"grid: {len(cells)} cells in {len(groups)} packed batch(es)")
    with tqdm(total=len(cells), desc="images", unit="image", file=sys.stderr, leave=False,
              disable=not progress or len(groups) == 1) as bar:
        for gid in groups:
            members = [c for c in cells if c.group == gid]
            if len(members) == 1:
                members[0].image = generate(pipe, members[0].settings, members[0].guidance)[0]
            else:
                pack = [c.settings.guidance for c in members]
                for k, c in enumerate(members):
                    c.settings.pack, c.settings.batch, c.settings.index = pack, len(pack), k
                images = generate(pipe, members[0].settings, members[0].guidance)
                for c, image in zip(members, images):
                    c.image = image
            bar.update(len(members))
    return cells


def compose_grid(cells: list[Cell], axes: list[Axis], title: str = ""):
    """A labelled grid image: the last axis along columns, the others along rows."""
    from PIL import Image, ImageDraw, ImageFont

    cols = len(axes[-1].values) if axes else len(cells)
    rows = math.ceil(len(cells) / cols)
    still = lambda image: image[0] if isinstance(image, list) else image   # a video: its first frame
    w, h = still(cells[0].image).size
    font = ImageFont.load_default()
    label_h = 14 * (1 + max(len(_wrap(c.label, w)) for c in cells))
    title_h = 16 if title else 0
    grid = Image.new("RGB", (cols * w, title_h + rows * (h + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 2), title[: max(1, cols * w // 6)], fill="black", font=font)
    for k, c in enumerate(cells):
        r, col = divmod(k, cols)
        x, y = col * w, title_h + r * (h + label_h)
        for j, line in enumerate(_wrap(c.label, w)):
            draw.text((x + 3, y + 2 + 14 * j), line, fill="black", font=font)
        grid.paste(still(c.image), (x, y + label_h))
    return grid


def _wrap(text: str, width_px: int, char_px: int = 6) -> list[str]:
    per_line = max(4, width_px // char_px)
    lines, cur = [], ""
    for word in text.split():
        if cur and len(cur) + 1 + len(word) > per_line:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}".strip()
    lines.append(cur)
    return lines


# ------------------------------------------------------------------------------------ CLI entry

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _size(text: str) -> tuple[int, int]:
    m = re.match(r"^(\d+)[xX](\d+)$", text.strip())
    if not m:
        raise ValueError(f"--size {_show(text)}: expected WxH in pixels, e.g. 1024x768")
    try:
        return int(m.group(1)), int(m.group(2))
    except ValueError:   # beyond Python's 4300-digit conversion limit
        raise ValueError(f"--size {_show(text)}: width and height must be between 1 and {MAX_SIDE}") from None


def parse_size(text: str) -> tuple[int, int]:
    """--size WxH: (width, height) in pixels, each between 1 and MAX_SIDE, with generate's
    messages (bench --size; generate checks the range with the rest of its settings)."""
    sides = _size(text)
    for flag, value in zip(("--size width", "--size height"), sides):
        why = _between(1, MAX_SIDE)(value, None)
        if why:
            raise ValueError(f"{flag}: {why}")
    return sides


def settings_from_args(args) -> Settings:
    """The settings a generate command line asks for: a PNG's or a settings file's (checked when
    read) with the options given in their place, all checked with SCHEMA (problems name the
    option)."""
    if args.from_image or args.settings:
        s = read_settings(args.from_image) if args.from_image else read_settings_file(args.settings)
        s.label = None   # a grid cell's label is not the re-made image's
    else:
        s = Settings(model=args.model, preset=args.preset)
    if args.guidance is not None:
        # canonical from here on: a spec from a PNG and one from the command line read alike
        g = spec_mod.load_guidance(args.guidance)
        try:
            s.guidance, s.guidance_json = spec_mod.format_spec(g), None
        except ValueError as e:
            raise ValueError(f"--guidance: {e}") from None
    if s.pack and (args.guidance is not None or args.batch is not None):
        s.pack, s.batch = None, 1   # a new guidance or batch: not the grid group any more
    if args.batch is not None:
        s.index = 0                 # a new batch: every image of it is written
    for name in ("prompt", "negative_prompt", "nag_negative_prompt", "steps", "seed", "batch"):
        value = getattr(args, name)
        if value is not None:
            setattr(s, name, value)
    if args.size:
        s.width, s.height = _size(args.size)
    if args.grid:
        s.grid = list(args.grid)
    if args.dtype is not None:
        s.dtype = _dtype_name(args.dtype)
    if args.device:
        s.device = args.device
    validate(s, by_flag=True)
    return s


def main(args, log: Callable[[str], None] = print) -> list[str]:
    """Run `guidance-rt generate`; returns the paths written."""
    threads = torch.get_num_threads()
    try:
        return _main(args, log)
    finally:
        torch.set_num_threads(threads)


def _main(args, log: Callable[[str], None]) -> list[str]:
    s = settings_from_args(args)
    source = args.from_image or args.settings   # settings read from a PNG or a settings file
    device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_device(device)
    dtype = getattr(torch, s.dtype) if s.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    s.device, s.dtype = str(device), _dtype_name(dtype)
    # a hub id read from a file is fetched only when asked for: a file should not start a download
    no_download = (f"a model named in {source} is downloaded only with --allow-download"
                   if source and not args.allow_download else None)
    info = inspect_model(s, no_download)
    s, guidance = prepare(s, info, explicit_negative=args.negative_prompt is not None)
    stored = copy.deepcopy(s)
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    pipe = load_pipeline(s, dtype, device, no_download, progress=progress)
    if source:
        _apply_scheduler(pipe, stored.scheduler, CORRUPT_PNG if args.from_image else CORRUPT_FILE)
        if stored.threads and device.type == "cpu":
            torch.set_num_threads(stored.threads)   # CPU kernels' results depend on the threads
        if stored.versions and stored.versions != _versions():
            log(f"note: {source} was made with {stored.versions}; bit-identical reproduction "
                "needs the same versions, device and dtype")
    s = finish(s, pipe)
    paths = []
    if args.save_settings:   # before generating: a run that fails later still leaves them
        paths.append(write_settings(s, args.save_settings))
        log(f"wrote {args.save_settings}")
    log(f"{s.pipeline}: {s.prompt!r}, guidance {s.guidance or '(none)'}, {s.steps} steps, "
        f"{s.width}x{s.height}, seed {s.seed}, " + (f"grid {' '.join(s.grid)}" if s.grid else f"batch {s.batch}"))
    if args.dry_run:
        log("dry run: nothing generated")
        return paths
    out = args.out or (
        os.path.splitext(args.from_image)[0] + "-again.png" if args.from_image else
        "guidance-rt-grid.png" if s.grid else "guidance-rt.png")
    if s.grid is not None:
        axes = parse_grid(s.grid)
        cells = plan_grid(s, guidance, axes)
        run_grid(pipe, cells, log, progress=progress)
        grid = compose_grid(cells, axes, title=f"{s.prompt} | {s.guidance} | seed {s.seed}")
        paths.append(save(grid, s, out))
        for k, c in enumerate(cells):
            paths.append(save(c.image, c.settings, _numbered(out, k, len(cells), "cell")))
        log(f"wrote {out} ({len(cells)} cells) and {len(cells)} cell images")
        return paths
    images = generate(pipe, s, guidance)
    # a PNG re-makes the image it was, and a packed grid group (whose images have other
    # guidances) the cell it was; --batch asks for a new batch, every image of which is written
    one = args.batch is None and bool(args.from_image or s.pack)
    for i in ([s.index] if one else range(len(images))):
        si = copy.deepcopy(s)
        si.index = i
        paths.append(save(images[i], si, out if one else _numbered(out, i, len(images))))
        log(f"wrote {paths[-1]}")
    return paths
