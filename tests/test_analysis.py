"""CSLG layer finding (guidance_rt.analysis): packed captures equal plain per-prompt forwards, a
planted difference is found, skip-mode numbers equal the sequential reference, and the outputs
(captures, ranking JSON, plot) are written."""
import json

import pytest
import torch
from safetensors import safe_open

import guidance_rt as grt
from guidance_rt import analysis as A
from guidance_rt import presets
from guidance_rt.eval import extract_quoted
from guidance_rt.families import resolve_layers
from guidance_rt.layers import UnsupportedModelError

from .conftest import model_state
from .tolerance import MODEL_ULPS, MODEL_UNIT_TOL, assert_close

PAIRS = A.load_pairs()[:3]


def plant(model, name: str, s: float = 30.0):
    """Make block `name` read the text much harder, so that the pair's text difference is
    amplified there. DiT joint attention: text keys (or, under qk-norm, their RMS-norm scale) and
    text values times s; UNet cross-attention (attn2): keys and values times s. The output
    projections are divided by s, so the residual streams keep their scale (and the captured
    cosine is scale-free), but the block's image attention output is dominated by a few text
    tokens."""
    layer = resolve_layers(model, name)[0]
    block = model.get_submodule(layer.path)
    with torch.no_grad():
        if layer.part in ("down", "mid", "up"):
            a = block.attn2
            a.to_k.weight.mul_(s)
            a.to_v.weight.mul_(s)
            outs = [a.to_out[0]]
        else:
            a = block.attn
            nk = getattr(a, "norm_added_k", None)
            if nk is not None and getattr(nk, "weight", None) is not None:
                nk.weight.mul_(s)
            else:
                a.add_k_proj.weight.mul_(s)
                a.add_k_proj.bias.mul_(s)
            a.add_v_proj.weight.mul_(s)
            a.add_v_proj.bias.mul_(s)
            outs = [a.to_out[0], a.to_add_out]
        for lin in outs:
            lin.weight.div_(s)
            lin.bias.div_(s)
    return model


# ------------------------------------------------------------------------------------ pairs

def test_shipped_pairs_differ_in_visible_text():
    pairs = A.load_pairs()
    assert len(pairs) >= 10
    for p in pairs:
        assert extract_quoted(p.positive), p.positive       # the feature: quoted visible text
        assert not extract_quoted(p.negative), p.negative
    assert A.load_pairs(A.SHIPPED_PAIRS) == pairs
    assert A.load_pairs([["a", "b"], {"positive": "c", "negative": "d"}]) == [
        A.PromptPair("a", "b"), A.PromptPair("c", "d")]


def test_bad_pairs_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot read the pairs file .*missing.json"):
        A.load_pairs(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        A.load_pairs(bad)
    bad.write_text(json.dumps({"pairs": [{"positive": "x", "other": "y"}]}))
    with pytest.raises(ValueError, match="exactly the keys 'positive' and 'negative'"):
        A.load_pairs(bad)
    bad.write_text(json.dumps([]))
    with pytest.raises(ValueError, match="non-empty list"):
        A.load_pairs(bad)


def test_pseudo_embeddings_are_deterministic_per_word():
    h1, p1 = A.pseudo_embedding("a sign that says OPEN", 10, 8, 4)
    h2, p2 = A.pseudo_embedding("a sign that says OPEN", 10, 8, 4)
    h3, p3 = A.pseudo_embedding("a sign that is blank", 10, 8, 4)
    assert torch.equal(h1, h2) and torch.equal(p1, p2)
    assert torch.equal(h1[:3], h3[:3]) and not torch.equal(h1[3], h3[3])   # shared words, shared rows
    assert torch.equal(h1[5:], h3[5:])                                      # padding
    assert not torch.equal(p1, p3)


# ------------------------------------------------------------------------------------ captures

def _reference_capture(model, prompt: str, seed: int, layer_names):
    """One plain forward of one prompt at step 0 of a 1-step run, hooking the capture sites."""
    runner = A._BareRunner(model, 1)
    kw = runner.embed([prompt])
    sched = runner._scheduler()
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    x = runner.latents([seed]) * getattr(sched, "init_noise_sigma", 1.0)
    family = runner.family.name
    ts = t.expand(1) if family == "sd3" else (t / 1000).expand(1) if family == "flux" else t.expand(1)
    if family == "unet":
        x = sched.scale_model_input(x, t)
    out, handles = {}, []
    n_img = x.shape[1]
    for layer, module, _ in A.capture_sites(model):
        if layer.name in layer_names:
            def hook(m, a, o, layer=layer):
                o = o[0] if isinstance(o, tuple) else o
                out[layer.name] = o[:, -n_img:] if layer.part == "single" else o
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x, timestep=ts, **kw, return_dict=False)
    finally:
        for h in handles:
            h.remove()
    return out


