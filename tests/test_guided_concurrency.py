"""guided() bound to the caller: nested contexts, contexts open in several threads, overlapping
calls, a model shared by two pipelines, stock calls beside open contexts, and the pipeline and
model restored in every exit order.

Every comparison is bitwise (torch.equal): the runs being compared execute the same ops on the same
inputs in one process with one intra-op thread (conftest), whichever Python thread runs them.
"""
import threading

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

import guidance_rt as grt
from guidance_rt import pipelines, presets

from .conftest import model_state

TIMEOUT = 120         # seconds: a deadlock fails the test instead of hanging it (generous: slow CI)
G = {"pag": grt.Guidance(grt.CFG(5.0), grt.PAG(2.0, layers="down")),   # mid: 1 token at 64 px
     "cfg5": grt.Guidance(grt.CFG(5.0)),     # same CFG scale as "pag" (the KeyError case)
     "cfg3": grt.Guidance(grt.CFG(3.0))}     # another CFG scale (the ValueError case)


def _run(pipe, **kw):
    return pipe("a red cat", output_type="latent", num_inference_steps=2, height=64, width=64,
                generator=torch.Generator().manual_seed(0), **kw).images


@pytest.fixture(scope="module")
def pipe():
    return presets.build_pipeline("tiny-sd15")


@pytest.fixture(scope="module")
def expected(pipe):
    """Each Guidance's result alone in this thread, and the stock pipeline's ("stock")."""
    out = {"stock": _run(pipe)}
    for name, g in G.items():
        with grt.guided(pipe, g):
            out[name] = _run(pipe)
    values = list(out.values())
    assert all(not torch.equal(a, b) for i, a in enumerate(values) for b in values[i + 1:])
    return out


def _state(pipe):
    unet = pipe.unet
    return type(pipe), "forward" in unet.__dict__, unet.__dict__.get("forward"), model_state(unet)


def _assert_restored(pipe, before):
    assert _state(pipe) == before
    assert not (pipelines._PIPES or pipelines._MODELS or pipelines._RUNNING)


def _threads(*targets, barriers=()):
    """Run each target in its own thread, join them with a timeout and re-raise the first error
    (a failing thread breaks `barriers`, so the others fail at once instead of timing out)."""
    errors = []

    def guard(target):
        def run():
            try:
                target()
            except BaseException as e:   # re-raised in the test thread
                errors.append(e)
                for barrier in barriers:
                    barrier.abort()
        return run

    threads = [threading.Thread(target=guard(t), daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a thread did not finish (deadlock?)"
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])


def _wait(event: threading.Event):
    assert event.wait(TIMEOUT), "timed out waiting for the other thread"


def _pause_at_first_step(running: threading.Event, resume: threading.Event):
    """A step-end callback that holds the pipeline call mid-run until `resume` is set."""
    def callback(pipe, i, t, kwargs):
        if i == 0:
            running.set()
            _wait(resume)
        return {}
    return callback


@pytest.mark.parametrize("inner", ["cfg5", "cfg3"])
def test_nested_contexts_use_the_inner_guidance_then_the_outer(pipe, expected, inner):
    before = _state(pipe)
    with grt.guided(pipe, G["pag"]):
        outer_first = _run(pipe)
        with grt.guided(pipe, G[inner]):
            got_inner = _run(pipe)
        outer_again = _run(pipe)
    assert torch.equal(outer_first, expected["pag"])
    assert torch.equal(got_inner, expected[inner])
    assert torch.equal(outer_again, expected["pag"])
    _assert_restored(pipe, before)

    # the outer context exits first: the inner one stays in force until it exits
    outer, inner_cm = grt.guided(pipe, G["pag"]), grt.guided(pipe, G[inner])
    outer.__enter__()
    inner_cm.__enter__()
    outer.__exit__(None, None, None)
    assert torch.equal(_run(pipe), expected[inner])
    inner_cm.__exit__(None, None, None)
    _assert_restored(pipe, before)


