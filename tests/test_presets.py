"""Model presets: topology, numerics, inputs, determinism, save/load and tiny stock pipelines."""
from __future__ import annotations

import pytest
import torch

from guidance_rt import presets as P

TINY = ["tiny-sd15", "tiny-sdxl", "tiny-sd3", "tiny-sd35", "tiny-flux"]
FULL = ["sd15", "sdxl", "sd3-medium", "sd35-medium", "sd35-large", "flux-dev"]
# the full preset each tiny one must share its topology with
TWIN = {"tiny-sd15": "sd15", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3-medium",
        "tiny-sd35": "sd35-medium", "tiny-flux": "flux-dev"}

_models: dict[str, torch.nn.Module] = {}


def tiny(name: str) -> torch.nn.Module:
    """Tiny models are read-only in these tests, so build each once."""
    if name not in _models:
        _models[name] = P.build_model(name)
    return _models[name]


def run(model, x, branch="cond"):
    with torch.no_grad():
        return model(x["sample"], timestep=x["timestep"], **x[branch]).sample


def unet_blocks(model) -> list[str]:
    """Module paths of every BasicTransformerBlock, in module order."""
    return [n for n, m in model.named_modules() if type(m).__name__ == "BasicTransformerBlock"]


def split_parts(paths):
    """(down, mid, up) block counts. Each part is one contiguous run; note that UNet2DConditionModel
    registers up_blocks before mid_block, so module order is down, up, mid (not execution order)."""
    parts = [p.split(".")[0] for p in paths]
    runs = [p for i, p in enumerate(parts) if i == 0 or parts[i - 1] != p]
    assert sorted(runs) == ["down_blocks", "mid_block", "up_blocks"]
    return parts.count("down_blocks"), parts.count("mid_block"), parts.count("up_blocks")


def execution_order(paths):
    """Block paths in execution order: down, mid, up."""
    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(paths, key=lambda p: rank[p.split(".")[0]])  # stable: module order within a part


# --- topology ---------------------------------------------------------------------------------

def test_tiny_sdxl_has_sdxl_transformer_blocks():
    paths = unet_blocks(tiny("tiny-sdxl"))
    assert split_parts(paths) == (24, 10, 36)
    paths = execution_order(paths)
    # d0-d1 at level 1 (one layer each), d4.. at level 2 (ten each); mid has ten
    assert paths[0] == "down_blocks.1.attentions.0.transformer_blocks.0"
    assert paths[4] == "down_blocks.2.attentions.0.transformer_blocks.0"
    assert paths[24] == "mid_block.attentions.0.transformer_blocks.0"
    assert paths[33] == "mid_block.attentions.0.transformer_blocks.9"
    assert paths[-1] == "up_blocks.1.attentions.2.transformer_blocks.1"


def test_tiny_sd15_has_sd15_transformer_blocks():
    assert split_parts(unet_blocks(tiny("tiny-sd15"))) == (6, 1, 9)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd35"])
def test_sd3_topology(name):
    m = tiny(name)
    assert len(m.transformer_blocks) == 24
    assert m.config.patch_size == 2
    dual = [i for i, b in enumerate(m.transformer_blocks) if b.use_dual_attention]
    qk = {type(b.attn.norm_q).__name__ for b in m.transformer_blocks}
    if name == "tiny-sd35":
        assert dual == list(range(13))
        assert qk == {"RMSNorm"}
    else:
        assert dual == [] and qk == {"NoneType"}
    assert [b.context_pre_only for b in m.transformer_blocks] == [False] * 23 + [True]


def test_flux_topology():
    m = tiny("tiny-flux")
    assert len(m.transformer_blocks) == 19 and len(m.single_transformer_blocks) == 38
    assert m.config.guidance_embeds and hasattr(m.time_text_embed, "guidance_embedder")
    assert sum(m.config.axes_dims_rope) == m.config.attention_head_dim


@pytest.mark.parametrize("name", TINY)
def test_tiny_differs_from_full_only_in_widths(name):
    small, full = P.PRESETS[name], P.PRESETS[TWIN[name]]
    assert small.tiny and not full.tiny and small.family == full.family
    assert small.model_class == full.model_class
    widths = {"sample_size", "block_out_channels", "attention_head_dim", "num_attention_heads",
              "cross_attention_dim", "norm_num_groups", "addition_time_embed_dim",
              "projection_class_embeddings_input_dim", "joint_attention_dim", "caption_projection_dim",
              "pooled_projection_dim", "pos_embed_max_size", "axes_dims_rope"}
    assert set(small.config) == set(full.config)
    for k in set(full.config) - widths:
        assert small.config[k] == full.config[k], k
    # and the built modules have the same block structure
    a, b = tiny(name), P.build_model(TWIN[name], device="meta")
    assert [type(m).__name__ for m in a.modules()] == [type(m).__name__ for m in b.modules()]


