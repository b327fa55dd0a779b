"""PackedGuider in diffusers' modular pipelines: diffusers' own guiders as oracles (CFG, PAG),
guidance-rt's sequential reference where diffusers' guider does nothing (SEG) or has no
counterpart (NAG, TPG), one denoiser call per step, and the model left as it was."""
import subprocess
import sys

import pytest
import torch
from diffusers import guiders as G
from diffusers.guiders import smoothed_energy_guidance
from diffusers.hooks import LayerSkipConfig
from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceConfig
from diffusers.modular_pipelines import StableDiffusion3AutoBlocks, StableDiffusionXLAutoBlocks
from diffusers.utils import logging as diffusers_logging

import guidance_rt as grt
from guidance_rt import presets

from .conftest import model_state, rel

PackedGuider = grt.PackedGuider          # the lazy export

PEER_TOL = 1e-4
STEPS = 3
# the tiny presets' own size (16x16 latents): at 64 px the mid block sees 2x2 tokens and PAG's
# effect (about 1%) would leave PEER_TOL at 1% of it
SIZE = 128
# diffusers' PAG / SEG window is int(start N) < i < int(stop N): never step 0. The same steps in
# guidance-rt's start <= i / N < stop (N = 3: steps 1 and 2)
PERTURB_START = 0.3
MID = "mid_block.attentions.0.transformer_blocks"   # guidance-rt's "mid" on SDXL: m0-m9