def test_packed_captures_equal_plain_forwards_per_prompt(tiny_model, tmp_path):
    """Both prompts of two pairs run as 4 rows of one forward; every statistic equals what hooks
    on a plain batch-1 forward of each prompt give (FLUX double and single blocks)."""
    model = tiny_model("tiny-flux")
    pairs = PAIRS[:2]
    state = model_state(model)
    A.find_layers(model, pairs, out_dir=tmp_path, mode="both", steps=1, seed=5, progress=False,
                  skip_layers=["1", "s1"])
    assert model_state(model) == state                  # hooks removed, nothing else touched
    names = ["0", "7", "s0", "s21"]
    with safe_open(str(tmp_path / "captures.safetensors"), "pt") as f:
        for i, pair in enumerate(pairs):
            pos = _reference_capture(model, pair.positive, 5 + i, names)
            neg = _reference_capture(model, pair.negative, 5 + i, names)
            for name in names:
                a, b = pos[name][0].double(), neg[name][0].double()
                cos = (a.flatten() @ b.flatten()) / (a.norm() * b.norm())
                assert f.get_tensor(f"step0/{name}/cos")[i].item() == pytest.approx(cos.item(), abs=MODEL_UNIT_TOL)
                assert_close(f.get_tensor(f"step0/{name}/mean_pos")[i], a.mean(0), ulps=MODEL_ULPS, scale=a.abs().max())
                assert_close(f.get_tensor(f"step0/{name}/mean_neg")[i], b.mean(0), ulps=MODEL_ULPS, scale=b.abs().max())
                tok = torch.nn.functional.cosine_similarity(a, b, dim=-1)
                assert_close(f.get_tensor(f"step0/{name}/token_cos")[i], tok, ulps=MODEL_ULPS, scale=1.0)
        # single blocks are compared on the image tokens only, like the double blocks
        assert f.get_tensor("step0/s0/token_cos").shape == f.get_tensor("step0/0/token_cos").shape


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3", "tiny-sdxl"])
def test_identical_prompts_have_cosine_one(tiny_model, name):
    """Both rows of a pair start from the same latent: identical prompts never diverge."""
    model = tiny_model(name)
    p = PAIRS[0].positive
    r = A.find_layers(model, [(p, p)], mode="cosine", steps=2, progress=False)
    assert len(r.layers) == len(A.capture_sites(model))
    for s in r.layers:
        assert s.cosine == pytest.approx(1.0, abs=MODEL_UNIT_TOL), s.layer.name
        assert s.token_cosine == pytest.approx(1.0, abs=1e-4)
    r = A.find_layers(model, PAIRS[:1], mode="cosine", steps=2, progress=False)
    assert min(s.cosine for s in r.layers) < 0.99


@pytest.mark.parametrize("name,block", [("tiny-sd3", "18"), ("tiny-flux", "2"), ("tiny-sdxl", "d12")])
def test_planted_difference_is_found(name, block):
    """A block modified to amplify the pair's text difference is the top candidate by first
    difference and by relative change (it is not among the top 3 on the unmodified model)."""
    before = A.find_layers(presets.build_model(name), PAIRS, mode="cosine", steps=1, progress=False)
    assert block not in before.top(3)
    after = A.find_layers(plant(presets.build_model(name), block), PAIRS, mode="cosine", steps=1,
                          progress=False)
    assert after.top(1) == [block]
    assert after.top(1, "relative_change") == [block]
    old = {s.layer.name: s for s in before.layers}[block]
    new = {s.layer.name: s for s in after.layers}[block]
    assert new.first_difference > 0.25
    assert new.cosine < old.cosine - 0.2


