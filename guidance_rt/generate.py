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
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import spec as spec_mod
from .terms import CFG, NAG, Guidance

DEFAULT_GUIDANCE = {"unet": "cfg=5", "sd3": "cfg=4", "flux": ""}
METADATA_KEY = "guidance-rt"


class ModelMissing(Exception):
    """The model is neither a local folder nor available from the hub cache / network."""


@dataclass
class Settings:
    prompt: str = "a photo of a cat"
    negative_prompt: str | None = None
    nag_negative_prompt: str | None = None  # NAG's negative (default: negative_prompt, else "")
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

    def to_json(self) -> str:
        return json.dumps(spec_mod.jsonable(dataclasses.asdict(self)), allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "Settings":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


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


def missing_model_message(model: str, reason: str) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    return (f"model {model!r} is not on this machine"
            + (" (HF_HUB_OFFLINE is set, so nothing is downloaded)" if offline else
               " and could not be downloaded") + f": {reason}\n"
            f"Download it first (`huggingface-cli download {model}`, then it is found in the hub "
            "cache), or point --model at a local folder holding a diffusers pipeline saved with "
            "save_pretrained (model_index.json with unet/ or transformer/ subfolders). "
            "`--preset tiny-sdxl` runs without any weights (random, for smoke tests).")


def load_pipeline(settings: Settings, dtype: torch.dtype, device: torch.device):
    from diffusers import DiffusionPipeline

    from . import presets
    from .pipelines import SUPPORTED_PIPELINES

    if settings.preset:
        pipe = presets.build_pipeline(settings.preset, seed=0)
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    elif settings.model:
        path = os.path.expanduser(settings.model)
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "model_index.json")):
                raise ValueError(f"{settings.model} is not a diffusers pipeline folder (no model_index.json); "
                                 "save one with pipe.save_pretrained(folder)")
            pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)
        elif _looks_like_path(settings.model):
            raise ModelMissing(f"model folder {settings.model!r} does not exist; --model takes a local "
                               "pipeline folder (save_pretrained) or a Hugging Face hub id")
        else:
            try:
                pipe = DiffusionPipeline.from_pretrained(settings.model, dtype=dtype)
            except (OSError, ValueError, EnvironmentError) as e:
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ModelMissing(missing_model_message(settings.model, reason[:300])) from None
    else:
        raise ValueError("give --model (a local folder or hub id), --preset (a tiny preset) or --from-image")
    if type(pipe).__name__ not in SUPPORTED_PIPELINES:
        raise ValueError(f"{type(pipe).__name__} is not supported by guided(); supported: "
                         f"{', '.join(SUPPORTED_PIPELINES)}")
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _denoiser(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def _family(pipe) -> str:
    from .layers import model_family
    return model_family(_denoiser(pipe))


def default_size(pipe) -> tuple[int, int]:
    den = _denoiser(pipe)
    size = getattr(pipe, "default_sample_size", None) or den.config.sample_size
    if isinstance(size, (tuple, list)):
        size = size[0]
    px = int(size) * int(getattr(pipe, "vae_scale_factor", 8))
    return px, px


def _apply_scheduler(pipe, scheduler: dict | None):
    if not scheduler:
        return
    import diffusers

    current = {"class": type(pipe.scheduler).__name__, "config": json.loads(pipe.scheduler.to_json_string())}
    if current == scheduler:
        return
    cls = getattr(diffusers, scheduler["class"], None)
    if cls is None:
        raise ValueError(f"unknown scheduler class {scheduler['class']!r}")
    pipe.scheduler = cls.from_config(scheduler["config"])


def _scheduler_of(pipe) -> dict:
    return {"class": type(pipe.scheduler).__name__, "config": json.loads(pipe.scheduler.to_json_string())}


# ------------------------------------------------------------------------------------ running

def resolve(settings: Settings, pipe) -> tuple[Settings, Guidance]:
    """Fill in the model-dependent defaults; returns the complete settings and the Guidance."""
    s = copy.deepcopy(settings)
    family = _family(pipe)
    text = s.guidance if s.guidance is not None else DEFAULT_GUIDANCE[family]
    g = spec_mod.load_guidance(text)
    s.guidance = spec_mod.format_spec(g)
    s.guidance_json = spec_mod.to_dict(g)
    if s.width is None or s.height is None:
        w, h = default_size(pipe)
        s.width, s.height = s.width or w, s.height or h
    if getattr(g, "nag", None) is not None and s.nag_negative_prompt is None:
        s.nag_negative_prompt = s.negative_prompt or ""
    s.pipeline = type(pipe).__name__
    s.scheduler = _scheduler_of(pipe)
    s.threads = torch.get_num_threads() if _denoiser(pipe).device.type == "cpu" else None
    s.versions = _versions()
    return s, g


def generate(pipe, settings: Settings, guidance: Guidance) -> list:
    """The batch's PIL images. With ``settings.pack`` (a packed grid group) image i has the
    guidance ``pack[i]`` and every image the seed ``settings.seed``; `guidance` is then unused."""
    from .pipelines import guided

    if settings.steps < 1 or settings.batch < 1:
        raise ValueError("--steps and --batch must be >= 1")
    if settings.pack:
        guidance = [spec_mod.load_guidance(text) for text in settings.pack]
        seeds = [settings.seed] * len(settings.pack)
    else:
        seeds = [settings.seed + i for i in range(settings.batch)]
    first = guidance[0] if isinstance(guidance, list) else guidance
    family = _family(pipe)
    negative = settings.negative_prompt
    if family == "flux" and first.cfg is not None and negative is None:
        negative = ""   # FLUX true CFG needs a negative prompt
    gens = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    kwargs: dict[str, Any] = dict(prompt=settings.prompt, num_inference_steps=settings.steps,
                                  height=settings.height, width=settings.width,
                                  num_images_per_prompt=len(seeds), generator=gens)
    if negative is not None:
        kwargs["negative_prompt"] = negative
    extra = {}
    if first.nag is not None:
        extra["nag_negative_prompt"] = settings.nag_negative_prompt
    with torch.no_grad(), guided(pipe, guidance, **extra):
        return list(pipe(**kwargs).images)


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


def read_settings(path: str) -> Settings:
    from PIL import Image

    with Image.open(path) as im:
        text = getattr(im, "text", {}).get(METADATA_KEY) or im.info.get(METADATA_KEY)
    if not text:
        raise ValueError(f"{path} has no guidance-rt settings (it was not written by guidance-rt generate)")
    return Settings.from_json(text)


def save(image, settings: Settings, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path, pnginfo=png_info(settings))
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
                inner = t[1:-1]
                parsed.append(spec_mod.parse_value(inner if "," in inner else inner + ","))
            else:
                parsed.append(spec_mod.parse_value(t))
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
        try:
            if idx is None:
                terms.append(cls(**{axis.field: value}))
            else:
                terms[idx] = dataclasses.replace(terms[idx], **{axis.field: value})
        except (TypeError, ValueError) as e:
            raise ValueError(f"--grid {axis.param}={spec_mod.format_value(value)}: {e}") from None
    # CFG with scale <= 1 is CFG off: no uncond branch (guided() wants scale > 1 or no CFG term)
    terms = [t for t in terms if not (type(t) is CFG and t.scale <= 1.0)]
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
            off_scale = 1.0 if isinstance(t, (CFG, NAG)) else 0.0
            if t.in_window(i, steps) and t.scale != off_scale:
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


def run_grid(pipe, cells: list[Cell], log: Callable[[str], None] = lambda s: None) -> list[Cell]:
    """Every cell in the same seed; each group of cells sharing a step configuration is one
    packed batch (one pipeline call with per-sample Guidances)."""
    groups = sorted({c.group for c in cells})
    log(f"grid: {len(cells)} cells in {len(groups)} packed batch(es)")
    for gid in groups:
        members = [c for c in cells if c.group == gid]
        if len(members) == 1:
            members[0].image = generate(pipe, members[0].settings, members[0].guidance)[0]
            continue
        pack = [c.settings.guidance for c in members]
        for k, c in enumerate(members):
            c.settings.pack, c.settings.batch, c.settings.index = pack, len(pack), k
        images = generate(pipe, members[0].settings, members[0].guidance)
        for c, image in zip(members, images):
            c.image = image
    return cells


def compose_grid(cells: list[Cell], axes: list[Axis], title: str = ""):
    """A labelled grid image: the last axis along columns, the others along rows."""
    from PIL import Image, ImageDraw, ImageFont

    cols = len(axes[-1].values) if axes else len(cells)
    rows = math.ceil(len(cells) / cols)
    w, h = cells[0].image.size
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
        grid.paste(c.image, (x, y + label_h))
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


def settings_from_args(args) -> Settings:
    if getattr(args, "from_image", None):
        s = read_settings(args.from_image)
        s.label = None
    else:
        s = Settings(model=args.model, preset=args.preset)
    if s.pack and (getattr(args, "guidance", None) is not None or getattr(args, "batch", None) is not None):
        s.pack, s.batch, s.index = None, 1, 0    # a new guidance or batch: not the grid group any more
    for name in ("prompt", "negative_prompt", "nag_negative_prompt", "guidance", "steps", "seed", "batch"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(s, name, value)
    if getattr(args, "size", None):
        m = re.match(r"^(\d+)[xX](\d+)$", args.size.strip())
        if not m:
            raise ValueError(f"--size {args.size!r}: expected WxH in pixels, e.g. 1024x768")
        s.width, s.height = int(m.group(1)), int(m.group(2))
    if getattr(args, "grid", None):
        s.grid = list(args.grid)
    if getattr(args, "dtype", None) is not None:
        s.dtype = _dtype_name(args.dtype)
    if getattr(args, "device", None):
        s.device = args.device
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
    from_image = getattr(args, "from_image", None)
    reproduce = from_image and s.grid is None
    device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, s.dtype) if s.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    s.device, s.dtype = str(device), _dtype_name(dtype)
    if s.grid is not None:
        axes = parse_grid(s.grid)   # errors before loading anything
        if s.batch != 1:
            raise ValueError("--grid makes one image per cell; use --batch 1")
    if s.guidance is not None:
        spec_mod.load_guidance(s.guidance)  # spec errors before loading the model
    stored = copy.deepcopy(s)
    pipe = load_pipeline(s, dtype, device)
    if from_image:
        _apply_scheduler(pipe, stored.scheduler)
        if stored.threads and device.type == "cpu":
            torch.set_num_threads(stored.threads)   # CPU kernels' results depend on the threads
        if stored.versions and stored.versions != _versions():
            log(f"note: {from_image} was made with {stored.versions}; bit-identical reproduction "
                "needs the same versions, device and dtype")
    s, guidance = resolve(s, pipe)
    out = getattr(args, "out", None) or (
        os.path.splitext(from_image)[0] + "-again.png" if from_image else
        "guidance-rt-grid.png" if s.grid else "guidance-rt.png")
    if s.grid is not None:
        cells = plan_grid(s, guidance, axes)
        run_grid(pipe, cells, log)
        grid = compose_grid(cells, axes, title=f"{s.prompt} | {s.guidance} | seed {s.seed}")
        paths = [save(grid, s, out)]
        for k, c in enumerate(cells):
            paths.append(save(c.image, c.settings, _numbered(out, k, len(cells), "cell")))
        log(f"wrote {paths[0]} ({len(cells)} cells) and {len(cells)} cell images")
        return paths
    log(f"{s.pipeline}: {s.prompt!r}, guidance {s.guidance or '(none)'}, {s.steps} steps, "
        f"{s.width}x{s.height}, seed {s.seed}, batch {s.batch}")
    images = generate(pipe, s, guidance)
    paths = []
    one = reproduce and 0 <= s.index < len(images)   # --from-image: the image it was
    for i in ([s.index] if one else range(len(images))):
        si = copy.deepcopy(s)
        si.index = i
        paths.append(save(images[i], si, out if one else _numbered(out, i, len(images))))
    for p in paths:
        log(f"wrote {p}")
    return paths
