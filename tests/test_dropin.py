"""guided(pipe) without a Guidance: the call's own diffusers and seed-pipeline arguments decide the
guidance, in one packed forward per step, equal to the peers that take those arguments."""
import contextlib
import math
import threading

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusion3PAGPipeline, StableDiffusionPipeline, StableDiffusionXLPAGPipeline

import guidance_rt as grt
from guidance_rt import pipelines

from .conftest import rel
from .test_pipelines import PEER_TOL, _gen, _latents, _state, pipes  # noqa: F401 (pipes: the fixture)

EFFECT = 1e-3    # a guidance argument's effect on the latents is far above this (and PEER_TOL)


@contextlib.contextmanager
def _counting(pipe):
    """Counts the pipeline's calls of its denoiser ("calls") and the forwards really computed
    ("forwards": calls of the input embedding, which every forward, stock or packed, runs once)."""
    model = getattr(pipe, "unet", None) or pipe.transformer
    embedding = model.conv_in if hasattr(model, "conv_in") else getattr(model, "x_embedder", None) or model.pos_embed
    counts = {"calls": 0, "forwards": 0}
    handles = [model.register_forward_pre_hook(lambda *_: counts.__setitem__("calls", counts["calls"] + 1)),
               embedding.register_forward_pre_hook(lambda *_: counts.__setitem__("forwards", counts["forwards"] + 1))]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def _assert_restored(pipe, before):
    assert _state(pipe) == before
    assert not (pipelines._PIPES or pipelines._MODELS or pipelines._RUNNING)


# --------------------------------------------------------------------- diffusers' arguments

@pytest.mark.parametrize("ours,theirs", [
    (["mid"], ["mid"]),
    (["down.block_2", "up.block_1.attentions_0"], ["down_blocks.2", "up_blocks.1.attentions.0"]),
    ("up_blocks.0.attentions.(1|2)", "up_blocks.0.attentions.(1|2)"),
], ids=["mid", "block-forms", "regex"])
def test_pag_arguments_match_diffusers_pag_pipeline(pipes, ours, theirs):
    """A plain SDXL pipeline given the PAG pipeline's arguments equals StableDiffusionXLPAGPipeline,
    in one forward per step. diffusers 0.42.1 no longer finds its documented "down.block_2" form
    (it raises), so its module-name spelling of the same blocks is the oracle's."""
    pipe = pipes("tiny-sdxl")
    peer = StableDiffusionXLPAGPipeline.from_pipe(pipe, pag_applied_layers=theirs)
    expected = _latents(peer, guidance_scale=5.0, pag_scale=3.0)
    before = _state(pipe)
    with grt.guided(pipe), _counting(pipe) as counts:
        got = _latents(pipe, guidance_scale=5, pag_scale=3, pag_applied_layers=ours)
    assert counts == {"calls": 3, "forwards": 3}
    assert _state(pipe) == before
    assert rel(got, expected) < PEER_TOL
    assert rel(got, _latents(pipe, guidance_scale=5.0)) > EFFECT


def test_pag_defaults_and_adaptive_scale_match_diffusers(pipes):
    """pag_scale alone: diffusers' default layers ("mid"); pag_adaptive_scale as diffusers reads it."""
    pipe = pipes("tiny-sdxl")
    peer = StableDiffusionXLPAGPipeline.from_pipe(pipe)
    expected = _latents(peer, guidance_scale=5.0, pag_scale=2.0, pag_adaptive_scale=0.002)
    with grt.guided(pipe):
        got = _latents(pipe, guidance_scale=5.0, pag_scale=2.0, pag_adaptive_scale=0.002)
        plain_pag = _latents(pipe, guidance_scale=5.0, pag_scale=2.0)
    assert rel(got, expected) < PEER_TOL
    assert rel(got, plain_pag) > EFFECT