# ------------------------------------------------------------------------------------ skip mode

@pytest.mark.parametrize("name,layers", [("tiny-sd3", ["0", "7", "23"]), ("tiny-flux", ["3", "18", "s0", "s37"]),
                                         ("tiny-sdxl", ["d0", "m3", "u35"])])
def test_skip_changes_match_the_sequential_reference(tiny_model, name, layers):
    """Packed rows (cond + one skipped copy per layer, chunked) equal one plain reference forward
    per layer with that block bypassed."""
    model = tiny_model(name)
    inp = presets.example_inputs(name, batch=2)
    resolved = list(resolve_layers(model, layers))
    got = A.skip_changes(model, inp["sample"], inp["timestep"], inp["cond"], resolved, chunk=2)
    for j, layer in enumerate(resolved):
        g = grt.Guidance(grt.SLG(scale=1.0, layers=[layer.name], start=0.0, stop=1.0))
        branches = grt.reference.branch_predictions(model, g, inp["sample"], inp["timestep"], cond=inp["cond"],
                                                    step=0, num_steps=1)
        c = branches[0].prediction.double().flatten(1)
        p = branches[1].prediction.double().flatten(1)
        ref = (p - c).norm(dim=1) / c.norm(dim=1)
        assert ref.min() > 1e-3                       # skipping the block changes the prediction
        assert torch.allclose(got[j], ref, rtol=1e-4, atol=1e-6), (layer.name, got[j], ref)


def test_find_layers_skip_mode_uses_the_capture_step_inputs(tiny_model):
    """find_layers' skip scores are the reference change at the capture step's latent, per prompt."""
    model = tiny_model("tiny-flux")
    r = A.find_layers(model, PAIRS[:1], mode="skip", steps=1, seed=3, skip_layers=["2", "s4"], progress=False)
    runner = A._BareRunner(model, 1)
    pair = PAIRS[0]
    kw = runner.embed([pair.positive, pair.negative])
    x = runner.latents([3, 3])
    ts = torch.ones(2)                                      # sigma 1 at step 0 of 1 (FLUX takes t / 1000)
    scores = {s.layer.name: s for s in r.layers}
    assert scores["0"].skip_change is None and scores["2"].cosine is None
    for name in ["2", "s4"]:
        g = grt.Guidance(grt.SLG(scale=1.0, layers=[name], start=0.0, stop=1.0))
        b = grt.reference.branch_predictions(model, g, x, ts, cond=kw, step=0, num_steps=1)
        c, p = b[0].prediction.double().flatten(1), b[1].prediction.double().flatten(1)
        ref = (p - c).norm(dim=1) / c.norm(dim=1)
        assert scores[name].skip_change == pytest.approx(ref[0].item(), rel=1e-4)
        assert scores[name].skip_change_negative == pytest.approx(ref[1].item(), rel=1e-4)
    assert r.top(2, "skip_change") == sorted(["2", "s4"], key=lambda n: -scores[n].skip_change)


# ------------------------------------------------------------------------------------ outputs

