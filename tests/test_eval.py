"""OCR evaluation (guidance_rt.eval): quoted-text extraction, the metrics, and the real offline OCR
engine on images these tests render with PIL (clean, blurred, wrong text, no text)."""
import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from guidance_rt import eval as E

# ------------------------------------------------------------------------------ no OCR needed


@pytest.mark.parametrize("prompt,expected", [
    ('a storefront with a sign that says "OPEN"', ["OPEN"]),
    ("a mug saying \u201cCOFFEE\u201d and a cup saying \u201cTEA\u201d", ["COFFEE", "TEA"]),
    ("a cat's sign that says 'HELLO'", ["HELLO"]),          # apostrophe is not a quote
    ("the dogs' bowl says 'FOOD'", ["FOOD"]),
    ("'Joe's Diner' in neon", ["Joe's Diner"]),
    ("\u2018Joe\u2019s Diner\u2019 in neon", ["Joe\u2019s Diner"]),
    ("\u201eGuten Tag\u201c and \u00abBonjour\u00bb", ["Guten Tag", "Bonjour"]),
    ('a sign that says " Hello  World "', ["Hello  World"]),
    ('no quotes, an empty "" pair', []),
    ("it's a 'big' deal, isn't it", ["big"]),
])
def test_extract_quoted(prompt, expected):
    assert E.extract_quoted(prompt) == expected


def test_normalize_and_cer():
    assert E.normalize("  Hello\t WORLD\u2019s \u2014 ") == "hello world's -"
    assert E.levenshtein("kitten", "sitting") == 3
    assert E.char_error_rate("Hello  world", "hello world") == 0
    assert E.char_error_rate("TOFFEE", "coffee") == pytest.approx(1 / 6)
    assert E.char_error_rate("", "open") == 1
    with pytest.raises(ValueError):
        E.char_error_rate("x", "  ")


def _det(text, x, y, score=0.99, w=50, h=20):
    return E.Detection(text, score, ((x, y), (x + w, y), (x + w, y + h), (x, y + h)))


def test_scoring_reading_order_best_run_and_legibility():
    dets = [_det("World", 120, 12, 0.9), _det("Hello", 10, 10, 0.8), _det("EXIT", 10, 80, 0.95),
            _det("\u25a0", 200, 200, 0.7), _det("noise", 300, 300, 0.3)]          # below min_score
    read, matches, cer, cer_full, exact, leg = E.score_detections(dets, ["hello world", "exit"])
    assert read == "Hello World EXIT \u25a0"                      # lines top to bottom, left to right
    assert [m.exact for m in matches] == [True, True] and exact and cer == 0
    assert matches[0].confidence == pytest.approx(0.85) and matches[1].confidence == pytest.approx(0.95)
    assert leg == pytest.approx((0.85 * 11 + 0.95 * 4) / 15)
    assert cer_full > 0                                            # the whole reading has more text
    # a misspelling: best run is still found, CER counts the edits, legibility drops with it
    _, m, cer, _, exact, leg = E.score_detections([_det("HELO", 0, 0, 1.0), _det("WORLD", 60, 0, 1.0)],
                                                  ["Hello World"])
    assert not exact and cer == pytest.approx(1 / 11) and leg == pytest.approx(10 / 11)
    # nothing read: CER 1, no crash; no reference: nothing scored
    assert E.score_detections([], ["OPEN"])[2:] == (1.0, 1.0, False, 0.0)
    assert E.score_detections(dets, [])[2:] == (None, None, None, None)


def test_unreadable_path_and_non_image_are_clear_errors(tmp_path):
    with pytest.raises(E.ImageReadError, match=r"cannot read image .*missing\.png: no such file"):
        E.load_image(tmp_path / "missing.png")
    fake = tmp_path / "notes.png"
    fake.write_text("this is not an image")
    with pytest.raises(E.ImageReadError, match=r"notes\.png: not an image file"):
        E.load_image(fake)
    with pytest.raises(E.ImageReadError, match=r"cannot read image .*: it is a directory"):
        E.load_image(tmp_path)
    truncated = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), "red").save(tmp_path / "full.png")
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:60])
    with pytest.raises(E.ImageReadError, match=r"cut\.png"):
        E.load_image(truncated)
    # evaluate() checks every file before running any OCR, and names the bad one
    never_called = lambda img: pytest.fail("OCR ran on a bad input")   # noqa: E731
    with pytest.raises(E.ImageReadError, match=r"notes\.png"):
        E.evaluate([{"image": tmp_path / "full.png", "prompt": '"A"'}, {"image": fake, "prompt": '"B"'}],
                   engine=never_called)


def test_manifest_and_folders(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cslg").mkdir()
    for s in ("cfg", "cslg"):
        Image.new("RGB", (8, 8)).save(tmp_path / s / "0.png")
        Image.new("RGB", (8, 8)).save(tmp_path / s / "001_x.png")
    items = E.items_from_folders(tmp_path, ['"A"', '"B"'])
    assert [(Path(i["image"]).name, i["setting"], i["prompt"]) for i in items] == [
        ("0.png", "cfg", '"A"'), ("001_x.png", "cfg", '"B"'), ("0.png", "cslg", '"A"'), ("001_x.png", "cslg", '"B"')]
    with pytest.raises(ValueError, match="no prompt for image"):
        E.items_from_folders(tmp_path, ['"A"'])
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"images": [{"image": "cfg/0.png", "prompt": '"A"', "setting": "cfg"}]}))
    assert E.load_manifest(manifest)[0]["image"] == str(tmp_path / "cfg" / "0.png")
    manifest.write_text(json.dumps([{"img": "x.png"}]))
    with pytest.raises(ValueError, match="'image'"):
        E.load_manifest(manifest)


