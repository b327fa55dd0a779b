"""The guidance spec language: strings and JSON round-trip, every term type's fields are
reachable, and bad specs point at the offending token and list the valid choices."""
import dataclasses
import json
import math

import pytest

import guidance_rt as grt
from guidance_rt import spec
from guidance_rt.terms import TERM_TYPES

SPECS = [
    "cfg=5 pag=3@mid seg=3@mid:sigma=inf slg=2.8@7,8,9:0.01-0.2",
    "",
    "cfg",
    "cfg=7.5:rescale=0.7 tpg=3@d6-d23",
    "pag@mid,:beta=0.5:heads=0,1",
    "pag=2@u3-u5:adaptive_scale=0.002:0.1-0.9",
    "seg=2.5@mid_block.attentions.0:sigma=1.5",
    "slg@7:skip=attn:0-1",
    "slg=3@s3,12:skip=ff",
    "cfg=4 slg=2.8@7,8,9",
]


@pytest.mark.parametrize("text", SPECS)
def test_round_trip(text):
    g = spec.parse_spec(text)
    canonical = spec.format_spec(g)
    assert spec.parse_spec(canonical) == g
    assert spec.format_spec(spec.parse_spec(canonical)) == canonical
    assert spec.from_json(spec.to_json(g)) == g
    assert grt.Guidance.from_dict(g.to_dict()) == g
    json.loads(spec.to_json(g), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))


def test_values_and_layers():
    g = spec.parse_spec("cfg=5 pag=3@mid seg=3@mid:sigma=inf slg=2.8@7,8,9:0.01-0.2 tpg@d6-d23")
    cfg, pag, seg, slg, tpg = g.terms
    assert cfg == grt.CFG(5.0)
    assert pag == grt.PAG(3.0, layers="mid")
    assert seg.sigma == math.inf and seg.layers == "mid"
    assert slg.layers == (7, 8, 9) and all(isinstance(i, int) for i in slg.layers)
    assert (slg.start, slg.stop, slg.scale) == (0.01, 0.2, 2.8)
    assert tpg == grt.TPG(layers="d6-d23")                      # scale omitted: the default
    assert spec.parse_spec("slg@7").terms[0].layers == 7
    assert spec.parse_spec("slg@7,").terms[0].layers == (7,)      # trailing comma: a list
    assert spec.parse_spec("pag@mid:heads=0,2").terms[0].heads == (0, 2)


@pytest.mark.parametrize("name,cls", sorted(TERM_TYPES.items()))
def test_every_field_of_every_term_is_reachable(name, cls):
    """Driven by the dataclass fields: new term types (NAG, SCFG, ...) work without edits."""
    default = cls()
    assert spec.parse_spec(spec.format_spec(grt.Guidance(default))) == grt.Guidance(default)
    assert spec.parse_spec(name.lower()).terms[0] == default
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        changed = _another_value(cls, f.name, value)
        if changed is None:
            continue
        term = dataclasses.replace(default, **{f.name: changed})
        text = spec.format_spec(grt.Guidance(term))
        assert f.name in text or f.name in ("scale", "layers", "start", "stop")
        assert spec.parse_spec(text) == grt.Guidance(term), text


def _another_value(cls, name, value):
    """A valid non-default value for a field (None: none found)."""
    candidates = {"layers": ["mid", (7, 8), "s3"], "start": [0.25], "stop": [0.75]}.get(name, [])
    if isinstance(value, bool):
        candidates += [not value]
    elif isinstance(value, (int, float)) and value is not None:
        candidates += [value + 1 if isinstance(value, int) else value * 0.5 + 0.25, 2, 0.5]
    elif isinstance(value, str):
        candidates += ["paper", "attn", "ff", "code"]
    elif isinstance(value, tuple):
        candidates += [tuple(v * 0.5 + 0.5 for v in value)]
    elif value is None:
        candidates += [0.5, (0, 1), 1]
    for c in candidates:
        if c == value:
            continue
        try:
            term = dataclasses.replace(cls(), **{name: c})
        except (TypeError, ValueError):
            continue
        return getattr(term, name)
    return None


def _error(text):
    with pytest.raises(spec.SpecError) as info:
        spec.parse_spec(text)
    return str(info.value)


def _caret(message):
    """(underlined text, the line it underlines)."""
    lines = message.splitlines()
    text, marks = lines[-2][2:], lines[-1][2:]
    start = marks.index("^")
    return text[start:start + marks.count("^")]


def test_unknown_term_points_at_it_and_lists_terms():
    msg = _error("cfg=5 pgg=3@mid")
    assert "unknown guidance term 'pgg'" in msg
    assert _caret(msg) == "pgg"
    for name in ("cfg", "pag", "seg", "tpg", "slg"):
        assert name in msg.splitlines()[0]


def test_unknown_option_lists_the_terms_fields():
    msg = _error("cfg=5 seg=3@mid:sigm=2")
    assert _caret(msg) == "sigm=2"
    assert "valid options: scale, start, stop, layers, sigma" in msg


def test_invalid_values_point_at_their_option():
    assert _caret(_error("seg=3@mid:sigma=-1")) == "sigma=-1"
    assert "must be > 1/6" in _error("seg=3@mid:sigma=-1")
    assert _caret(_error("slg@7:skip=bogus")) == "skip=bogus"
    assert "'block', 'attn', 'ff'" in _error("slg@7:skip=bogus")
    msg = _error("pag=x@mid")
    assert _caret(msg) == "x" and "must be a number" in msg
    assert "must not exceed stop" in _error("slg=2@7:0.3-0.2")


@pytest.mark.parametrize("text,fragment,underlined", [
    ("cfg@mid", "cfg has no layers", "@mid"),
    ("pag@", "empty layer name", "@"),
    ("pag:0.1", "expected a window start-stop", "0.1"),
    ("seg::", "empty option", ":"),
    ("pag=3@mid:beta=0.5:beta=0.2", "beta given twice", "beta=0.2"),
    ("=3", "must start with its name", "=3"),
    ("cfg=5 pag@mid cfg=4", "at most one CFG term", "cfg=4"),
])
def test_malformed_terms(text, fragment, underlined):
    msg = _error(text)
    assert fragment in msg
    assert _caret(msg) == underlined


def test_json_forms_and_files(tmp_path):
    g = spec.parse_spec("cfg=5 seg=3@mid:sigma=inf")
    data = json.loads(spec.to_json(g))
    assert data["terms"][1]["sigma"] == "inf"
    assert spec.from_dict(data) == g
    assert spec.from_json(json.dumps(g.to_dict())) == g              # Python's Infinity
    assert spec.from_dict([{"type": "cfg", "scale": 5}, {"type": "SEG", "layers": "mid"}]) == g
    path = tmp_path / "g.json"
    path.write_text(spec.to_json(g, indent=2))
    assert spec.load_guidance(str(path)) == g
    path = tmp_path / "g.txt"
    path.write_text("cfg=5 seg=3@mid\n")
    assert spec.load_guidance(str(path)) == g
    with pytest.raises(spec.SpecError, match="unknown guidance term 'FOO'.*valid terms"):
        spec.from_dict({"terms": [{"type": "FOO"}]})
    with pytest.raises(spec.SpecError, match="SEG has no field.*'sigm'.*valid: scale"):
        spec.from_dict({"terms": [{"type": "SEG", "sigm": 2}]})
    with pytest.raises(spec.SpecError, match="guidance JSON"):
        spec.from_json("{not json")