def test_outputs_ranking_json_captures_and_plot(tiny_model, tmp_path):
    model = tiny_model("tiny-sd35")
    r = A.find_layers(model, PAIRS[:2], out_dir=tmp_path, steps=2, capture_steps=[0, -1], batch_pairs=1,
                      skip_chunk=12, top=4, progress=False)
    data = json.loads((tmp_path / "ranking.json").read_text())
    assert [l["name"] for l in data["layers"]] == [str(i) for i in range(24)]
    assert data["capture_steps"] == [0, 1] and data["pairs"] == 2 and data["family"] == "sd3"
    assert data["ranking_first_difference"][:4] == data["candidates"] == r.top(4)
    assert set(data["ranking_skip_change"]) == {str(i) for i in range(24)}
    first = data["layers"][0]
    assert first["first_difference"] == pytest.approx(1.0 - first["cosine"])
    for prev, cur in zip(data["layers"], data["layers"][1:]):
        assert cur["first_difference"] == pytest.approx(prev["cosine"] - cur["cosine"])
        assert cur["relative_change"] == pytest.approx(cur["first_difference"] / abs(prev["cosine"]))
        assert cur["skip_change"] > 0 and cur["skip_change_negative"] > 0
    assert data["sites"]["3"] == "transformer_blocks.3.attn.to_out.0"
    png = (tmp_path / "layers.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    with safe_open(str(tmp_path / "captures.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert {"step0/5/cos", "step1/5/cos", "step1/5/token_cos", "step1/5/mean_pos", "step1/5/skip"} <= keys
        assert f.get_tensor("step1/5/cos").shape == (2,)
        assert f.get_tensor("step1/5/skip").shape == (2, 2)
        assert json.loads(f.metadata()["layers"]) == [str(i) for i in range(24)]
        assert not any(k.endswith("/pos") for k in keys)          # full tensors only when asked
    assert (tmp_path / "captures.safetensors").stat().st_size < 200_000


def test_pipeline_captures_the_cond_rows(tmp_path):
    """A stock SD3 pipeline with CFG batches [uncond, cond]: the cond rows are captured, both
    prompts of a pair start from the same latent (identical prompts: cosine 1)."""
    pipe = presets.build_pipeline("tiny-sd3")
    p = PAIRS[0].positive
    r = A.find_layers(pipe, [(p, p), PAIRS[1]], steps=2, mode="both", skip_layers="20-23", progress=False,
                      full_captures=True, out_dir=tmp_path)
    with safe_open(str(tmp_path / "captures.safetensors"), "pt") as f:
        cos = f.get_tensor("step1/10/cos")
        assert cos[0].item() == pytest.approx(1.0, abs=MODEL_UNIT_TOL) and cos[1].item() < 0.999
        assert f.get_tensor("step1/10/pos").shape[:2] == (2, 64)           # pairs, image tokens
        skip = f.get_tensor("step1/21/skip")
        assert skip[0, 0].item() == pytest.approx(skip[0, 1].item(), rel=1e-5)
    assert r.info["input"] == "pipeline"


def test_errors(tiny_model):
    model = tiny_model("tiny-sd3")
    with pytest.raises(ValueError, match="mode must be one of"):
        A.find_layers(model, PAIRS, mode="fast")
    with pytest.raises(ValueError, match="capture step 4 is outside a 4-step run"):
        A.find_layers(model, PAIRS, capture_steps=4, progress=False)
    with pytest.raises(KeyError, match="unknown preset"):
        A.find_layers("tiny-nothing", PAIRS)
    with pytest.raises(UnsupportedModelError):
        A.find_layers(torch.nn.Linear(2, 2), PAIRS)
    with pytest.raises(ValueError, match="skip_layers: layer 99 matches no block"):
        A.find_layers(model, PAIRS, mode="skip", skip_layers=[99], progress=False)


def test_cli_layers_writes_ranking_json_and_plot(tmp_path, capsys):
    from guidance_rt import cli

    out = tmp_path / "flux"
    rc = cli.main(["layers", "--preset", "tiny-flux", "--pairs", str(A.SHIPPED_PAIRS), "--out", str(out),
                   "--steps", "1", "--skip-layers", "0-2", "--top", "3"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "top 3 by first difference" in text and "top 3 by skip change" in text
    data = json.loads((out / "ranking.json").read_text())
    assert len(data["layers"]) == 57 and data["pairs"] == len(A.load_pairs())
    assert len(data["candidates"]) == 3 and data["ranking_skip_change"] and len(data["ranking_skip_change"]) == 3
    assert (out / "layers.png").stat().st_size > 10_000 and (out / "captures.safetensors").exists()
    assert cli.main(["layers", "--preset", "tiny-nothing", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert cli.main(["layers", "--preset", "tiny-sd3", "--pairs", str(tmp_path / "none.json")]) == 2
    assert "none.json" in capsys.readouterr().err