@pytest.fixture(scope="module", autouse=True)
def _quiet_guiders():
    """diffusers' guiders warn that they are experimental on every construction."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    yield
    diffusers_logging.set_verbosity(level)


@pytest.fixture(scope="module")
def modular():
    """Modular pipelines around the tiny stock pipelines' components (built in code, nothing
    downloaded). `role` keeps diffusers' guiders off the model PackedGuider is checked on: their
    hooks leave registries and forward wrappers behind."""
    cache = {}
    blocks = {"tiny-sdxl": StableDiffusionXLAutoBlocks, "tiny-sd3": StableDiffusion3AutoBlocks}

    def get(name, role="ours", controlnet=False):
        key = (name, role, controlnet)
        if key not in cache:
            tiny = presets.build_pipeline(name, controlnet=controlnet)
            pipe = blocks[name]().init_pipeline()
            pipe.update_components(**{k: v for k, v in tiny.components.items() if k in pipe.component_names})
            cache[key] = pipe
        return cache[key]

    return get


def _run(pipe, guider, **kw):
    """Latents of a STEPS-step run with `guider` as the pipeline's guider, and the number of
    denoiser calls the loop made."""
    pipe.update_components(guider=guider)
    model = getattr(pipe, "unet", None) or pipe.transformer
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        latents = pipe(prompt="a red cat", num_inference_steps=STEPS, height=SIZE, width=SIZE,
                       generator=torch.Generator().manual_seed(0), output="latents", **kw)
    finally:
        handle.remove()
    return latents, len(calls)


def _pag_config():
    return [LayerSkipConfig(indices=list(range(10)), fqn=MID, skip_attention=False, skip_attention_scores=True,
                            skip_ff=False)]


def test_cfg_matches_diffusers_cfg_guider_in_one_call_per_step(modular):
    pipe = modular("tiny-sdxl")
    before = model_state(pipe.unet)
    guider = PackedGuider(grt.Guidance(grt.CFG(5.0)))
    got, calls = _run(pipe, guider)
    assert pipe.guider is guider
    assert model_state(pipe.unet) == before
    expected, peer_calls = _run(modular("tiny-sdxl", "peer"), G.ClassifierFreeGuidance(guidance_scale=5.0))
    assert rel(got, expected) < PEER_TOL
    assert (calls, peer_calls) == (STEPS, 2 * STEPS)


def test_pag_matches_diffusers_pag_guider(modular):
    pipe = modular("tiny-sdxl")
    before = model_state(pipe.unet)
    got, calls = _run(pipe, PackedGuider(grt.Guidance(grt.CFG(5.0), grt.PAG(3.0, layers="mid",
                                                                            start=PERTURB_START))))
    assert model_state(pipe.unet) == before
    peer = G.PerturbedAttentionGuidance(guidance_scale=5.0, perturbed_guidance_scale=3.0, perturbed_guidance_start=0.0,
                                        perturbed_guidance_stop=1.0, perturbed_guidance_config=_pag_config())
    expected, peer_calls = _run(modular("tiny-sdxl", "peer"), peer)
    assert rel(got, expected) < PEER_TOL
    cfg_only, _ = _run(pipe, PackedGuider(grt.Guidance(grt.CFG(5.0))))
    assert rel(got, cfg_only) > 100 * PEER_TOL            # PAG moved it, far beyond the tolerance
    assert (calls, peer_calls) == (STEPS, 2 + 3 * (STEPS - 1))


class _Reference(grt.GuidedDenoiser):
    """guidance-rt's sequential oracle (one plain forward per branch) in GuidedDenoiser's place."""

    def __call__(self, sample, timestep, **kw):
        return grt.reference.step(self.model, self.guidance, sample, timestep, **kw)


def test_diffusers_seg_guider_applies_nothing_where_packed_seg_moves(modular, monkeypatch):
    peer_pipe = modular("tiny-sdxl", "peer")
    installs = []
    install = smoothed_energy_guidance._apply_smoothed_energy_guidance_hook
    monkeypatch.setattr(smoothed_energy_guidance, "_apply_smoothed_energy_guidance_hook",
                        lambda *a, **k: (installs.append(1), install(*a, **k)))
    peer = G.SmoothedEnergyGuidance(guidance_scale=5.0, seg_guidance_scale=3.0,
                                    seg_guidance_config=[SmoothedEnergyGuidanceConfig(indices=list(range(10)), fqn=MID)])
    peer_seg, peer_calls = _run(peer_pipe, peer)
    peer_cfg, _ = _run(peer_pipe, G.ClassifierFreeGuidance(guidance_scale=5.0))
    # diffusers 0.42.1: prepare_models never counts its batches, so the hook is never installed
    # and the third forward of a step only repeats the cond one
    assert installs == [] and peer_calls == 2 + 3 * (STEPS - 1)
    assert rel(peer_seg, peer_cfg) < PEER_TOL
    got, calls = _run(modular("tiny-sdxl"), PackedGuider(grt.Guidance(grt.CFG(5.0), grt.SEG(3.0, layers="mid"))))
    assert calls == STEPS
    assert rel(got, peer_cfg) > 100 * PEER_TOL


@pytest.mark.parametrize("guidance,without", [
    # every step: SEG in the late steps alone moves the latents little
    (grt.Guidance(grt.CFG(5.0), grt.SEG(3.0, layers="mid")), grt.Guidance(grt.CFG(5.0))),
    # NAG guides away from the pipeline's negative prompt, which num_conditions makes it encode
    (grt.Guidance(grt.NAG(5.0)), grt.Guidance()),
    # TPG's permutations come from the guider's generator
    (grt.Guidance(grt.CFG(5.0), grt.TPG(layers="d6-d23")), grt.Guidance(grt.CFG(5.0))),
], ids=["cfg+seg", "nag", "cfg+tpg"])
def test_matches_sequential_reference(modular, guidance, without):
    pipe = modular("tiny-sdxl")
    got, calls = _run(pipe, PackedGuider(guidance, generator=torch.Generator().manual_seed(1)))
    assert calls == STEPS
    oracle = PackedGuider(guidance, generator=torch.Generator().manual_seed(1))
    oracle._denoiser = _Reference(pipe.unet, guidance)
    expected, _ = _run(pipe, oracle)
    assert rel(got, expected) < PEER_TOL
    assert rel(got, _run(pipe, PackedGuider(without))[0]) > 100 * PEER_TOL


def test_model_restored_after_each_step_and_after_an_error(modular):
    pipe = modular("tiny-sdxl")
    before = model_state(pipe.unet)
    seen = []   # whether the loop's denoiser call went through the guider's instance forward
    handle = pipe.unet.register_forward_pre_hook(lambda m, a: seen.append("forward" in m.__dict__))
    try:
        _run(pipe, PackedGuider(grt.Guidance(grt.CFG(5.0), grt.PAG(layers="mid"), grt.TPG(layers="d6-d23"))))
    finally:
        handle.remove()
    assert seen == [True] * STEPS
    assert model_state(pipe.unet) == before
    # two per-sample Guidances for a batch of one: GuidedDenoiser raises inside the packed call
    with pytest.raises(ValueError, match="per-sample"):
        _run(pipe, PackedGuider([grt.Guidance(grt.CFG(5.0)), grt.Guidance(grt.CFG(3.0))]))
    assert model_state(pipe.unet) == before


def test_controlnet_loop_with_cfg_is_refused(modular):
    """The ControlNet loop runs the ControlNet once per guider batch: the one packed batch has no
    residuals for the uncond rows, so CFG there would be silently wrong."""
    pipe = modular("tiny-sdxl", controlnet=True)
    before = model_state(pipe.unet)
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with pytest.raises(NotImplementedError, match="ControlNet"):
        _run(pipe, PackedGuider(grt.Guidance(grt.CFG(5.0))), control_image=image)
    assert model_state(pipe.unet) == before


def test_config_round_trip(modular, tmp_path):
    guidance = grt.Guidance(grt.CFG(5.0), grt.SEG(3.0, layers="mid"), grt.PAG(2.0, layers=["m0", "m1"]))
    guider = PackedGuider(guidance)
    assert guider.new().guidance == guidance
    guider.save_pretrained(tmp_path)            # strict JSON: SEG's infinite sigma as "inf"
    assert PackedGuider.from_pretrained(tmp_path).guidance == guidance
    per_sample = PackedGuider([grt.Guidance(grt.CFG(5.0)), "cfg=3"])
    assert per_sample.new().guidance == [grt.Guidance(grt.CFG(5.0)), grt.Guidance(grt.CFG(3.0))]
    pipe = modular("tiny-sdxl")
    pipe.update_components(guider=guider)
    assert pipe.get_component_spec("guider").create().guidance == guidance
    assert (guider.num_conditions, PackedGuider("pag=3@mid").num_conditions) == (2, 1)


def test_sd3_cfg_matches_diffusers_cfg_guider(modular):
    pipe = modular("tiny-sd3")
    before = model_state(pipe.transformer)
    got, calls = _run(pipe, PackedGuider(grt.Guidance(grt.CFG(4.0))), negative_prompt="blurry")
    assert model_state(pipe.transformer) == before
    expected, peer_calls = _run(pipe, G.ClassifierFreeGuidance(guidance_scale=4.0), negative_prompt="blurry")
    assert rel(got, expected) < PEER_TOL
    assert (calls, peer_calls) == (STEPS, 2 * STEPS)
    # the SD3 blocks encode a negative prompt only when given one
    with pytest.raises(ValueError, match="negative conditioning"):
        _run(pipe, PackedGuider(grt.Guidance(grt.CFG(4.0))))
    assert model_state(pipe.transformer) == before


def test_import_is_lazy():
    """`import guidance_rt` does not import diffusers' guiders or modular pipelines (seconds)."""
    code = ("import sys, guidance_rt; "
            "assert not {'diffusers.guiders', 'diffusers.modular_pipelines'} & set(sys.modules), 'eager'")
    subprocess.run([sys.executable, "-c", code], check=True)