def test_sd3_pag_arguments_match_diffusers(pipes):
    """SD3: diffusers' "blocks.N" form; "blocks.1" names block 1 only (diffusers 0.42.1 also takes
    blocks 10-19 there, against its own fake-integral guard), i.e. guidance-rt's block "1"."""
    pipe = pipes("tiny-sd3")
    peer = StableDiffusion3PAGPipeline.from_pipe(pipe, pag_applied_layers=["blocks.13"])
    expected = _latents(peer, guidance_scale=4.0, pag_scale=3.0)
    with grt.guided(pipe), _counting(pipe) as counts:
        got = _latents(pipe, guidance_scale=4.0, pag_scale=3.0, pag_applied_layers=["blocks.13"])
        block1 = _latents(pipe, guidance_scale=4.0, pag_scale=3.0, pag_applied_layers="blocks.1")
    assert counts["forwards"] == 6
    assert rel(got, expected) < PEER_TOL
    with grt.guided(pipe, grt.Guidance(grt.CFG(4.0), grt.PAG(3.0, layers="1"))):
        assert torch.equal(block1, _latents(pipe))


@pytest.mark.parametrize("start,stop", [(0.01, 0.5), (0.2, 0.8)], ids=["default-start", "start-on-a-step"])
def test_slg_arguments_match_sd3_pipeline(pipes, start, stop):
    """The stock SD3 call's SLG arguments under guided(pipe) equal the stock SLG: one forward per
    step instead of two in the SLG steps. Window N start < i < N stop (5 steps): steps 1-2, and
    with start 0.2 (N start = 1, strict) steps 2-3."""
    pipe = pipes("tiny-sd3")
    args = dict(guidance_scale=4.0, skip_guidance_layers=[7, 8, 9], skip_layer_guidance_scale=2.8,
                skip_layer_guidance_start=start, skip_layer_guidance_stop=stop, num_inference_steps=5)
    with _counting(pipe) as stock_counts:
        expected = _latents(pipe, **args)
    with grt.guided(pipe), _counting(pipe) as counts:
        got = _latents(pipe, **args)
    assert stock_counts["forwards"] == 7 and counts == {"calls": 5, "forwards": 5}
    assert rel(got, expected) < PEER_TOL
    assert rel(got, _latents(pipe, guidance_scale=4.0, num_inference_steps=5)) > EFFECT


def test_flux_true_cfg_matches_stock(pipes):
    """FLUX true_cfg_scale: the stock pipeline's two forwards per step become one packed forward
    (its second denoiser call is answered from the first)."""
    pipe = pipes("tiny-flux")
    with _counting(pipe) as stock_counts:
        expected = _latents(pipe, negative_prompt="blurry", true_cfg_scale=3.0)
    with grt.guided(pipe):
        with _counting(pipe) as counts:
            got = _latents(pipe, negative_prompt="blurry", true_cfg_scale=3.0)
        plain = _latents(pipe, negative_prompt="blurry")    # true_cfg_scale 1.0: no CFG, as stock
    assert stock_counts == {"calls": 6, "forwards": 6} and counts == {"calls": 6, "forwards": 3}
    assert rel(got, expected) < PEER_TOL
    assert torch.equal(plain, _latents(pipe, negative_prompt="blurry"))
    assert rel(got, plain) > EFFECT


def test_no_guidance_arguments_is_the_stock_call(pipes):
    pipe = pipes("tiny-sdxl")
    with grt.guided(pipe):
        default = _latents(pipe)                     # the pipeline's own default guidance_scale, 5.0
        cfg7 = _latents(pipe, guidance_scale=7.0)
    assert rel(default, _latents(pipe)) < PEER_TOL
    with grt.guided(pipe, grt.Guidance(grt.CFG(7.0))):
        assert torch.equal(cfg7, _latents(pipe))


# --------------------------------------------------------------------- the seeds' arguments

