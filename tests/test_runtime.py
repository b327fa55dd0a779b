"""The packed forward's structure: exact pass-through, one execution per block, prefix sharing,
layer addressing and clear errors that leave the model untouched."""
import pytest
import torch

import guidance_rt as grt
from guidance_rt import presets
from guidance_rt.families import enumerate_layers, resolve_layers
from guidance_rt.layers import LayerNotFoundError, UnsupportedModelError

from .conftest import model_state, rel
from .tolerance import MODEL_ULPS, assert_close

FAMILIES = ["tiny-sd15", "tiny-sdxl", "tiny-sd3", "tiny-sd35", "tiny-flux"]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("batch", [1, 3])
def test_cond_only_reproduces_model_forward(tiny_model, name, batch):
    model = tiny_model(name)
    inp = presets.example_inputs(name, batch=batch, height=16, width=24 if name != "tiny-flux" else 20)
    with torch.no_grad():
        expected = model(inp["sample"], timestep=inp["timestep"], **inp["cond"], return_dict=False)[0]
    got = grt.GuidedDenoiser(model, grt.Guidance())(inp["sample"], inp["timestep"], cond=inp["cond"],
                                                     step=0, num_steps=1)
    assert_close(got, expected, ulps=MODEL_ULPS)


def _count_ff_rows(model):
    """Rows every block's feed-forward sees per call, observed with hooks on the stock modules."""
    seen = {}
    handles = []
    for layer in enumerate_layers(model):
        block = model.get_submodule(layer.path)
        ff = block.ff if hasattr(block, "ff") else block.proj_mlp   # FLUX single blocks: proj_mlp
        handles.append(ff.register_forward_hook(
            lambda m, a, o, p=layer.position: seen.setdefault(p, []).append(a[0].shape[0])))
    return seen, handles


@pytest.mark.parametrize("name,guidance,fork,rows_after", [
    # SDXL, CFG + PAG(mid): d0-d23 run uncond+cond (2B rows), m0 onward 3B
    ("tiny-sdxl", grt.Guidance(grt.CFG(5.0), grt.PAG(layers="mid")), 24, 3),
    # SD3, CFG + SLG[7,8,9]: blocks 7-9 run only 2B rows (the SLG rows skip them), 3B after
    ("tiny-sd3", grt.Guidance(grt.CFG(4.0), grt.SLG(layers=[7, 8, 9], start=0.0)), 7, 3),
    # FLUX, no CFG, PAG on single block 4 + TPG on double 10: B rows, then 2B, then 3B
    ("tiny-flux", grt.Guidance(grt.TPG(layers=10), grt.PAG(layers="s4")), 10, 2),
])
def test_each_block_runs_once_on_the_rows_that_need_it(tiny_model, name, guidance, fork, rows_after):
    model = tiny_model(name)
    batch = 2
    inp = presets.example_inputs(name, batch=batch)
    seen, handles = _count_ff_rows(model)
    den = grt.GuidedDenoiser(model, guidance)
    den.adapter.trace = {}
    try:
        den(inp["sample"], inp["timestep"], cond=inp["cond"], uncond=inp["uncond"], step=0, num_steps=1)
    finally:
        for h in handles:
            h.remove()
    n = len(enumerate_layers(model))
    assert sorted(seen) == list(range(n))
    assert all(len(v) == 1 for v in seen.values()), "a block ran more than once in one denoiser call"
    rows = [seen[p][0] for p in range(n)]
    base = 2 * batch if guidance.cfg else batch
    assert rows[:fork] == [base] * fork
    if name == "tiny-sd3":
        assert rows[7:10] == [base] * 3 and rows[10:] == [3 * batch] * (n - 10)
    elif name == "tiny-flux":
        s4 = 19 + 4
        assert rows[fork:s4] == [2 * batch] * (s4 - fork) and rows[s4:] == [3 * batch] * (n - s4)
    else:
        assert rows[fork:] == [rows_after * batch] * (n - fork)
    assert [den.adapter.trace[p] for p in range(n)] == rows
    naive = (base + batch * len(guidance.perturbations)) * n
    assert sum(rows) < naive   # prefix sharing saved block-row executions


def test_unet_resnets_before_the_fork_run_on_base_rows_only(tiny_model):
    model = tiny_model("tiny-sdxl")
    inp = presets.example_inputs("tiny-sdxl", batch=1)
    seen = []
    handles = [r.register_forward_hook(lambda m, a, o, name=n: seen.append((name, a[0].shape[0])))
               for n, r in model.named_modules() if type(r).__name__ == "ResnetBlock2D"]
    try:
        grt.GuidedDenoiser(model, grt.Guidance(grt.CFG(5.0), grt.PAG(layers="mid")))(
            inp["sample"], inp["timestep"], cond=inp["cond"], uncond=inp["uncond"], step=0, num_steps=1)
    finally:
        for h in handles:
            h.remove()
    rows = dict(seen)
    assert len(seen) == len(rows)
    assert all(r == 2 for n, r in rows.items() if n.startswith("down_blocks") or n == "mid_block.resnets.0")
    assert all(r == 3 for n, r in rows.items() if n.startswith("up_blocks") or n == "mid_block.resnets.1")