@pytest.mark.parametrize("other", ["cfg5", "cfg3"])
def test_contexts_open_in_two_threads_calling_in_turn(pipe, expected, other):
    """Both contexts entered before either calls; then A calls, B calls, A exits first (non-LIFO),
    B calls again with A gone, and B exits last."""
    before = _state(pipe)
    both_entered = threading.Barrier(2, timeout=TIMEOUT)
    a_called, a_exited = threading.Event(), threading.Event()
    got = {}

    def a():
        with grt.guided(pipe, G["pag"]):
            both_entered.wait()
            got["a"] = _run(pipe)
            a_called.set()
        a_exited.set()

    def b():
        with grt.guided(pipe, G[other]):
            both_entered.wait()
            _wait(a_called)
            got["b"] = _run(pipe)
            _wait(a_exited)
            assert type(pipe) is not before[0]   # still patched for B
            got["b_alone"] = _run(pipe)

    _threads(a, b, barriers=[both_entered])
    assert torch.equal(got["a"], expected["pag"])
    assert torch.equal(got["b"], expected[other])
    assert torch.equal(got["b_alone"], expected[other])
    _assert_restored(pipe, before)


def test_stock_calls_beside_open_contexts_are_stock(pipe, expected):
    """Two threads hold guided() open while a third thread calls the pipeline with no context: that
    call is the stock pipeline's, and the holders' calls before and after it stay guided."""
    before = _state(pipe)
    turn = [threading.Event() for _ in range(6)]   # the calls run one at a time, in this order
    turn[0].set()
    got = {}

    def call(k, key):
        _wait(turn[k])
        got[key] = _run(pipe)
        turn[k + 1].set()

    def holder(name, first, second):
        def run():
            with grt.guided(pipe, G[name]):
                call(first, name)
                call(second, name + " after")
        return run

    _threads(holder("pag", 0, 3), holder("cfg3", 1, 4), lambda: call(2, "third thread"))
    assert torch.equal(got["third thread"], expected["stock"])
    for name in ("pag", "cfg3"):
        assert torch.equal(got[name], expected[name])
        assert torch.equal(got[name + " after"], expected[name])
    _assert_restored(pipe, before)


def test_overlapping_calls_raise_in_the_second_caller(pipe, expected):
    """While A's guided call is mid-run, B's guided call and C's stock call (no context) on the same
    pipeline raise a clear RuntimeError; A's result is unaffected and B's next call, after A's, is
    correct."""
    before = _state(pipe)
    a_running, a_may_finish, a_done = threading.Event(), threading.Event(), threading.Event()
    tried = threading.Barrier(2, timeout=TIMEOUT)
    got = {}

    def a():
        with grt.guided(pipe, G["pag"]):
            try:
                got["a"] = _run(pipe, callback_on_step_end=_pause_at_first_step(a_running, a_may_finish))
            finally:
                a_done.set()

    def b():
        with grt.guided(pipe, G["cfg3"]):
            _wait(a_running)
            try:
                with pytest.raises(RuntimeError, match="is already running a guided call in another thread; "
                                   r"diffusers pipelines keep per-call state \(scheduler, timesteps\) on the "
                                   "object: use one pipeline per thread"):
                    _run(pipe)
                tried.wait()
            finally:
                a_may_finish.set()
            _wait(a_done)
            got["b"] = _run(pipe)

    def c():
        _wait(a_running)
        with pytest.raises(RuntimeError, match="already running a guided call in another thread"):
            _run(pipe)
        tried.wait()

    _threads(a, b, c, barriers=[tried])
    assert torch.equal(got["a"], expected["pag"])
    assert torch.equal(got["b"], expected["cfg3"])
    _assert_restored(pipe, before)