SEED_CALLS = {
    # seed 001's example call: CFG off, SEG with a finite blur on the mid block
    "seg": (dict(guidance_scale=1.0, seg_scale=3.0, seg_blur_sigma=100.0, seg_applied_layers=["mid"]),
            grt.Guidance(grt.SEG(3.0, sigma=100.0, layers="mid")), None),
    "seg-defaults": (dict(seg_applied_layers_index=["d4", "u3"]),
                     grt.Guidance(grt.CFG(5.0), grt.SEG(3.0, sigma=math.inf, layers=["d4", "u3"])), None),
    # seed 002's example call (TPG on d6-d23 with CFG 7.5)
    "tpg": (dict(guidance_scale=7.5, tpg_scale=3.0, tpg_applied_layers_index=[f"d{i}" for i in range(6, 24)]),
            grt.Guidance(grt.CFG(7.5), grt.TPG(3.0, layers="d6-d23")), None),
    "tpg-defaults": (dict(tpg_scale=2.0), grt.Guidance(grt.CFG(5.0), grt.TPG(2.0)), None),
    "nag": (dict(nag_scale=3.0, nag_tau=2.0, nag_alpha=0.3, nag_end=0.5, nag_negative_prompt="blurry"),
            grt.Guidance(grt.CFG(5.0), grt.NAG(3.0, tau=2.0, alpha=0.3, stop=0.5)), "blurry"),
    "nag-negative-prompt": (dict(nag_scale=4.0, negative_prompt="ugly"),
                            grt.Guidance(grt.CFG(5.0), grt.NAG(4.0, tau=2.5, alpha=0.5)), "ugly"),
    "all": (dict(guidance_scale=6.0, pag_scale=1.0, seg_scale=2.0, tpg_scale=1.5, nag_scale=2.0,
                 nag_negative_prompt="blurry"),
            grt.Guidance(grt.CFG(6.0), grt.PAG(1.0), grt.SEG(2.0), grt.TPG(1.5), grt.NAG(2.0)), "blurry"),
}


@pytest.mark.parametrize("name", list(SEED_CALLS))
def test_seed_arguments_equal_the_explicit_guidance(pipes, name):
    """The seeds' pipeline arguments build the Guidance one would write (defaults included): the
    same packed forward, bit for bit, one per step."""
    pipe = pipes("tiny-sdxl")
    args, guidance, negative = SEED_CALLS[name]
    stock = {k: v for k, v in args.items() if k == "negative_prompt"}
    before = _state(pipe)
    with grt.guided(pipe), _counting(pipe) as counts:
        got = _latents(pipe, num_inference_steps=2, **args)
    extra = {} if negative is None else {"nag_negative_prompt": negative}
    with grt.guided(pipe, guidance, **extra):
        expected = _latents(pipe, num_inference_steps=2, **stock)
    assert counts == {"calls": 2, "forwards": 2}
    assert torch.equal(got, expected)
    _assert_restored(pipe, before)


BASES = {"pag": dict(pag_scale=3.0), "seg": dict(seg_scale=3.0), "tpg": dict(tpg_scale=3.0),
         "nag": dict(nag_scale=3.0, nag_negative_prompt="blurry")}
CHANGES = [("pag", dict(pag_scale=1.0)), ("pag", dict(pag_adaptive_scale=0.002)),
           ("pag", dict(pag_applied_layers=["down"])),
           ("seg", dict(seg_scale=1.0)), ("seg", dict(seg_blur_sigma=1.0)), ("seg", dict(seg_applied_layers=["down"])),
           ("seg", dict(seg_applied_layers_index=["d4", "u3"])),
           ("tpg", dict(tpg_scale=1.0)), ("tpg", dict(tpg_applied_layers_index=["d4", "d5"])),
           ("nag", dict(nag_scale=5.0)), ("nag", dict(nag_tau=1.2)), ("nag", dict(nag_alpha=0.9)),
           ("nag", dict(nag_negative_prompt="ugly")), ("nag", dict(nag_end=0.5))]


@pytest.fixture(scope="module")
def bases(pipes):
    """CFG alone and each method at its base arguments (tiny-sdxl, 2 steps)."""
    pipe = pipes("tiny-sdxl")
    with grt.guided(pipe):
        out = {name: _latents(pipe, num_inference_steps=2, **args) for name, args in BASES.items()}
        out["cfg"] = _latents(pipe, num_inference_steps=2)
    return out


@pytest.mark.parametrize("method,change", CHANGES, ids=[next(iter(c)) for _, c in CHANGES])
def test_each_argument_changes_the_output(pipes, bases, method, change):
    pipe = pipes("tiny-sdxl")
    with grt.guided(pipe):
        got = _latents(pipe, num_inference_steps=2, **{**BASES[method], **change})
    assert rel(bases[method], bases["cfg"]) > EFFECT
    assert rel(got, bases[method]) > EFFECT