# --- full-size configs on the meta device -----------------------------------------------------

def _params(m):
    return sum(p.numel() for p in m.parameters())


def test_full_unets_on_meta():
    sd15 = P.build_model("sd15", device="meta", dtype=torch.float16)
    assert next(sd15.parameters()).device.type == "meta"
    assert next(sd15.parameters()).dtype == torch.float16
    assert split_parts(unet_blocks(sd15)) == (6, 1, 9)
    assert tuple(sd15.config.block_out_channels) == (320, 640, 1280, 1280)
    first = sd15.get_submodule(unet_blocks(sd15)[0]).attn1
    assert (first.heads, first.inner_dim // first.heads) == (8, 40)
    assert _params(sd15) == pytest.approx(859.5e6, rel=0.01)

    sdxl = P.build_model("sdxl", device="meta")
    paths = execution_order(unet_blocks(sdxl))
    assert split_parts(paths) == (24, 10, 36)
    heads = [(sdxl.get_submodule(p).attn1.heads, sdxl.get_submodule(p).attn1.inner_dim) for p in paths]
    assert heads[0] == (10, 640) and heads[4] == (20, 1280) and heads[24] == (20, 1280)
    assert sdxl.get_submodule(paths[0]).attn2.to_k.in_features == 2048
    assert sdxl.add_embedding.linear_1.in_features == 2816
    assert _params(sdxl) == pytest.approx(2.567e9, rel=0.01)


def test_full_transformers_on_meta():
    sd3 = P.build_model("sd3-medium", device="meta")
    assert len(sd3.transformer_blocks) == 24 and sd3.inner_dim == 1536
    assert sd3.transformer_blocks[0].attn.heads == 24
    assert sd3.context_embedder.in_features == 4096
    assert _params(sd3) == pytest.approx(2.03e9, rel=0.01)

    sd35 = P.build_model("sd35-medium", device="meta")
    assert [i for i, b in enumerate(sd35.transformer_blocks) if b.use_dual_attention] == list(range(13))
    assert type(sd35.transformer_blocks[20].attn.norm_q).__name__ == "RMSNorm"
    assert len(sd35.transformer_blocks) == 24 and sd35.inner_dim == 1536

    large = P.build_model("sd35-large", device="meta")
    assert len(large.transformer_blocks) == 38 and large.inner_dim == 2432
    assert _params(large) == pytest.approx(8.06e9, rel=0.01)

    flux = P.build_model("flux-dev", device="meta", dtype=torch.bfloat16)
    assert len(flux.transformer_blocks) == 19 and len(flux.single_transformer_blocks) == 38
    assert flux.inner_dim == 3072 and flux.transformer_blocks[0].attn.heads == 24
    assert flux.config.guidance_embeds and flux.x_embedder.in_features == 64
    assert _params(flux) == pytest.approx(11.9e9, rel=0.01)


# --- numerics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("hw", [(16, 16), (16, 24)])
def test_tiny_forward_is_finite_and_sane(name, batch, hw):
    model = tiny(name)
    x = P.example_inputs(name, batch=batch, height=hw[0], width=hw[1])
    out = run(model, x)
    assert out.shape == x["sample"].shape
    assert torch.isfinite(out).all()
    assert 0.1 < out.std().item() < 10
    # conditioning matters: another branch's text gives another prediction
    assert (out - run(model, x, "uncond")).abs().mean() > 0.05 * out.abs().mean()


def _zero_attention(module, args, output):
    if isinstance(output, tuple):
        return tuple(None if o is None else torch.zeros_like(o) for o in output)
    return torch.zeros_like(output)


LAYERS = {  # a few blocks in each part; every one must be live (no zero gate hides it)
    "tiny-sd15": ["down_blocks.0.attentions.0.transformer_blocks.0.attn1",
                  "mid_block.attentions.0.transformer_blocks.0.attn1",
                  "up_blocks.3.attentions.2.transformer_blocks.0.attn1"],
    "tiny-sdxl": ["down_blocks.1.attentions.0.transformer_blocks.0.attn1",
                  "mid_block.attentions.0.transformer_blocks.9.attn1",
                  "up_blocks.0.attentions.2.transformer_blocks.9.attn1"],
    "tiny-sd3": ["transformer_blocks.0.attn", "transformer_blocks.12.attn", "transformer_blocks.23.attn"],
    "tiny-sd35": ["transformer_blocks.0.attn2", "transformer_blocks.23.attn"],
    "tiny-flux": ["transformer_blocks.0.attn", "transformer_blocks.18.attn",
                  "single_transformer_blocks.0.attn", "single_transformer_blocks.37.attn"],
}


@pytest.mark.parametrize("name", TINY)
def test_every_probed_attention_changes_the_output(name):
    model = tiny(name)
    x = P.example_inputs(name)
    base = run(model, x)
    for path in LAYERS[name]:
        handle = model.get_submodule(path).register_forward_hook(_zero_attention)
        try:
            out = run(model, x)
        finally:
            handle.remove()
        assert (out - base).abs().mean() > 1e-3 * base.abs().mean(), path


def test_build_model_is_deterministic_and_redraws_every_parameter():
    a = P.build_model("tiny-sd35", seed=3)
    b = P.build_model("tiny-sd35", seed=3)
    c = P.build_model("tiny-sd35", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["proj_out.weight"], sc["proj_out.weight"])
    for n, p in a.named_parameters():
        assert (p != 0).all() and (p.numel() == 1 or p.std() > 0), n
    # diffusers zero-initialises adaLN / output layers; ours must not be zero
    assert a.transformer_blocks[5].norm1.linear.weight.abs().mean() > 1e-2
    # building does not move the caller's random stream
    torch.manual_seed(0)
    ref = torch.rand(3)
    torch.manual_seed(0)
    P.build_model("tiny-sd15")
    assert torch.equal(torch.rand(3), ref)


def test_build_model_dtype():
    m = P.build_model("tiny-sd3", dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    ref = P.build_model("tiny-sd3")
    x = P.example_inputs("tiny-sd3", dtype=torch.bfloat16)
    assert torch.isfinite(run(m, x)).all()
    assert torch.allclose(m.proj_out.weight.float(), ref.proj_out.weight, atol=1e-2)


# --- inputs -----------------------------------------------------------------------------------

def test_example_inputs_unet():
    x = P.example_inputs("tiny-sdxl", batch=2, height=16, width=24)
    assert set(x) == {"sample", "timestep", "cond", "uncond", "negative", "height", "width"}
    assert x["sample"].shape == (2, 4, 16, 24) and (x["height"], x["width"]) == (16, 24)
    assert x["timestep"].dtype == torch.long and x["timestep"].tolist() == [500, 500]
    c = x["cond"]
    assert c["encoder_hidden_states"].shape == (2, 77, 32)
    assert c["added_cond_kwargs"]["text_embeds"].shape == (2, 16)
    assert c["added_cond_kwargs"]["time_ids"].tolist() == [[128, 192, 0, 0, 128, 192]] * 2
    assert not torch.equal(c["encoder_hidden_states"], x["uncond"]["encoder_hidden_states"])
    assert not torch.equal(x["uncond"]["added_cond_kwargs"]["text_embeds"],
                           x["negative"]["added_cond_kwargs"]["text_embeds"])
    sd15 = P.example_inputs("tiny-sd15")
    assert set(sd15["cond"]) == {"encoder_hidden_states"} and sd15["sample"].shape == (1, 4, 16, 16)
    # deterministic per seed
    y = P.example_inputs("tiny-sdxl", batch=2, height=16, width=24)
    assert torch.equal(x["negative"]["encoder_hidden_states"], y["negative"]["encoder_hidden_states"])
    assert not torch.equal(x["sample"], P.example_inputs("tiny-sdxl", batch=2, height=16, width=24,
                                                         seed=1)["sample"])


def test_example_inputs_sd3_and_flux():
    x = P.example_inputs("tiny-sd35", batch=2, width=24, t=0.25)
    assert x["sample"].shape == (2, 16, 16, 24)
    assert x["timestep"].dtype == torch.float32 and x["timestep"].tolist() == [250.0, 250.0]
    assert set(x["cond"]) == {"encoder_hidden_states", "pooled_projections"}
    assert x["cond"]["encoder_hidden_states"].shape[::2] == (2, 32)
    assert x["cond"]["pooled_projections"].shape == (2, 32)
    with pytest.raises(ValueError):
        P.example_inputs("tiny-sd3", height=15)

    f = P.example_inputs("tiny-flux", batch=2, height=16, width=24, text_len=10)
    assert f["sample"].shape == (2, 8 * 12, 64) and (f["height"], f["width"]) == (16, 24)
    assert f["timestep"].tolist() == [0.5, 0.5]
    c = f["cond"]
    assert set(c) == {"encoder_hidden_states", "pooled_projections", "txt_ids", "img_ids", "guidance"}
    assert c["encoder_hidden_states"].shape == (2, 10, 32) and c["pooled_projections"].shape == (2, 16)
    assert c["txt_ids"].shape == (10, 3) and c["img_ids"].shape == (96, 3)
    assert c["guidance"].tolist() == [3.5, 3.5]


def test_flux_packing_matches_flux_pipeline():
    from diffusers import FluxPipeline

    lat = torch.randn(2, 16, 16, 24)
    packed = P.pack_flux_latents(lat)
    assert torch.equal(packed, FluxPipeline._pack_latents(lat, 2, 16, 16, 24))
    assert torch.equal(P.unpack_flux_latents(packed, 16, 24), lat)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 16 * 8, 24 * 8, 8), lat)
    assert torch.equal(P.flux_image_ids(16, 24),
                       FluxPipeline._prepare_latent_image_ids(2, 8, 12, "cpu", torch.float32))


