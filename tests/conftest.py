import os

import pytest
import torch

import guidance_rt as grt
from guidance_rt import presets

# tiny models: one intra-op thread is fastest, and stays fast when the 2 CI cores are shared
torch.set_num_threads(1)


def pytest_configure(config):
    """Interpreted Triton kernels raise on any load or store outside their tensor arguments.
    Kernel self-checks are off (tests/test_kernels_selfcheck.py turns them on): the kernel tests
    test the kernels, which a failed self-check would quietly replace with PyTorch."""
    os.environ.setdefault("GUIDANCE_RT_KERNEL_SELFCHECK", "0")
    try:
        import triton.runtime.interpreter  # noqa: F401
    except ImportError:
        return
    from .interpreter_bounds import install
    install()


@pytest.fixture(scope="session")
def tiny_model():
    """Tiny preset models, built once per session (tests never modify them)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = presets.build_model(name)
        return cache[name]

    return get


def guider_prediction(guider, step: int, num_steps: int, timestep, cond: torch.Tensor, uncond: torch.Tensor):
    """A diffusers guider's prediction from the cond and uncond predictions of a step, fed as the
    modular pipelines feed it (set_state, prepare_inputs, one noise_pred per batch)."""
    guider.set_state(step=step, num_inference_steps=num_steps, timestep=timestep)
    batches = guider.prepare_inputs({})
    for batch, pred in zip(batches, (cond, uncond)):     # _input_predictions: cond, uncond
        batch.noise_pred = pred
    return guider(batches).pred


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def model_state(model) -> dict:
    """Everything guidance-rt must leave untouched on a model."""
    procs = {n: (type(m.processor), id(m.processor)) for n, m in model.named_modules() if hasattr(m, "processor")}
    hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}
    forwards = {n: ("forward" in m.__dict__) for n, m in model.named_modules()}
    return {"procs": procs, "hooks": hooks, "forwards": forwards, "training": model.training,
            "params": {n: p.data_ptr() for n, p in model.named_parameters()}}


def packed_and_reference(model, guidance, inp: dict, seed: int = 0):
    """One step of presets.example_inputs `inp` (step 0 of 1), packed and by the sequential
    reference, with TPG's generator seeded alike."""
    kw = dict(cond=inp["cond"], uncond=inp["uncond"], negative=inp["negative"], step=0, num_steps=1)
    packed = grt.GuidedDenoiser(model, guidance)(inp["sample"], inp["timestep"],
                                                  generator=torch.Generator().manual_seed(seed), **kw)
    ref = grt.reference.step(model, guidance, inp["sample"], inp["timestep"],
                             generator=torch.Generator().manual_seed(seed), **kw)
    return packed, ref
