"""The guidance configurations a run measures, without any model: the standard set of a family
(standard.py's table, which the command line reads without torch, parsed here), --guidance values,
each configuration's CFG-only baseline and the order they run in (baselines first, since ratios
divide by them), the presets measured by default, and the probe step a configuration is timed at.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import spec as spec_mod
from ..guidance import Guidance
from ..methods import CFG
from ..standard import FAMILY_PRESET, STANDARD, standard_names




@dataclass
class Config:
    name: str
    guidance: Guidance
    spec: str
    standard: bool = False


def standard_configs(family: str) -> list[Config]:
    """The standard set for a family; configurations whose terms do not exist are left out."""
    out = []
    for fam, name, text in STANDARD:
        if fam != family:
            continue
        try:
            g = spec_mod.parse_spec(text)
        except spec_mod.SpecError:
            continue  # e.g. NAG / CSLG not in this build
        out.append(Config(name, g, text, True))
    if len(out) <= 1 and not any(c.guidance.terms for c in out):
        return []  # only a plain baseline: nothing guided to show
    return out


def baseline_guidance(g: Guidance) -> Guidance:
    """The CFG-only step of a configuration (no guidance at all when it has no CFG)."""
    c = g.cfg
    if c is None:
        return Guidance()
    if type(c) is CFG:
        return Guidance(c)
    return Guidance(CFG(scale=c.scale, rescale=c.rescale, start=c.start, stop=c.stop))  # SCFG -> CFG


def resolve_configs(items: list[str] | None, family: str, run_families=()) -> list[Config]:
    """--guidance values: standard names (case-insensitive) or specs / JSON / files. A standard
    name of another family the run also benches (`run_families`) is that family's, skipped here."""
    if not items:
        return standard_configs(family)
    names = {name.lower(): name for fam, name, _ in STANDARD if fam == family}
    out = []
    for item in items:
        std = [c for c in standard_configs(family) if c.name.lower() == item.strip().lower()]
        if std:
            out.append(std[0])
            continue
        if item.strip().lower() in names:
            raise ValueError(f"configuration {item!r} needs a term this build does not have")
        other = [fam for fam, name, _ in STANDARD if name.lower() == item.strip().lower()]
        if set(other) & set(run_families):
            continue
        if other:
            raise ValueError(f"{item!r} is a standard configuration of {other[0]} models, not of "
                             f"{family} ones; for {family}: {', '.join(standard_names()[family])}")
        g = spec_mod.load_guidance(item)
        out.append(Config(spec_mod.format_spec(g) or "plain", g, spec_mod.format_spec(g)))
    if not out:
        raise ValueError(f"no configuration given is one of {family} models; for {family}: "
                         f"{', '.join(standard_names()[family])}")
    return out


def ordered_configs(configs: list[Config]) -> list[Config]:
    """Each configuration's CFG-only step first (added when it is not one of them), then the rest;
    configurations with the same guidance run once."""
    out: list[Config] = []
    for c in configs:
        base = baseline_guidance(c.guidance)
        if not any(x.guidance == base for x in out):
            own = next((x for x in configs if x.guidance == base), None)
            out.append(own or Config("CFG" if base.cfg is not None else "plain", base,
                                     spec_mod.format_spec(base)))
    for c in configs:
        if not any(x.guidance == c.guidance for x in out):
            out.append(c)
    return out


def default_presets(guidance: list[str] | None) -> list[str]:
    """Without --preset: the tiny preset of every family that has standard configurations; with
    --guidance, those of the families whose own standard names were given, else tiny-sdxl."""
    if guidance:
        wanted = {g.strip().lower() for g in guidance}
        fams = [fam for fam, names in standard_names().items()
                if standard_configs(fam) and wanted & {n.lower() for n in names if n not in ("CFG", "plain")}]
        return [FAMILY_PRESET[f] for f in fams] or [FAMILY_PRESET["unet"]]
    return [preset for f, preset in FAMILY_PRESET.items() if standard_configs(f)]


def probe_step(guidance: Guidance, steps: int) -> int:
    """The first step of an N-step run (from step 1 on when possible) with the most active terms,
    past any step whose prediction is zero without a forward (CFG-Zero*'s zero-init)."""
    def active(i):
        return sum(1 for t in guidance.terms if t.in_window(i, steps))

    order = list(range(1, steps)) + [0] if steps > 1 else [0]
    cfg = guidance.cfg
    order = [i for i in order if cfg is None or not cfg.zero_prediction(i)] or order
    return max(order, key=lambda i: (active(i), -order.index(i)))
