"""OCR evaluation of visible text (shared/methods.md section 6): does the image show, legibly,
the text that the prompt quotes?

``evaluate(items, out_dir=...)`` reads every image with an offline OCR engine, compares what it
reads with the quoted text of its prompt, and reports per guidance setting (images grouped by a
``setting`` label such as "cfg" or "cslg"): exact match, character error rate and legibility,
as JSON and as a comparison grid PNG (rows = prompts, columns = settings).

Definitions
- **Expected text**: the quoted parts of the prompt (``extract_quoted``): "...", \u201c...\u201d,
  \u201e...\u201c, \u00ab...\u00bb, \u2018...\u2019, and '...' when the opening quote does not follow a
  letter or digit and the closing one is not followed by one (so apostrophes in "cat's" or
  "dogs'" are not quotes). An item may give ``text`` (a string or a list) instead.
- **Normalisation** (``normalize``) before any comparison: Unicode NFKC, typographic quotes and
  dashes mapped to ASCII, case-folded, runs of whitespace collapsed to one space, stripped.
  Punctuation is kept and counts.
- **OCR reading**: the engine's text boxes with recognition score >= ``min_score`` (0.5), in
  reading order (lines top to bottom, boxes left to right), joined by spaces (``read``).
- **CER** per expected string: the minimum over every contiguous run of words of the reading
  (including the empty run) of ``Levenshtein(run, expected) / len(expected)``, on normalised
  text. So the expected text is found wherever it is in the image and other text in the scene is
  not penalised; an image with no text has CER 1, never more. ``cer_full`` compares the whole
  reading with the expected text (it can exceed 1).
- **Exact match**: CER 0, i.e. some run of words reads exactly the expected text (normalised).
- **Legibility**: ``(1 - CER) * confidence``, where confidence is the mean recognition score of the
  boxes that the best run comes from (0 when nothing matched): 1 only for text read exactly and
  with full confidence.
- Several quoted strings in one prompt: each is matched on its own; the image's CER is
  ``sum(distance) / sum(len)``, legibility the length-weighted mean, exact match needs all.
- Per setting: ``exact_match`` = fraction of images, ``cer`` and ``legibility`` = means over
  images, ``no_text`` = images where the OCR found nothing; images with no expected text are
  counted in ``no_reference`` and left out of the means.

OCR engine: RapidOCR (the ``rapidocr`` package, PP-OCRv6 small detection and recognition ONNX
models shipped inside its wheel, run by onnxruntime on the CPU), detecting at the image's own
size capped at 960 px on the long side. The models are loaded from the installed package by
path, so nothing is downloaded at run time. Any callable that takes a PIL
RGB image and returns a list of ``Detection`` can be passed as ``engine`` instead.
"""
from __future__ import annotations

import json
import re
import sys
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

__all__ = ["extract_quoted", "normalize", "levenshtein", "char_error_rate", "Detection", "RapidOCREngine",
           "default_engine", "load_image", "check_image", "ImageReadError", "OCRUnavailableError", "reading_order",
           "TextMatch", "ImageResult", "EvalReport", "score_detections", "score_image", "evaluate",
           "load_manifest", "items_from_folders", "comparison_grid", "main"]


class ImageReadError(ValueError):
    """An image path that cannot be read, or a file that is not an image."""


class OCRUnavailableError(RuntimeError):
    """The OCR engine (rapidocr + onnxruntime) is not installed or its shipped models are missing."""


# --------------------------------------------------------------------------------- text

_QUOTES = re.compile(
    r'"([^"\n]+)"'                       # "..."
    r"|\u201c([^\u201d\n]+)\u201d"       # \u201c...\u201d
    r"|\u201e([^\u201c\u201d\n]+)[\u201c\u201d]"  # \u201e...\u201c (German)
    r"|\u00ab([^\u00bb\n]+)\u00bb"       # \u00ab...\u00bb
    r"|\u2018([^\n]+?)\u2019(?!\w)"   # \u2018...\u2019 (\u2019 inside a word is an apostrophe)
    r"|(?<![\w'])'(\S(?:[^\n]*?\S)?)'(?!\w)"  # '...' (not an apostrophe)
)