def test_call_from_inside_its_own_call_is_refused(pipe, expected):
    """A step callback calling the same pipeline again would reuse the running call's scheduler."""
    before = _state(pipe)

    def again(p, i, t, kwargs):
        _run(p)

    with grt.guided(pipe, G["cfg3"]):
        with pytest.raises(RuntimeError, match=r"already running a guided call in this thread \(this call is "
                                               r"made inside it\)"):
            _run(pipe, callback_on_step_end=again)
        assert torch.equal(_run(pipe), expected["cfg3"])
    _assert_restored(pipe, before)


def test_model_shared_by_two_pipelines(pipe, expected):
    """pipe and twin share every component but the scheduler: their guided calls run interleaved
    (twin's whole call inside one step of pipe's), each with its own Guidance, on the one patched
    model. A pipeline that shares pipe's scheduler too cannot overlap pipe's call."""
    before = _state(pipe)
    components = pipe.components
    twin = StableDiffusionPipeline(**{**components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)},
                                   requires_safety_checker=False)
    same_scheduler = StableDiffusionPipeline(**components, requires_safety_checker=False)
    twin_class = type(twin)
    a_running, a_may_finish, a_done, a_exited = (threading.Event() for _ in range(4))
    got = {}

    def a():
        with grt.guided(pipe, G["pag"]):
            try:
                got["pipe"] = _run(pipe, callback_on_step_end=_pause_at_first_step(a_running, a_may_finish))
            finally:
                a_done.set()
        a_exited.set()

    def b():
        with grt.guided(twin, G["cfg3"]), grt.guided(same_scheduler, G["cfg5"]):
            _wait(a_running)
            try:
                got["twin"] = _run(twin)
                with pytest.raises(RuntimeError, match="shares its scheduler with pipeline StableDiffusionPipeline"):
                    _run(same_scheduler)
            finally:
                a_may_finish.set()
            _wait(a_exited)   # pipe's context closed first: pipe is stock again, twin still guided
            got["pipe stock"] = _run(pipe)
            got["twin again"] = _run(twin)

    _threads(a, b)
    assert torch.equal(got["pipe"], expected["pag"])
    assert torch.equal(got["twin"], expected["cfg3"])
    assert torch.equal(got["pipe stock"], expected["stock"])
    assert torch.equal(got["twin again"], expected["cfg3"])
    assert type(twin) is twin_class and type(same_scheduler) is twin_class
    _assert_restored(pipe, before)


@pytest.mark.parametrize("own_forward", [False, True], ids=["no-instance-forward", "instance-forward"])
def test_restored_after_exception_and_out_of_order_exits(pipe, expected, own_forward):
    """A enters first and leaves first, through an exception raised inside its pipeline call; B
    keeps working and leaves last. The class and the model's own `forward` entry (absent, or an
    instance attribute set before guided()) come back exactly."""
    unet = pipe.unet
    if own_forward:
        stock = type(unet).forward.__get__(unet)
        unet.forward = lambda *args, **kwargs: stock(*args, **kwargs)
    try:
        before = _state(pipe)
        own = unet.__dict__.get("forward")
        a_entered, b_entered, a_exited = threading.Event(), threading.Event(), threading.Event()
        got = {}

        def boom(p, i, t, kwargs):
            raise KeyError("stop inside the call")

        def a():
            try:
                with pytest.raises(KeyError, match="stop inside the call"):
                    with grt.guided(pipe, G["pag"]):
                        a_entered.set()
                        _wait(b_entered)
                        _run(pipe, callback_on_step_end=boom)
            finally:
                a_exited.set()

        def b():
            _wait(a_entered)
            with grt.guided(pipe, G["cfg5"]):
                b_entered.set()
                _wait(a_exited)
                assert unet.__dict__.get("forward") is not own   # still patched for B
                got["b"] = _run(pipe)

        _threads(a, b)
        assert torch.equal(got["b"], expected["cfg5"])
        _assert_restored(pipe, before)
        assert unet.__dict__.get("forward") is own
        assert torch.equal(_run(pipe), expected["stock"])
    finally:
        unet.__dict__.pop("forward", None)