def test_flux_pag_arguments(pipes):
    """PAG's arguments work on FLUX too (diffusers has no FLUX PAG pipeline): guidance-rt's layers."""
    pipe = pipes("tiny-flux")
    with grt.guided(pipe):
        got = _latents(pipe, pag_scale=2.0, pag_applied_layers=[2, "s3"])
    with grt.guided(pipe, grt.Guidance(grt.PAG(2.0, layers=[2, "s3"]))):
        assert torch.equal(got, _latents(pipe))


# --------------------------------------------------------------------- errors

ERRORS = [
    ("tiny-sdxl", dict(pag_scale=3.0, pag_applied_layers=["middle"]),
     r"pag_applied_layers: layer 'middle' matches no block .* valid layers: d0-d23, m0-m9, u0-u35.*"
     r"'down.block_2.attentions_1'"),
    ("tiny-sdxl", dict(seg_applied_layers=["nowhere"]), r"seg_applied_layers: layer 'nowhere' matches no block"),
    ("tiny-sdxl", dict(seg_applied_layers=[]), r"seg_applied_layers=\[\] names no layer"),
    ("tiny-sdxl", dict(tpg_applied_layers_index=["d99"]), r"tpg_applied_layers_index: layer 'd99'"),
    ("tiny-sdxl", dict(pag_scale=-1.0), r"pag_scale=-1.0: must be a number >= 0 \(0: no PAG\)"),
    ("tiny-sdxl", dict(guidance_scale=-2.0), r"guidance_scale=-2.0: must be a number >= 0 \(<= 1: no CFG\)"),
    ("tiny-sdxl", dict(seg_scale="3"), r"seg_scale='3': must be a number"),
    ("tiny-sdxl", dict(seg_blur_sigma=0.1), r"seg_blur_sigma=0.1: SEG.sigma must be > 1/6"),
    ("tiny-sdxl", dict(nag_scale=3.0), r"nag_scale=3.0 needs a negative prompt .* nag_negative_prompt="),
    ("tiny-sdxl", dict(nag_tau=2.0, nag_negative_prompt="x"), r"nag_tau, nag_negative_prompt given without nag_scale"),
    ("tiny-sdxl", dict(nag_scale=0.5, nag_negative_prompt="x"), r"nag_scale=0.5: must be a number >= 1"),
    ("tiny-sdxl", dict(nag_scale=3.0, nag_alpha=2.0, nag_negative_prompt="x"),
     r"nag_alpha=2.0.*NAG.alpha must be <= 1"),
    ("tiny-sdxl", dict(guidance_scale=1.0, guidance_rescale=0.7), r"guidance_rescale=0.7 rescales CFG, which "
                                                                 r"guidance_scale=1 turns off"),
    ("tiny-sdxl", dict(seg_sclae=3.0), r"seg_sclae=...\): unknown guidance argument under guided\(\); valid here: "
                                       r"guidance_scale, guidance_rescale, pag_scale, .*seg_scale"),
    ("tiny-sdxl", dict(skip_guidance_layers=[7]), r"skip_guidance_layers=...\): unknown guidance argument"),
    ("tiny-sdxl", dict(do_nag=True, nag_alpha=1.0), r"do_nag belongs to DualGuide-SDXL's own attention-map variant"),
    ("tiny-sd3", dict(guidance_scale=1.0, skip_guidance_layers=[7]), r"skip_guidance_layers needs guidance_scale > 1"),
    ("tiny-sd3", dict(skip_layer_guidance_scale=3.0), r"skip_layer_guidance_scale given without skip_guidance_layers"),
    ("tiny-sd3", dict(skip_guidance_layers=[7, 99]), r"skip_guidance_layers: layer 99 matches no block .*valid "
                                                     r"layers: 0-23"),
    ("tiny-sd3", dict(skip_guidance_layers=[7], skip_layer_guidance_start=0.5, skip_layer_guidance_stop=0.2),
     r"skip_layer_guidance_start=0.5 must not exceed skip_layer_guidance_stop=0.2"),
    ("tiny-flux", dict(true_cfg_scale=3.0), r"FluxPipeline with a CFG term needs negative_prompt"),
    ("tiny-flux", dict(pag_scale=3.0, pag_adaptive_scale=0.1), r"pag_scale=3.0, pag_adaptive_scale=0.1: PAG "
                                                               r"\(term 0\).adaptive_scale must be 0 on FLUX"),
]