def test_layer_addressing(tiny_model):
    sdxl = tiny_model("tiny-sdxl")
    names = [l.name for l in enumerate_layers(sdxl)]
    assert names == [f"d{i}" for i in range(24)] + [f"m{i}" for i in range(10)] + [f"u{i}" for i in range(36)]
    pick = lambda spec, m=sdxl: [l.name for l in resolve_layers(m, spec)]
    assert pick("d6-d23") == [f"d{i}" for i in range(6, 24)]
    assert pick("mid") == [f"m{i}" for i in range(10)]
    assert pick(["u3", "d4"]) == ["d4", "u3"]
    assert pick("mid_block.attentions.0") == pick("mid")
    assert pick("down_blocks.2.attentions.1.transformer_blocks.1") == ["d15"]
    assert pick("down_blocks.2.attentions.1.transformer_blocks.1.attn1") == ["d15"]
    assert pick("up_blocks.0.attentions.0.transformer_blocks.1") == ["u1"]   # not transformer_blocks.1x
    sd3 = tiny_model("tiny-sd3")
    assert pick([7, "8", "9-10"], sd3) == ["7", "8", "9", "10"]
    assert pick("transformer_blocks.1", sd3) == ["1"]      # exact: not blocks 10-19
    flux = tiny_model("tiny-flux")
    assert pick("double", flux) == [str(i) for i in range(19)]
    assert pick("single", flux) == [f"s{i}" for i in range(38)]
    assert pick(["s0-s2", 3], flux) == ["3", "s0", "s1", "s2"]
    assert pick("single_transformer_blocks.5", flux) == ["s5"]
    for bad, model in [("d24", sdxl), ("m", sdxl), ("blocks.1", sd3), (24, sd3), ("s38", flux), ("3-30", flux)]:
        with pytest.raises(LayerNotFoundError, match="valid layers"):
            resolve_layers(model, bad)


def test_bad_input_is_a_clear_error_and_model_unchanged(tiny_model):
    model = tiny_model("tiny-sdxl")
    before = model_state(model)
    inp = presets.example_inputs("tiny-sdxl", batch=2)
    with pytest.raises(LayerNotFoundError, match=r"'x3'.*valid layers: d0-d23, m0-m9, u0-u35; parts: down, mid, up"):
        grt.GuidedDenoiser(model, grt.Guidance(grt.PAG(layers="x3")))
    with pytest.raises(UnsupportedModelError, match="UNet2DConditionModel, SD3Transformer2DModel, FluxTransformer2DModel"):
        grt.GuidedDenoiser(torch.nn.Linear(2, 2), grt.Guidance())
    den = grt.GuidedDenoiser(model, grt.Guidance(grt.CFG(5.0), grt.PAG(layers="mid")))
    kw = dict(step=0, num_steps=1)
    short = {**inp["cond"], "encoder_hidden_states": inp["cond"]["encoder_hidden_states"][:1]}
    with pytest.raises(ValueError, match=r"cond\['encoder_hidden_states'\] has batch 1 but sample has batch 2"):
        den(inp["sample"], inp["timestep"], cond=short, uncond=inp["uncond"], **kw)
    with pytest.raises(ValueError, match="uncond is None"):
        den(inp["sample"], inp["timestep"], cond=inp["cond"], **kw)
    bad = inp["sample"].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        den(bad, inp["timestep"], cond=inp["cond"], uncond=inp["uncond"], **kw)
    with pytest.raises(ValueError, match="step < num_steps"):
        den(inp["sample"], inp["timestep"], cond=inp["cond"], uncond=inp["uncond"], step=3, num_steps=3)
    with pytest.raises(ValueError, match="must not exceed stop"):
        grt.SLG(start=0.5, stop=0.2)
    with pytest.raises(ValueError, match="SLG.skip must be one of"):
        grt.SLG(skip="everything")
    assert model_state(model) == before


def test_plans_are_reused_across_steps(tiny_model):
    model = tiny_model("tiny-sd3")
    inp = presets.example_inputs("tiny-sd3")
    den = grt.GuidedDenoiser(model, grt.Guidance(grt.CFG(4.0), grt.SLG(layers=[7, 8, 9], start=0.2, stop=0.6)))
    for i in range(10):
        den(inp["sample"], inp["timestep"], cond=inp["cond"], uncond=inp["uncond"], step=i, num_steps=10)
    assert len(den._plans) == 2   # with and without the SLG row