def test_example_inputs_from_a_model_and_devices():
    model = tiny("tiny-flux")
    a, b = P.example_inputs(model, batch=2), P.example_inputs("tiny-flux", batch=2)
    assert torch.equal(a["sample"], b["sample"])
    assert torch.equal(a["cond"]["encoder_hidden_states"], b["cond"]["encoder_hidden_states"])
    meta = P.example_inputs("sdxl", device="meta", dtype=torch.float16)
    assert meta["sample"].shape == (1, 4, 128, 128) and meta["sample"].device.type == "meta"
    assert meta["cond"]["encoder_hidden_states"].shape == (1, 77, 2048)
    assert meta["cond"]["added_cond_kwargs"]["text_embeds"].shape == (1, 1280)
    assert P.example_inputs("flux-dev")["cond"]["encoder_hidden_states"].shape == (1, 512, 4096)
    assert P.example_inputs("sd3-medium")["cond"]["encoder_hidden_states"].shape == (1, 333, 4096)


# --- save / load ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_save_and_reload_round_trips(name, tmp_path):
    model = tiny(name)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    x = P.example_inputs(loaded, batch=2, width=24)  # the preset is recognised from the config
    assert x["width"] == 24 and torch.equal(x["sample"], P.example_inputs(name, batch=2, width=24)["sample"])
    assert torch.equal(run(model, x), run(loaded, x))