@pytest.mark.parametrize("name,args,match", ERRORS, ids=[f"{n}-{next(iter(a))}" for n, a, _ in ERRORS])
def test_bad_arguments_are_clear_errors(pipes, name, args, match):
    """Raised before the stock call runs; the pipeline and model are left as they were."""
    pipe = pipes(name)
    before = _state(pipe)
    with grt.guided(pipe), _counting(pipe) as counts:
        with pytest.raises(ValueError, match=match):
            _latents(pipe, num_inference_steps=2, **args)
    assert counts["calls"] == 0
    _assert_restored(pipe, before)


@pytest.mark.parametrize("args", [dict(pag_scale=0.0), dict(seg_scale=3.0), dict(tpg_applied_layers_index=["d6"]),
                                  dict(nag_scale=3.0), dict(pag_applied_layers=["mid"])], ids=lambda a: next(iter(a)))
def test_guidance_arguments_beside_a_guidance_are_errors(pipes, args):
    pipe = pipes("tiny-sdxl")
    name = next(iter(args))
    with grt.guided(pipe, grt.Guidance(grt.CFG(5.0))):
        with pytest.raises(ValueError, match=rf"StableDiffusionXLPipeline\({name}=...\) contradicts guided\(\): "
                                             r"the Guidance decides the guidance; use (grt\.\w+\(\w+=...\)|guided)"):
            _latents(pipe, **args)


def test_nag_negative_prompt_in_guided_needs_a_guidance(pipes):
    with pytest.raises(ValueError, match="goes with a Guidance that has a NAG term"):
        with grt.guided(pipes("tiny-sdxl"), nag_negative_prompt="blurry"):
            pass


# --------------------------------------------------------------------- the contexts around it

def test_nested_with_an_explicit_guidance_and_restored_after_an_exception(pipes):
    """guided(pipe) inside guided(pipe, guidance): the inner calls read their arguments, the outer
    Guidance applies again after; a call failing inside leaves everything restored."""
    pipe = pipes("tiny-sdxl")
    before = _state(pipe)
    outer = grt.Guidance(grt.CFG(5.0), grt.TPG(2.0))

    def boom(p, i, t, kwargs):
        raise RuntimeError("stop at step")

    with grt.guided(pipe, outer):
        first = _latents(pipe, num_inference_steps=2)
        with grt.guided(pipe):
            inner = _latents(pipe, num_inference_steps=2, seg_scale=2.0)
            with pytest.raises(RuntimeError, match="stop at step"):
                _latents(pipe, num_inference_steps=2, seg_scale=2.0, callback_on_step_end=boom)
        again = _latents(pipe, num_inference_steps=2)
    _assert_restored(pipe, before)
    assert torch.equal(first, again)
    with grt.guided(pipe, grt.Guidance(grt.CFG(5.0), grt.SEG(2.0))):
        assert torch.equal(inner, _latents(pipe, num_inference_steps=2))


def test_two_threads_share_the_model_with_their_own_arguments(pipes):
    """Two pipelines on one model, each with its own scheduler, called at the same time from two
    threads under guided(pipe): each call is guided by its own arguments."""
    pipe = pipes("tiny-sd15")
    twin = StableDiffusionPipeline(**{**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)},
                                   requires_safety_checker=False)
    run = lambda p, **kw: p("a red cat", output_type="latent", num_inference_steps=2, height=64, width=64,
                            generator=_gen(), **kw).images
    args = {"pipe": dict(pag_scale=2.0, pag_applied_layers="down"), "twin": dict(guidance_scale=3.0)}
    with grt.guided(pipe):
        expected = {"pipe": run(pipe, **args["pipe"])}
    with grt.guided(twin):
        expected["twin"] = run(twin, **args["twin"])
    before = _state(pipe)
    both = threading.Barrier(2, timeout=30)
    got, errors = {}, []

    def worker(key, p):
        try:
            with grt.guided(p):
                both.wait()
                got[key] = run(p, **args[key])
        except BaseException as e:   # re-raised below
            errors.append(e)
            both.abort()

    threads = [threading.Thread(target=worker, args=item, daemon=True) for item in (("pipe", pipe), ("twin", twin))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and not any(t.is_alive() for t in threads), errors
    for key in args:
        assert torch.equal(got[key], expected[key]), key
    _assert_restored(pipe, before)