# ------------------------------------------------------------------------------ the real engine

FONTS = ["DejaVuSans.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Oblique.ttf",
         "DejaVuSerifCondensed.ttf", "DejaVuSans-Bold.ttf"]
TEXTS = ["OPEN", "Hello World", "COFFEE", "Jazz Night", "Route 66", "Fresh Bread", "SALE 50% OFF", "Library"]
# what the "wrong" images show instead, and the CER that reading them exactly gives
WRONG = {"OPEN": "OPEM", "Hello World": "Hello Word", "COFFEE": "TOFFEE", "Jazz Night": "Jazz Knight",
         "Route 66": "Route 99", "Fresh Bread": "Fresh Broad", "SALE 50% OFF": "SALE 30% OFF", "Library": "Liberty"}


def _font(i: int, size: int):
    try:
        return ImageFont.truetype(FONTS[i % len(FONTS)], size)
    except OSError:                       # no DejaVu on this machine: Pillow's own scalable font
        return ImageFont.load_default(size=size)


def render(text: str, i: int, *, blur: float = 0.0, size: int = 36) -> Image.Image:
    """Dark text on a light sign over a coloured background, as a generated image might show it."""
    img = Image.new("RGB", (384, 192), (70 + 20 * (i % 5), 120, 160 - 15 * (i % 4)))
    d = ImageDraw.Draw(img)
    f = _font(i, size)
    l, t, r, b = d.textbbox((0, 0), text, font=f)
    x, y = (384 - (r - l)) // 2 - l, (192 - (b - t)) // 2 - t
    d.rectangle((x + l - 14, y + t - 12, x + r + 14, y + b + 12), fill=(245, 240, 225))
    d.text((x, y), text, font=f, fill=(20, 20, 30))
    return img.filter(ImageFilter.GaussianBlur(blur)) if blur else img


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One evaluate() run over the rendered set: rows = prompts, settings clean / blurred / wrong,
    plus two images without text."""
    out = tmp_path_factory.mktemp("ocr")
    items = []
    for i, text in enumerate(TEXTS):
        prompt = f'a photo of a sign that says "{text}"'
        clean = out / f"clean_{i}.png"
        render(text, i).save(clean)
        items.append({"image": clean, "prompt": prompt, "setting": "clean"})
        items.append({"image": render(text, i, blur=2.0), "prompt": prompt, "setting": "blurred"})
        items.append({"image": render(WRONG[text], i), "prompt": prompt, "setting": "wrong"})
    blank = Image.new("RGB", (384, 192), (90, 130, 170))
    shapes = blank.copy()
    ImageDraw.Draw(shapes).ellipse((100, 40, 220, 150), fill=(240, 200, 40))
    items.append({"image": blank, "prompt": 'a blank sign that should say "EXIT"', "setting": "no text"})
    items.append({"image": shapes, "prompt": 'a yellow disc that should say "EXIT"', "setting": "no text"})
    engine = E.RapidOCREngine(threads=1)
    return E.evaluate(items, engine=engine, out_dir=out), out


def test_clean_rendered_text_is_read_exactly(report):
    rep, _ = report
    s = rep.summary()["clean"]
    print("\nOCR on the rendered set:\n" + rep.format())
    # stated tolerance: at least 7 of 8 clean images exact, mean CER <= 0.05
    assert s["images"] == 8 and s["exact_match"] >= 7 / 8 and s["cer"] <= 0.05
    for r in rep.results:
        if r.setting == "clean":
            assert r.detections >= 1 and r.legibility > 0.8 * (1 - r.cer)


def test_blurred_text_within_tolerance(report):
    rep, _ = report
    s = rep.summary()["blurred"]
    # Gaussian blur radius 2 px on 36 px text: at least 6 of 8 exact, mean CER <= 0.15
    assert s["exact_match"] >= 6 / 8 and s["cer"] <= 0.15
    assert s["legibility"] <= rep.summary()["clean"]["legibility"] + 0.02


def test_wrong_text_gives_its_edit_distance(report):
    rep, _ = report
    wrong = [r for r in rep.results if r.setting == "wrong"]
    assert not any(r.exact for r in wrong)
    for r in wrong:
        truth = E.char_error_rate(WRONG[r.expected[0]], r.expected[0])    # what an exact reading gives
        assert r.cer == pytest.approx(truth, abs=0.1), (r.expected, r.read, r.cer, truth)
        assert 0 < r.cer <= 1


def test_images_without_text_score_cer_one(report):
    rep, _ = report
    s = rep.summary()["no text"]
    assert s["images"] == 2 and s["exact_match"] == 0 and s["cer"] == 1.0 and s["legibility"] == 0.0
    blank = [r for r in rep.results if r.setting == "no text"][0]
    assert blank.detections == 0 and blank.read == "" and blank.matches[0].matched == ""


def test_json_and_grid_outputs(report):
    rep, out = report
    data = json.loads((out / "ocr_eval.json").read_text())
    assert data["engine"]["name"] == "rapidocr" and data["engine"]["models"]["Rec"].endswith(".onnx")
    assert list(data["settings"]) == ["clean", "blurred", "wrong", "no text"]
    assert len(data["images"]) == 26
    first = data["images"][0]
    assert first["image"].endswith("clean_0.png") and first["expected"] == ["OPEN"] and "thumbnail" not in first
    grid = Image.open(out / "ocr_grid.png")
    # rows = 10 distinct prompts, columns = 4 settings
    assert grid.width > 4 * 256 and grid.height > 10 * 256
    assert rep.paths == {"json": str(out / "ocr_eval.json"), "grid": str(out / "ocr_grid.png")}
