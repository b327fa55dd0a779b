"""guided(pipe): stock diffusers pipelines, peers as oracles, and the pipeline left as it was."""
import pytest
import torch
from diffusers import (StableDiffusionPAGPipeline, StableDiffusionXLControlNetPAGPipeline,
                       StableDiffusionXLPAGPipeline)

import guidance_rt as grt
from guidance_rt import presets

from .conftest import model_state, rel

PEER_TOL = 1e-4


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipes():
    cache = {}

    def get(name, **kw):
        key = (name, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = presets.build_pipeline(name, **kw)
        return cache[key]

    return get


def _latents(pipe, **kw):
    kw.setdefault("num_inference_steps", 3)
    return pipe("a red cat", output_type="latent", generator=_gen(), **kw).images


def _state(pipe):
    model = getattr(pipe, "unet", None) or pipe.transformer
    return type(pipe), dict(pipe.config), model_state(model)


@pytest.mark.parametrize("name,peer_cls", [("tiny-sdxl", StableDiffusionXLPAGPipeline),
                                            ("tiny-sd15", StableDiffusionPAGPipeline)])
def test_pag_matches_diffusers_pag_pipeline(pipes, name, peer_cls):
    pipe = pipes(name)
    peer = peer_cls.from_pipe(pipe, pag_applied_layers=["mid"])
    expected = _latents(peer, guidance_scale=5.0, pag_scale=3.0)
    before = _state(pipe)
    with grt.guided(pipe, grt.Guidance(grt.CFG(5.0), grt.PAG(3.0, layers="mid"))):
        got = _latents(pipe)
    assert _state(pipe) == before
    assert rel(got, expected) < PEER_TOL
    assert rel(got, _latents(pipe, guidance_scale=5.0)) > 1e-3   # and PAG did something


def test_pag_with_lora_matches_diffusers(pipes):
    pipe = pipes("tiny-sdxl", lora=True)
    peer = StableDiffusionXLPAGPipeline.from_pipe(pipe, pag_applied_layers=["mid"])
    expected = _latents(peer, guidance_scale=5.0, pag_scale=3.0)
    with grt.guided(pipe, grt.Guidance(grt.CFG(5.0), grt.PAG(3.0, layers="mid"))):
        got = _latents(pipe)
    assert rel(got, expected) < PEER_TOL


def test_pag_with_controlnet_matches_diffusers(pipes):
    pipe = pipes("tiny-sdxl", controlnet=True)
    image = torch.rand(1, 3, 128, 128, generator=_gen(5))
    peer = StableDiffusionXLControlNetPAGPipeline.from_pipe(pipe, pag_applied_layers=["mid"])
    expected = _latents(peer, image=image, guidance_scale=5.0, pag_scale=3.0)
    with grt.guided(pipe, grt.Guidance(grt.CFG(5.0), grt.PAG(3.0, layers="mid"))):
        got = _latents(pipe, image=image)
    assert rel(got, expected) < PEER_TOL
    with grt.guided(pipe, grt.Guidance(grt.CFG(5.0))):
        cfg_only = _latents(pipe, image=image)
    assert rel(cfg_only, _latents(pipe, image=image, guidance_scale=5.0)) < PEER_TOL


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd35"])
def test_slg_matches_sd3_pipeline(pipes, name):
    pipe = pipes(name)
    steps = dict(num_inference_steps=5)   # window 0.01-0.5: off at step 0, on at 1-2, off at 3-4
    expected = _latents(pipe, guidance_scale=4.0, skip_guidance_layers=[7, 8, 9], skip_layer_guidance_scale=2.8,
                        skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.5, **steps)
    with grt.guided(pipe, grt.Guidance(grt.CFG(4.0), grt.SLG(2.8, layers=[7, 8, 9], start=0.01, stop=0.5))):
        got = _latents(pipe, **steps)
    assert rel(got, expected) < PEER_TOL
    assert rel(got, _latents(pipe, guidance_scale=4.0, **steps)) > 1e-3


def test_flux_true_cfg_and_plain_pass_through(pipes):
    pipe = pipes("tiny-flux")
    with grt.guided(pipe, grt.Guidance()):
        plain = _latents(pipe)
    assert torch.equal(plain, _latents(pipe))
    expected = _latents(pipe, negative_prompt="blurry", true_cfg_scale=3.0)
    with grt.guided(pipe, grt.Guidance(grt.CFG(3.0))):
        got = _latents(pipe, negative_prompt="blurry")
    assert rel(got, expected) < PEER_TOL
    with grt.guided(pipe, grt.Guidance(grt.SLG(2.0, layers=[7, 8, 9], start=0.0, stop=1.0))):
        slg = _latents(pipe)
    assert rel(slg, plain) > 1e-3


def test_one_packed_forward_per_step(pipes):
    pipe = pipes("tiny-sdxl")
    calls = []
    with grt.guided(pipe, grt.Guidance(grt.CFG(5.0), grt.PAG(layers="mid"), grt.TPG())) as p:
        den_forward = pipe.unet.forward
        pipe.unet.forward = lambda *a, **k: (calls.append(1), den_forward(*a, **k))[1]
        try:
            _latents(p, num_inference_steps=4)
        finally:
            pipe.unet.forward = den_forward
    assert len(calls) == 4


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_per_sample_guidances_in_one_pipeline_call(pipes, name):
    """A list of Guidances gives each image of the batch its own scales, in one pipeline call,
    and each image equals the image its Guidance makes alone (same seed)."""
    pipe = pipes(name)
    if name == "tiny-flux":
        gs = [grt.Guidance(grt.CFG(s), grt.PAG(p, layers=2)) for s, p in [(3.0, 1.0), (5.0, 0.0), (2.0, 2.5)]]
        extra = dict(negative_prompt="blur")
    elif name == "tiny-sd3":
        gs = [grt.Guidance(grt.CFG(s), grt.SLG(p, layers=[7, 8, 9], start=0.0)) for s, p in [(3.0, 1.0), (5.0, 0.0), (2.0, 2.5)]]
        extra = {}
    else:
        gs = [grt.Guidance(grt.CFG(s), grt.PAG(p, layers="mid")) for s, p in [(3.0, 1.0), (5.0, 0.0), (2.0, 2.5)]]
        extra = {}
    before = _state(pipe)
    with grt.guided(pipe, gs):
        together = pipe("a red cat", output_type="latent", num_inference_steps=3, num_images_per_prompt=3,
                        generator=[_gen(4) for _ in gs], **extra).images
    alone = []
    for g in gs:
        with grt.guided(pipe, g):
            alone.append(pipe("a red cat", output_type="latent", num_inference_steps=3, generator=_gen(4),
                              **extra).images)
    assert _state(pipe) == before
    for k in range(3):
        assert rel(together[k:k + 1], alone[k]) < PEER_TOL, f"image {k}"
    assert rel(alone[0], alone[1]) > 1e-3
    with grt.guided(pipe, gs), pytest.raises(ValueError, match="3 per-sample Guidances but the sample batch is 2"):
        pipe("a red cat", output_type="latent", num_inference_steps=2, num_images_per_prompt=2, **extra)
    assert _state(pipe) == before


def test_generator_seeds_perturbations(pipes):
    pipe = pipes("tiny-sdxl")
    guidance = grt.Guidance(grt.CFG(5.0), grt.TPG(layers="d6-d23"))
    with grt.guided(pipe, guidance):
        a = pipe("a cat", output_type="latent", num_inference_steps=2, generator=_gen(1)).images
        b = pipe("a cat", output_type="latent", num_inference_steps=2, generator=_gen(1)).images
    assert torch.equal(a, b)


def test_contradicting_arguments_are_errors_and_leave_pipeline_unchanged(pipes):
    pipe = pipes("tiny-sdxl")
    before = _state(pipe)
    with grt.guided(pipe, grt.Guidance(grt.CFG(5.0))):
        with pytest.raises(ValueError, match=r"StableDiffusionXLPipeline\(guidance_scale=7.0\) contradicts"):
            _latents(pipe, guidance_scale=7.0)
        assert torch.equal(_latents(pipe, guidance_scale=5.0), _latents(pipe))   # agreeing value is fine
    with grt.guided(pipe, grt.Guidance(grt.PAG(layers="mid"))):
        with pytest.raises(ValueError, match="contradicts"):
            _latents(pipe, guidance_scale=5.0)
    sd3 = pipes("tiny-sd3")
    with grt.guided(sd3, grt.Guidance(grt.CFG(4.0))):
        with pytest.raises(ValueError, match="skip_guidance_layers"):
            _latents(sd3, skip_guidance_layers=[7])
    assert _state(pipe) == before


def test_restored_after_exception_inside_the_call(pipes):
    pipe = pipes("tiny-sdxl")
    before = _state(pipe)

    def boom(p, i, t, kw):
        raise RuntimeError("stop at step")

    with pytest.raises(RuntimeError, match="stop at step"):
        with grt.guided(pipe, grt.Guidance(grt.CFG(5.0), grt.SEG(layers="mid"))):
            _latents(pipe, callback_on_step_end=boom)
    assert _state(pipe) == before
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert "forward" not in pipe.unet.__dict__


def test_unsupported_pipeline_and_bad_layers(pipes):
    pipe = pipes("tiny-sdxl")
    before = _state(pipe)

    class Other:
        pass

    with pytest.raises(TypeError, match="not supported by guided"):
        with grt.guided(Other(), grt.Guidance()):
            pass
    with pytest.raises(ValueError, match="valid layers: d0-d23, m0-m9, u0-u35"):
        with grt.guided(pipe, grt.Guidance(grt.PAG(layers="middle"))):
            pass
    assert _state(pipe) == before
