"""Guidance settings as data: one short string form and JSON, for the command line and files.

String form
-----------
A spec is a whitespace-separated list of terms, for example::

    cfg=5 pag=3@mid seg=3@mid:sigma=inf slg=2.8@7,8,9:0.01-0.2

Grammar (no whitespace inside a term)::

    spec    := term { WS term }            (an empty spec is no guidance at all)
    term    := NAME [ "=" NUMBER ] [ "@" LIST ] { ":" option }
    option  := WINDOW | KEY "=" LIST
    WINDOW  := NUMBER "-" NUMBER           start-stop: active iff start <= i/N < stop
    LIST    := ITEM { "," ITEM } [ "," ]   one item is a value, several (or a trailing comma)
                                           a list
    ITEM    := NUMBER | "inf" | "-inf" | "none" | "true" | "false" | WORD
    NUMBER  := an int or a decimal / exponent float (3, 2.8, .5, 1e-3)
    WORD    := any other text without whitespace, ",", ":" or "=" (layer names: mid, d6-d23,
               s3, 7-9, mid_block.attentions.0; skip kinds: attn)

- NAME is a term's spec name, ``Term.name()`` (cfg, pag, seg, tpg, slg, and every other type
  registered in ``methods.METHODS``, such as nag, scfg, apg or cfgzero for CFGZeroStar); the
  lower-case class name is read too. The grammar is driven by the terms' dataclass fields, so new
  term types work without edits here.
- ``=NUMBER`` sets ``scale`` (omitted: the term's default scale); ``@LIST`` sets ``layers`` (only
  for terms that have a ``layers`` field); KEY is any dataclass field of the term (``scale``,
  ``start``, ``stop``, ``layers``, ``sigma``, ``beta``, ``heads``, ``adaptive_scale``, ``skip``,
  ``rescale``, ``tau``, ``alpha``, ``norm``, ...). A field may be given once.
- Integers stay integers (SD3/FLUX block indices, head indices), ``inf`` is infinity (SEG's
  infinite blur), ``none`` is None (the term's or model family's default).

``format_spec(guidance)`` writes the canonical string: every term with its scale, its layers when
set, its window when it differs from the default, then every other field that differs from its
default. ``parse_spec(format_spec(g)) == g`` for every Guidance.

JSON form
---------
``Guidance.to_dict()``: ``{"terms": [{"type": "PAG", "scale": 3.0, "layers": "mid", ...}]}``.
``to_json`` writes strict JSON (infinity as the string ``"inf"``); ``from_json`` / ``from_dict``
also accept ``Infinity``, a bare list of term dicts, lower-case type names, and omitted fields
(their defaults). ``load_guidance(text)`` takes a spec string, JSON text or the path of a file
holding either.

Errors are ``SpecError`` (a ValueError) whose message shows the spec with the offending token
underlined and lists the valid choices (term names, fields of that term).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

from . import methods as _terms
from .guidance import Guidance
from .methods import Term

__all__ = ["SpecError", "parse_spec", "format_spec", "format_term", "to_json", "from_json",
           "from_dict", "to_dict", "load_guidance", "term_names", "term_class", "term_fields",
           "build_term", "format_value", "parse_value", "jsonable"]

# one way to match each number (no `\d+\.?\d*`): an ambiguous pattern backtracks quadratically
# on a long run of digits that then fails to match
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(rf"^[+-]?{_NUMBER}$")
_WINDOW = re.compile(rf"^([+-]?{_NUMBER})-({_NUMBER})$")
_SPECIAL = {"inf": math.inf, "+inf": math.inf, "-inf": -math.inf, "none": None, "true": True,
            "false": False}


class SpecError(ValueError):
    """A guidance spec that cannot be read; the message points at the offending token.
    ``reason`` is the message without the underlined spec; ``field`` the term field it is about."""

    def __init__(self, message: str, text: str | None = None, start: int = 0, end: int | None = None,
                 field: str | None = None):
        self.reason, self.text, self.start, self.end, self.field = message, text, start, end, field
        if text is not None:
            end = max(start + 1, end if end is not None else len(text))
            message = f"{message}\n  {text}\n  {' ' * start}{'^' * (end - start)}"
        super().__init__(message)


# ------------------------------------------------------------------------------------ terms

def _term_types() -> dict[str, type]:
    """spec name (Term.name()) -> term class, read from methods.METHODS at call time."""
    return {cls.name(): cls for cls in _terms.METHODS}


def term_names() -> list[str]:
    return sorted(_term_types())


def term_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def term_class(name: str, text: str | None = None, start: int = 0, end: int | None = None) -> type:
    """The term class for a (case-insensitive) spec name or class name (the JSON form's "type");
    SpecError listing the valid names."""
    types = _term_types()
    cls = types.get(name.lower()) or {c.__name__.lower(): c for c in types.values()}.get(name.lower())
    if cls is None:
        raise SpecError(f"unknown guidance term {name!r}; valid terms: {', '.join(sorted(types))}",
                        text, start, end)
    return cls


# ------------------------------------------------------------------------------------ values

def parse_value(token: str):
    """One LIST of the grammar: a scalar, or a tuple when it has a comma."""
    items = token.split(",")
    as_list = len(items) > 1
    if as_list and items[-1] == "":
        items = items[:-1]
    values = tuple(_item(i) for i in items)
    return values if as_list else values[0]


def _item(text: str):
    if text == "":
        raise ValueError("empty value")
    low = text.lower()
    if low in _SPECIAL:
        return _SPECIAL[low]
    if _INT.match(text):
        try:
            return int(text)
        except ValueError:   # beyond Python's int/str conversion limit (4300 digits)
            raise ValueError(f"an integer of {len(text)} digits is too long") from None
    if _FLOAT.match(text):
        return float(text)
    if "=" in text or "@" in text:   # the string form could not write it back
        raise ValueError(f"{text!r} is not a value (a word holds no '=' or '@')")
    return text


def format_value(value) -> str:
    """The LIST text of a field value; parse_value(format_value(v)) == v for spec values."""
    if isinstance(value, (tuple, list)):
        parts = [format_value(v) for v in value]
        return ",".join(parts) + ("," if len(parts) == 1 else "")
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if not text or re.search(r"[\s,:=@]", text) or _item(text) != text:
        raise ValueError(f"value {text!r} has no spec string form (it is empty, holds whitespace or one "
                         "of , : = @, or reads as a number or keyword)")
    return text


def _float_equal(a, b) -> bool:
    try:
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    except Exception:
        return False


# ------------------------------------------------------------------------------------ parse

def _split_terms(text: str):
    for m in re.finditer(r"\S+", text):
        yield m.group(0), m.start()


# what a term constructor raises for a bad value (a 400-digit scale: OverflowError in float())
_BAD_VALUE = (TypeError, ValueError, OverflowError, RecursionError)


def build_term(cls: type, values: dict) -> Term:
    """``cls(**values)``. Any error a bad value causes becomes a SpecError whose ``field`` is
    the field it is about, named in the message also when the term's own message does not name
    it (``'int' object is not iterable``, ``int too large to convert to float``)."""
    try:
        return cls(**values)
    except _BAD_VALUE as e:
        message = str(e) or type(e).__name__
        for key in values:
            if re.search(rf"\b{re.escape(key)}\b", message):
                raise SpecError(message, field=key) from None
        for key, value in values.items():   # the field whose value fails on its own
            try:
                cls(**{key: value})
            except _BAD_VALUE:
                raise SpecError(f"{key}: {message} ({_field_hint(cls, key, value)})", field=key) from None
        raise SpecError(message) from None


def _field_hint(cls: type, key: str, value) -> str:
    """The field's default, and for a list field given one value, how to write a list."""
    f = term_fields(cls)[key]
    hint = f"default {key}={format_value(_default(f))}"
    # the annotation as written ("tuple | None"): reading it needs no evaluation
    if "tuple" in str(f.type) and not isinstance(value, (tuple, list)):
        hint += f"; it takes a list: {key}=a,b or, for one item, {key}=a,"
    return hint


def _parse_term(token: str, offset: int, text: str) -> Term:
    # NAME [=NUMBER] [@LIST] {:option}
    head, *options = token.split(":")
    name, layers_text, layers_at = head, None, None
    if "@" in head:
        name, layers_text = head.split("@", 1)
        layers_at = offset + len(name) + 1
    scale_text = None
    if "=" in name:
        name, scale_text = name.split("=", 1)
    if not name:
        raise SpecError("a term must start with its name (e.g. cfg=5, pag=3@mid)", text, offset,
                        offset + len(token))
    cls = term_class(name, text, offset, offset + len(name))
    fields = term_fields(cls)
    values: dict[str, Any] = {}
    spans: dict[str, tuple[int, int]] = {}

    def known(key, start, end):
        if key not in fields:
            raise SpecError(f"{name} has no option {key!r}; valid options: {', '.join(fields)}",
                            text, start, end)
        if key in values:
            raise SpecError(f"{name}: {key} given twice", text, start, end)

    def parsed(raw, key, start, end):
        known(key, start, end)
        try:
            return parse_value(raw)
        except ValueError as e:
            raise SpecError(f"{name}: {key}: {e}", text, start, end, key) from None

    def put(key, value, start, end):
        known(key, start, end)
        values[key] = value
        spans[key] = (start, end)

    if scale_text is not None:
        start = offset + len(name) + 1
        try:
            scale = _item(scale_text)
        except ValueError:
            scale = None
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise SpecError(f"{name}: the scale after '=' must be a number, got {scale_text!r}",
                            text, start, start + max(1, len(scale_text)))
        put("scale", scale, start, start + len(scale_text))
    if layers_text is not None:
        end = layers_at + len(layers_text)
        if "layers" not in fields:
            raise SpecError(f"{name} has no layers (only {', '.join(n for n, c in sorted(_term_types().items()) if 'layers' in term_fields(c))} do)",
                            text, layers_at - 1, end)
        if not layers_text or any(not p for p in layers_text.rstrip(",").split(",")):
            raise SpecError(f"{name}: empty layer name after '@' (e.g. @mid, @7,8,9, @d6-d23)",
                            text, layers_at - 1, end)
        put("layers", parsed(layers_text, "layers", layers_at, end), layers_at, end)

    pos = offset + len(head)
    for opt in options:
        start = pos + 1
        end = start + len(opt)
        pos = end
        if not opt:
            raise SpecError(f"{name}: empty option after ':' (options: start-stop or key=value)",
                            text, start - 1, start)
        if "=" in opt:
            key, raw = opt.split("=", 1)
            if not raw:
                raise SpecError(f"{name}: no value for {key!r}", text, start, end)
            put(key, parsed(raw, key, start, end), start, end)
            continue
        m = _WINDOW.match(opt)
        if not m:
            raise SpecError(f"{name}: cannot read option {opt!r}; expected a window start-stop "
                            f"(e.g. 0.01-0.2) or key=value with key one of: {', '.join(fields)}",
                            text, start, end)
        put("start", float(m.group(1)), start, start + len(m.group(1)))
        put("stop", float(m.group(2)), end - len(m.group(2)), end)
    try:
        return build_term(cls, values)
    except SpecError as e:
        start, end = spans.get(e.field, (offset, offset + len(token)))
        raise SpecError(f"{name}: {e.reason}", text, start, end, e.field) from None


def parse_spec(text: str) -> Guidance:
    """A Guidance from the string form (see the module docstring for the grammar)."""
    if not isinstance(text, str):
        raise TypeError(f"a guidance spec is a string, got {type(text).__name__}")
    tokens = list(_split_terms(text))
    terms = [_parse_term(tok, off, text) for tok, off in tokens]
    try:
        return Guidance(*terms)
    except (TypeError, ValueError) as e:
        # "at most one CFG term (...)": underline the second term of the types the message names
        start, end = 0, len(text)
        named = [i for i, t in enumerate(terms) if re.search(rf"\b{type(t).__name__}\b", str(e))]
        if len(named) > 1:
            tok, start = tokens[named[1]]
            end = start + len(tok)
        raise SpecError(str(e), text, start, end) from None


# ------------------------------------------------------------------------------------ format

def format_term(term: Term) -> str:
    cls = type(term)
    fields = term_fields(cls)
    out = f"{cls.name()}={format_value(term.scale)}"
    if "layers" in fields and term.layers is not None:
        out += "@" + format_value(term.layers)
    start_f, stop_f = fields.get("start"), fields.get("stop")
    if start_f and stop_f and not (_float_equal(term.start, _default(start_f))
                                   and _float_equal(term.stop, _default(stop_f))):
        out += f":{format_value(term.start)}-{format_value(term.stop)}"
    for key, f in fields.items():
        if key in ("scale", "layers", "start", "stop"):
            continue
        value = getattr(term, key)
        default = _default(f)
        if default is not dataclasses.MISSING and _float_equal(value, default):
            continue
        out += f":{key}={format_value(value)}"
    return out


def format_spec(guidance: Guidance) -> str:
    """The canonical string form of a Guidance (parse_spec(format_spec(g)) == g)."""
    return " ".join(format_term(t) for t in guidance.terms)


# ------------------------------------------------------------------------------------ JSON

def jsonable(value):
    """Strict-JSON form of term values: infinities as "inf" strings, tuples as lists."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


def to_dict(guidance: Guidance) -> dict:
    """Guidance.to_dict() with infinities as the string "inf" (strict JSON)."""
    return jsonable(guidance.to_dict())


def to_json(guidance: Guidance, indent: int | None = None) -> str:
    return json.dumps(to_dict(guidance), indent=indent, allow_nan=False)


def _from_json_value(value):
    if isinstance(value, str) and value.lower() in ("inf", "+inf", "infinity", "-inf", "-infinity"):
        return -math.inf if value.startswith("-") else math.inf
    if isinstance(value, list):
        return tuple(_from_json_value(v) for v in value)
    return value


def from_dict(data) -> Guidance:
    """A Guidance from Guidance.to_dict()'s form (or a bare list of term dicts); lenient about
    the type's case, "inf" strings and omitted fields; unknown types / fields list the valid ones."""
    if isinstance(data, dict):
        if set(data) - {"terms"}:
            raise SpecError(f"guidance JSON: unknown keys {sorted(set(data) - {'terms'})}; expected "
                            '{"terms": [{"type": "CFG", "scale": 5.0}, ...]}')
        data = data.get("terms", [])
    if not isinstance(data, list):
        raise SpecError('guidance JSON must be {"terms": [...]} or a list of term objects')
    out = []
    for i, d in enumerate(data):
        if not isinstance(d, dict) or "type" not in d:
            raise SpecError(f"guidance JSON: term {i} must be an object with a \"type\" "
                            f"(one of {', '.join(sorted(_terms.TERM_TYPES))})")
        d = dict(d)
        cls = term_class(str(d.pop("type")))
        fields = term_fields(cls)
        unknown = [k for k in d if k not in fields]
        if unknown:
            raise SpecError(f"guidance JSON: {cls.__name__} has no field(s) {unknown}; valid: "
                            f"{', '.join(fields)}")
        where = f"guidance JSON: term {i} ({cls.__name__})"
        try:
            values = {k: _from_json_value(v) for k, v in d.items()}
        except RecursionError:
            raise SpecError(f"{where}: a value is nested too deeply") from None
        try:
            out.append(build_term(cls, values))
        except SpecError as e:
            raise SpecError(f"{where}: {e.reason}", field=e.field) from None
    try:
        return Guidance(*out)
    except (TypeError, ValueError) as e:
        raise SpecError(f"guidance JSON: {e}") from None


def from_json(text: str) -> Guidance:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"guidance JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise SpecError("guidance JSON: nested too deeply") from None
    except ValueError as e:   # an integer beyond Python's 4300-digit conversion limit
        raise SpecError(f"guidance JSON: {e}") from None
    return from_dict(data)


def load_guidance(value: str | Guidance | dict | None) -> Guidance:
    """A Guidance from a spec string, JSON text, the path of a file holding either, a dict, or a
    Guidance (returned as it is)."""
    if value is None:
        return Guidance()
    if isinstance(value, Guidance):
        return value
    if isinstance(value, (dict, list)):
        return from_dict(value)
    text = value.strip()
    path = os.path.expanduser(text)
    if text and not text.startswith(("{", "[")) and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise SpecError(f"cannot read the guidance file {text}: {e}") from None
    if text.startswith(("{", "[")):
        return from_json(text)
    return parse_spec(text)