def extract_quoted(prompt: str) -> list[str]:
    """The quoted strings of a prompt, in order, stripped; empty quotes are ignored."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    out = []
    for m in _QUOTES.finditer(prompt):
        text = next(g for g in m.groups() if g is not None).strip()
        if text:
            out.append(text)
    return out


_TYPOGRAPHIC = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
                              "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"',
                              "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-",
                              "\u2212": "-"})


def normalize(text: str) -> str:
    """NFKC, typographic quotes / dashes to ASCII, case-fold, collapse whitespace, strip."""
    text = unicodedata.normalize("NFKC", text).translate(_TYPOGRAPHIC).casefold()
    return " ".join(text.split())


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_error_rate(read: str, expected: str) -> float:
    """Levenshtein(normalize(read), normalize(expected)) / len(normalize(expected)) (whole strings)."""
    e = normalize(expected)
    if not e:
        raise ValueError("the expected text is empty")
    return levenshtein(normalize(read), e) / len(e)


# --------------------------------------------------------------------------------- images

def _read(path: Path, verify: bool = False):
    """Open (and load, or only verify) an image file; every failure is an ImageReadError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as f:
            if verify:
                f.verify()
                return None
            f.load()
            return f.copy()
    except FileNotFoundError:
        raise ImageReadError(f"cannot read image {path}: no such file") from None
    except IsADirectoryError:
        raise ImageReadError(f"cannot read image {path}: it is a directory") from None
    except PermissionError:
        raise ImageReadError(f"cannot read image {path}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"cannot read image {path}: not an image file (or an unsupported format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"cannot read image {path}: {e}") from None


def check_image(image) -> None:
    """Raise ImageReadError naming the file unless `image` is a readable image (header and
    structure verified, pixels not decoded)."""
    if isinstance(image, (str, Path)):
        _read(Path(image), verify=True)
    else:
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a path or a PIL image, got {type(image).__name__}")


def load_image(image):
    """A PIL RGB image from a path or a PIL image; transparency is composited on white.
    Raises ImageReadError naming the file when it cannot be read or is not an image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, (str, Path)):
        img = _read(Path(image))
    else:
        raise TypeError(f"image must be a path or a PIL image, got {type(image).__name__}")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img.convert("RGB")


# --------------------------------------------------------------------------------- OCR engine

@dataclass(frozen=True)
class Detection:
    """One text box: recognised text, recognition score in [0, 1], box corners (x, y) in pixels."""

    text: str
    score: float
    box: tuple  # ((x, y), (x, y), (x, y), (x, y))

    @property
    def top(self) -> float:
        return min(p[1] for p in self.box)

    @property
    def bottom(self) -> float:
        return max(p[1] for p in self.box)

    @property
    def left(self) -> float:
        return min(p[0] for p in self.box)


class RapidOCREngine:
    """RapidOCR with the ONNX models shipped in the ``rapidocr`` wheel (PP-OCRv6 small det/rec,
    PP-OCR mobile v2 direction classifier), on onnxruntime's CPU provider. Offline by
    construction: the models are passed by path, so rapidocr never takes its download path."""

    name = "rapidocr"
    MODELS = {"Det": "PP-OCRv6_det_small.onnx", "Rec": "PP-OCRv6_rec_small.onnx",
              "Cls": "ch_ppocr_mobile_v2.0_cls_mobile.onnx"}

    def __init__(self, threads: int | None = None, max_side: int = 960):
        try:
            import onnxruntime  # noqa: F401
            import rapidocr
            from rapidocr import RapidOCR
        except ImportError as e:
            raise OCRUnavailableError(
                f"OCR evaluation needs rapidocr and onnxruntime ({e}); install them with "
                "`pip install 'guidance-rt[ocr]'`") from None
        from importlib.metadata import version

        models = Path(rapidocr.__file__).resolve().parent / "models"
        # Detection runs at the image's own size, scaled down to at most `max_side` on the long
        # side (rapidocr's default instead scales the SHORT side UP to 736, which measured both
        # slower and less accurate on rendered and scene-like text).
        params: dict[str, Any] = {"Global.log_level": "error", "Det.limit_type": "max",
                                  "Det.limit_side_len": int(max_side)}
        for part, filename in self.MODELS.items():
            path = models / filename
            if not path.is_file():
                raise OCRUnavailableError(
                    f"the OCR model {path} is missing: guidance-rt uses the models shipped in the "
                    f"rapidocr wheel (tested with rapidocr 3.10.0); reinstall it with "
                    f"`pip install 'rapidocr==3.10.0'`")
            params[f"{part}.model_path"] = str(path)
        if threads:
            params["EngineConfig.onnxruntime.intra_op_num_threads"] = int(threads)
            params["EngineConfig.onnxruntime.inter_op_num_threads"] = 1
        self._ocr = RapidOCR(params=params)
        self.version = version("rapidocr")
        self.models = {k: str(models / v) for k, v in self.MODELS.items()}
        self.max_side = int(max_side)

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "max_side": self.max_side,
                "models": {k: Path(v).name for k, v in self.models.items()}}

    def __call__(self, image) -> list[Detection]:
        import numpy as np

        img = load_image(image)
        bgr = np.ascontiguousarray(np.asarray(img)[:, :, ::-1])
        res = self._ocr(bgr)
        if res is None or res.txts is None or res.boxes is None:
            return []
        out = []
        for box, text, score in zip(res.boxes, res.txts, res.scores):
            pts = tuple((float(x), float(y)) for x, y in np.asarray(box).reshape(-1, 2))
            out.append(Detection(str(text), float(score), pts))
        return out


_DEFAULT_ENGINE: RapidOCREngine | None = None


def default_engine() -> RapidOCREngine:
    """The shared RapidOCREngine (created on first use)."""
    global _DEFAULT_ENGINE
    if _DEFAULT_ENGINE is None:
        _DEFAULT_ENGINE = RapidOCREngine()
    return _DEFAULT_ENGINE


def reading_order(detections: Sequence[Detection]) -> list[Detection]:
    """Boxes in reading order: grouped into lines (a box joins a line when its vertical centre
    lies within the line's extent), lines top to bottom, boxes left to right."""
    lines: list[list] = []  # [top, bottom, [detections]]
    for d in sorted(detections, key=lambda d: (d.top + d.bottom) / 2):
        centre = (d.top + d.bottom) / 2
        if lines and lines[-1][0] <= centre <= lines[-1][1]:
            line = lines[-1]
            line[0], line[1] = min(line[0], d.top), max(line[1], d.bottom)
            line[2].append(d)
        else:
            lines.append([d.top, d.bottom, [d]])
    return [d for _, _, ds in lines for d in sorted(ds, key=lambda d: d.left)]


# --------------------------------------------------------------------------------- scoring

@dataclass
class TextMatch:
    """How well one expected string was read."""

    expected: str
    matched: str            # the best run of words of the reading ("" when none)
    distance: int           # Levenshtein(normalize(matched), normalize(expected))
    length: int             # len(normalize(expected))
    cer: float              # distance / length, in [0, 1]
    exact: bool
    confidence: float       # mean score of the boxes of the best run (0 when empty)
    legibility: float       # (1 - cer) * confidence


@dataclass
class ImageResult:
    image: str
    setting: str
    prompt: str | None
    expected: list[str]
    read: str                       # everything read, in reading order
    detections: int
    matches: list[TextMatch] = field(default_factory=list)
    cer: float | None = None
    cer_full: float | None = None
    exact: bool | None = None
    legibility: float | None = None
    thumbnail: Any = None           # a small PIL copy for the grid (not serialised)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "thumbnail"}
        return d


def _match_one(expected: str, words: list[tuple[str, float]], max_extra: int = 3) -> TextMatch:
    e = normalize(expected)
    if not e:
        raise ValueError(f"expected text {expected!r} is empty after normalisation")
    n_exp = len(e.split())
    best = (len(e), 0, 0, 0)  # (distance, run length, start, end): the empty run to begin with
    for i in range(len(words)):
        for j in range(i + 1, min(len(words), i + n_exp + max_extra) + 1):
            dist = levenshtein(" ".join(w for w, _ in words[i:j]), e)
            best = min(best, (dist, j - i, i, j))
    dist, _, i, j = best
    run = words[i:j]
    matched = " ".join(w for w, _ in run)
    conf = sum(s for _, s in run) / len(run) if run else 0.0
    cer = dist / len(e)
    return TextMatch(expected, matched, dist, len(e), cer, dist == 0, conf, (1.0 - cer) * conf)


def score_detections(detections: Sequence[Detection], expected: Sequence[str], *, min_score: float = 0.5):
    """(read text, matches, cer, cer_full, exact, legibility) for one image's OCR output."""
    kept = reading_order([d for d in detections if d.score >= min_score and d.text.strip()])
    read = " ".join(d.text.strip() for d in kept)
    words = [(w, d.score) for d in kept for w in normalize(d.text).split()]
    if not expected:
        return read, [], None, None, None, None
    matches = [_match_one(x, words) for x in expected]
    total = sum(m.length for m in matches)
    cer = sum(m.distance for m in matches) / total
    full_ref = normalize(" ".join(expected))
    cer_full = levenshtein(normalize(read), full_ref) / len(full_ref)
    legibility = sum(m.legibility * m.length for m in matches) / total
    return read, matches, cer, cer_full, all(m.exact for m in matches), legibility


def _expected_of(prompt: str | None, text) -> list[str]:
    if text is not None:
        items = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in items):
            raise TypeError(f"text must be a string or a list of strings, got {text!r}")
        return [t for t in items if normalize(t)]
    return extract_quoted(prompt) if prompt else []


def score_image(image, prompt: str | None = None, *, text=None, setting: str = "", engine=None,
                min_score: float = 0.5, thumbnail: int = 0) -> ImageResult:
    """OCR one image and score it against the prompt's quoted text (or ``text``)."""
    engine = engine or default_engine()
    img = load_image(image)
    expected = _expected_of(prompt, text)
    detections = engine(img)
    read, matches, cer, cer_full, exact, leg = score_detections(detections, expected, min_score=min_score)
    name = str(image) if isinstance(image, (str, Path)) else getattr(image, "filename", "") or "<image>"
    thumb = None
    if thumbnail:
        thumb = img.copy()
        thumb.thumbnail((thumbnail, thumbnail))
    return ImageResult(name, setting, prompt, expected, read, len(detections), matches, cer, cer_full,
                       exact, leg, thumb)


# --------------------------------------------------------------------------------- reports

@dataclass
class EvalReport:
    results: list[ImageResult]
    engine: dict
    paths: dict = field(default_factory=dict)

    @property
    def settings(self) -> list[str]:
        return list(dict.fromkeys(r.setting for r in self.results))

    def summary(self) -> dict[str, dict]:
        out = {}
        for s in self.settings:
            rs = [r for r in self.results if r.setting == s]
            scored = [r for r in rs if r.cer is not None]
            n = len(scored)
            out[s] = {
                "images": len(rs),
                "scored": n,
                "exact_match": sum(bool(r.exact) for r in scored) / n if n else None,
                "cer": sum(r.cer for r in scored) / n if n else None,
                "cer_full": sum(r.cer_full for r in scored) / n if n else None,
                "legibility": sum(r.legibility for r in scored) / n if n else None,
                "no_text": sum(1 for r in rs if r.detections == 0),
                "no_reference": len(rs) - n,
            }
        return out

    def to_dict(self) -> dict:
        return {"engine": self.engine, "definitions": DEFINITIONS, "settings": self.summary(),
                "images": [r.to_dict() for r in self.results]}

    def format(self) -> str:
        rows = [f"{'setting':<16} {'images':>6} {'exact':>6} {'CER':>6} {'legib.':>6} {'no text':>7}"]
        for s, v in self.summary().items():
            f = lambda x: "  -   " if x is None else f"{x:6.3f}"
            rows.append(f"{s:<16} {v['images']:>6} {f(v['exact_match'])} {f(v['cer'])} {f(v['legibility'])} "
                        f"{v['no_text']:>7}")
        return "\n".join(rows)


DEFINITIONS = {
    "expected": "quoted text of the prompt (\"...\", \u201c...\u201d, \u201e...\u201c, \u00ab...\u00bb, \u2018...\u2019, '...')",
    "normalisation": "NFKC, typographic quotes/dashes to ASCII, case-fold, collapse whitespace",
    "cer": "min over contiguous word runs of the reading of Levenshtein(run, expected) / len(expected); "
           "no text = 1",
    "cer_full": "Levenshtein(whole reading, expected) / len(expected)",
    "exact_match": "fraction of images whose every expected string is read exactly (cer 0)",
    "legibility": "(1 - cer) * mean recognition score of the matched boxes",
}


def _items(items) -> list[dict]:
    out = []
    for i, item in enumerate(items):
        if isinstance(item, (str, Path)):
            item = {"image": item}
        if not isinstance(item, dict) or "image" not in item:
            raise ValueError(f"item {i} must be a dict with an 'image' (and 'prompt', 'setting'), got {item!r}")
        unknown = set(item) - {"image", "prompt", "setting", "text"}
        if unknown:
            raise ValueError(f"item {i}: unknown keys {sorted(unknown)}; use image, prompt, setting, text")
        out.append(item)
    return out


def evaluate(items: Iterable, *, engine: Callable | None = None, out_dir=None, grid: bool = True,
             min_score: float = 0.5, thumbnail: int = 256, progress: bool = False) -> EvalReport:
    """Score every image and report per setting.

    items: dicts ``{"image": path or PIL image, "prompt": str, "setting": str, "text": optional
    override of the expected text}``. With ``out_dir``: writes ``ocr_eval.json`` and, when
    ``grid``, ``ocr_grid.png``. An unreadable path or a non-image file raises ImageReadError
    naming the file, before any OCR runs.
    """
    items = _items(items)
    for it in items:                      # fail early, naming the file, before any OCR runs
        check_image(it["image"])
    engine = engine or default_engine()
    from tqdm.auto import tqdm

    results = []
    for it in tqdm(items, desc="OCR", unit="img", disable=not progress):
        r = score_image(it["image"], it.get("prompt"), text=it.get("text"), setting=str(it.get("setting", "")),
                        engine=engine, min_score=min_score, thumbnail=thumbnail if grid else 0)
        r.image = str(it["image"]) if isinstance(it["image"], (str, Path)) else r.image
        results.append(r)
    describe = getattr(engine, "describe", None)
    report = EvalReport(results, describe() if describe else {"name": getattr(engine, "name", type(engine).__name__)})
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ocr_eval.json").write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
        report.paths["json"] = str(out / "ocr_eval.json")
        if grid and results:
            report.paths["grid"] = str(comparison_grid(report, out / "ocr_grid.png", cell=thumbnail))
    return report


# --------------------------------------------------------------------------------- grid

def _font(size: int):
    from PIL import ImageFont

    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        trial = f"{cur} {w}".strip()
        if draw.textlength(trial, font=font) <= width or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = w
    if cur:
        lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(1, len(lines[-1]) - 1)] + "\u2026"
    return lines


