"""The seams: a method is one class the runtime asks, a family one Adapter it asks. A method
defined here, outside the package, runs in the packed forward with no edit to the runtime."""
from dataclasses import dataclass

import pytest

import guidance_rt as grt
from guidance_rt import presets, spec
from guidance_rt.effects import AttnVariant, Effect
from guidance_rt.families import FAMILIES
from guidance_rt.methods import METHODS, PerturbationTerm

from .tolerance import assert_close


@dataclass(frozen=True)
class HalfIdentity(PerturbationTerm):
    """A new perturbation built from an existing mechanism: half of PAG's map on head 0."""

    def effect(self):
        return Effect(attention=AttnVariant(pag=0.5, heads=(0,)))


@dataclass(frozen=True)
class WrittenCFG(grt.CFG):
    """CFG's formula written out, so the combine takes the path of non-linear formulas."""

    linear = False

    def guide(self, u, c, w, *, step, state):
        state["calls"] = state.get("calls", 0) + 1
        return c + (w - 1) * (c - u)


def _step(model, name, terms, step=0, den=None):
    inp = presets.example_inputs(name, batch=2, height=8, width=8, seed=1)
    den = den or grt.GuidedDenoiser(model, grt.Guidance(*terms))
    return den(inp["sample"], inp["timestep"], cond=inp["cond"], uncond=inp["uncond"], step=step,
               num_steps=3), den


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sd3"])
def test_a_method_defined_outside_the_package_runs_packed(tiny_model, name):
    model = tiny_model(name)
    layers = "u3" if name == "tiny-sd15" else 2   # u3: a 4x4 token grid at this size
    new, _ = _step(model, name, [grt.CFG(4.0), HalfIdentity(scale=2.0, layers=layers)])
    builtin, _ = _step(model, name, [grt.CFG(4.0), grt.PAG(scale=2.0, beta=0.5, heads=[0], layers=layers)])
    plain, _ = _step(model, name, [grt.CFG(4.0)])
    assert_close(new, builtin, effect=builtin - plain)


def test_a_non_linear_formula_equals_the_fused_one_and_keeps_state(tiny_model):
    model = tiny_model("tiny-sd15")
    fused, _ = _step(model, "tiny-sd15", [grt.CFG(4.0), grt.SEG(layers="u3")])
    written, den = _step(model, "tiny-sd15", [WrittenCFG(4.0), grt.SEG(layers="u3")])
    plain, _ = _step(model, "tiny-sd15", [grt.SEG(layers="u3")])
    assert_close(written, fused, effect=fused - plain)
    _step(model, "tiny-sd15", None, step=1, den=den)
    assert den._state == {"calls": 2}
    _step(model, "tiny-sd15", None, step=0, den=den)   # a new run starts with a fresh state
    assert den._state == {"calls": 1}


def test_every_registered_method_has_a_spec_name_and_every_family_its_defaults():
    names = [cls.name() for cls in METHODS]
    assert len(set(names)) == len(names)
    for cls in METHODS:
        assert type(spec.parse_spec(cls.name()).terms[0]) is cls
    roles = {cls.layer_role for cls in METHODS if issubclass(cls, PerturbationTerm)}
    for family in FAMILIES.values():
        assert family.classes and family.pipelines and family.title
        assert roles <= set(family.default_layers), f"{family.name} lacks default layers for {roles}"