# --- tiny stock pipelines ---------------------------------------------------------------------

def _call(pipe, controlnet=False, **kw):
    if controlnet:
        n = len(kw["prompt"]) if isinstance(kw.get("prompt"), list) else 1
        kw.setdefault("image", torch.rand(n, 3, kw.get("height", 128), kw.get("width", 128),
                                          generator=torch.Generator().manual_seed(1)))
    return pipe(num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kw).images


@pytest.mark.parametrize("name", TINY)
def test_tiny_pipeline_runs(name):
    pipe = P.build_pipeline(name)
    lat = _call(pipe, prompt=["a cat", "a photo of a dog"], negative_prompt=["blurry", "low quality"],
                height=128, width=192, output_type="latent")
    if name == "tiny-flux":
        assert lat.shape == (2, 8 * 12, 64)
    else:
        assert lat.shape == (2, P.PRESETS[name].latent_channels, 16, 24)
    assert torch.isfinite(lat).all() and lat.std() > 0
    img = _call(pipe, prompt="a cat", output_type="pt")  # default size: 8 x the preset latent
    assert img.shape == (1, 3, 128, 128) and torch.isfinite(img).all()


def test_tiny_sdxl_lora_changes_the_output():
    pytest.importorskip("peft")
    base = _call(P.build_pipeline("tiny-sdxl"), prompt="a cat", output_type="latent")
    pipe = P.build_pipeline("tiny-sdxl", lora=True)
    assert "tiny-lora" in pipe.unet.peft_config
    with_lora = _call(pipe, prompt="a cat", output_type="latent")
    assert torch.isfinite(with_lora).all()
    assert (with_lora - base).abs().mean() > 1e-3 * base.abs().mean()


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_transformer_lora_runs(name):
    pytest.importorskip("peft")
    pipe = P.build_pipeline(name, lora=True)
    assert "tiny-lora" in pipe.transformer.peft_config
    assert torch.isfinite(_call(pipe, prompt="a cat", output_type="latent")).all()


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd15"])
def test_tiny_controlnet_pipeline(name):
    pipe = P.build_pipeline(name, controlnet=True)
    assert type(pipe).__name__.endswith("ControlNetPipeline")
    a = _call(pipe, True, prompt=["a cat", "a dog"], negative_prompt=["x", "y"], height=128, width=192,
              output_type="latent")
    assert a.shape == (2, 4, 16, 24) and torch.isfinite(a).all()
    b = _call(pipe, True, prompt=["a cat", "a dog"], negative_prompt=["x", "y"], height=128, width=192,
              output_type="latent", image=torch.zeros(2, 3, 128, 192))
    assert (a - b).abs().mean() > 1e-3 * a.abs().mean()  # the control image is live


def test_build_pipeline_rejects_what_it_does_not_build():
    with pytest.raises(ValueError):
        P.build_pipeline("sdxl")
    with pytest.raises(ValueError):
        P.build_pipeline("tiny-flux", controlnet=True)
    with pytest.raises(KeyError):
        P.build_model("tiny-sd4")