def comparison_grid(report: EvalReport, path, *, cell: int = 256) -> Path:
    """Rows = prompts (first-appearance order), columns = settings; each cell shows the image,
    its CER / exact match / legibility and what the OCR read; row labels show the expected text."""
    from PIL import Image, ImageDraw

    settings = report.settings
    prompts = list(dict.fromkeys((r.prompt or r.image) for r in report.results))
    by = {((r.prompt or r.image), r.setting): r for r in report.results}
    label_w, head_h, cap_h, pad = 220, 28, 58, 6
    W = label_w + len(settings) * (cell + pad) + pad
    H = head_h + len(prompts) * (cell + cap_h + pad) + pad
    grid = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(grid)
    f_head, f_small = _font(15), _font(12)
    for j, s in enumerate(settings):
        x = label_w + pad + j * (cell + pad)
        d.text((x + cell // 2, head_h // 2), s or "(no setting)", fill="black", font=f_head, anchor="mm")
    for i, p in enumerate(prompts):
        y = head_h + i * (cell + cap_h + pad)
        any_r = next(r for r in report.results if (r.prompt or r.image) == p)
        expected = " | ".join(any_r.expected) if any_r.expected else "(no quoted text)"
        ly = y + 4
        for line in _wrap(d, f"\u201c{expected}\u201d", f_head, label_w - 12, 3):
            d.text((6, ly), line, fill="black", font=f_head)
            ly += 18
        for line in _wrap(d, p, f_small, label_w - 12, 8):
            d.text((6, ly), line, fill=(90, 90, 90), font=f_small)
            ly += 15
        for j, s in enumerate(settings):
            x = label_w + pad + j * (cell + pad)
            r = by.get((p, s))
            if r is None:
                d.rectangle((x, y, x + cell, y + cell), fill=(230, 230, 230))
                d.text((x + cell // 2, y + cell // 2), "missing", fill="gray", font=f_small, anchor="mm")
                continue
            if r.thumbnail is not None:
                t = r.thumbnail
                grid.paste(t, (x + (cell - t.width) // 2, y + (cell - t.height) // 2))
            if r.cer is None:
                verdict, colour = "no reference", (90, 90, 90)
            else:
                verdict = f"{'EXACT' if r.exact else 'miss'}  CER {r.cer:.2f}  legib. {r.legibility:.2f}"
                colour = (0, 130, 0) if r.exact else (190, 0, 0)
            d.text((x, y + cell + 3), verdict, fill=colour, font=f_small)
            read = r.read if r.read else "(no text read)"
            for k, line in enumerate(_wrap(d, f"read: {read}", f_small, cell, 2)):
                d.text((x, y + cell + 19 + 15 * k), line, fill="black", font=f_small)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


# --------------------------------------------------------------------------------- inputs

def load_manifest(path) -> list[dict]:
    """Items from a JSON manifest: a list (or ``{"images": [...]}``) of ``{"image", "prompt",
    "setting", "text"?}``; relative image paths are resolved against the manifest's folder."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"cannot read the manifest {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    items = data.get("images") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a list of images or {{\"images\": [...]}}")
    out = []
    for item in _items(items):
        item = dict(item)
        p = Path(item["image"])
        item["image"] = str(p if p.is_absolute() else path.parent / p)
        out.append(item)
    return out


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def items_from_folders(root, prompts, settings: Sequence[str] | None = None) -> list[dict]:
    """Items from ``root/<setting>/<name>.<ext>`` (one folder per guidance setting).

    prompts: a dict from image stem to prompt, or a list of prompts indexed by the leading
    integer of the stem (``7.png``, ``007_cfg.png``). settings: the folders to use (default: all
    sub-folders, sorted). Images whose prompt cannot be found are an error naming them.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    folders = [root / s for s in settings] if settings else sorted(p for p in root.iterdir() if p.is_dir())
    items = []
    for folder in folders:
        if not folder.is_dir():
            raise ValueError(f"setting folder {folder} does not exist")
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if isinstance(prompts, dict):
                prompt = prompts.get(f.stem)
            else:
                m = re.match(r"(\d+)", f.stem)
                prompt = prompts[int(m.group(1))] if m and int(m.group(1)) < len(prompts) else None
            if prompt is None:
                raise ValueError(f"no prompt for image {f} (by stem {f.stem!r})")
            items.append({"image": str(f), "prompt": prompt, "setting": folder.name})
    return items


def main(argv: list[str] | None = None) -> int:
    """``python -m guidance_rt.eval MANIFEST.json --out DIR`` or ``--images ROOT --prompts P.json``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m guidance_rt.eval",
                                 description="OCR evaluation of quoted prompt text, per guidance setting")
    ap.add_argument("manifest", nargs="?", help="JSON list of {image, prompt, setting}")
    ap.add_argument("--images", help="folder with one sub-folder per setting (instead of a manifest)")
    ap.add_argument("--prompts", help="with --images: JSON list of prompts (by image index) or {stem: prompt}")
    ap.add_argument("--out", default="ocr-eval", help="output folder (ocr_eval.json, ocr_grid.png)")
    ap.add_argument("--min-score", type=float, default=0.5)
    ap.add_argument("--no-grid", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.images:
            if not args.prompts:
                ap.error("--images needs --prompts")
            prompts = json.loads(Path(args.prompts).read_text(encoding="utf-8"))
            items = items_from_folders(args.images, prompts)
        elif args.manifest:
            items = load_manifest(args.manifest)
        else:
            ap.error("give a manifest or --images/--prompts")
        report = evaluate(items, out_dir=args.out, grid=not args.no_grid, min_score=args.min_score,
                          progress=True)
    except (ValueError, OCRUnavailableError, OSError) as e:
        print(f"guidance-rt eval: {e}", file=sys.stderr)
        return 2
    print(report.format())
    for k, v in report.paths.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
