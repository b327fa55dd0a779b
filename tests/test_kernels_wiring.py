"""The packed forward with the Triton kernels (run by Triton's interpreter on CPU) equals the
sequential reference, every kernel is really launched, and normal rows stay with SDPA."""
import pytest
import torch

import guidance_rt as grt
from guidance_rt import presets

from .conftest import rel
from .tolerance import assert_close

kernels = pytest.importorskip("guidance_rt.kernels")
if not kernels.HAS_TRITON:
    pytest.skip("triton is not installed", allow_module_level=True)
import triton.runtime.interpreter as interpreter  # noqa: E402

# case -> (preset, batch, terms, the kernels its step must launch)
CASES = {
    # SLG forks at u0 before PAG (u3): at u8 the SLG rows sit between rows that run the block,
    # so the runtime gathers and scatters rows
    "tiny-sd15": ("tiny-sd15", 2, [grt.CFG(5.0), grt.SLG(layers=["u0", "u8"], start=0.0),
                                   grt.PAG(beta=0.5, heads=[0], layers="mid"), grt.PAG(layers="u3"),
                                   grt.SEG(sigma=1.0, layers="u4"), grt.SEG(layers="u5"), grt.TPG(layers="d2-d5")],
                  {"_variant_attention_fwd", "_blur_pass", "_token_shuffle", "_copy_rows", "_combine"}),
    # NAG acts in every cross-attention, on every positive row: its own small case, since each
    # interpreted NAG launch costs seconds per row (cond and one PAG branch are enough rows)
    "tiny-sd15-nag": ("tiny-sd15", 1, [grt.CFG(5.0), grt.PAG(layers="u3"), grt.NAG(4.0)],
                      {"_nag_attention_fwd", "_nag_combine", "_combine"}),
    "tiny-sd3": ("tiny-sd3", 2, [grt.CFG(4.0), grt.PAG(layers=5), grt.SEG(layers=3), grt.SEG(sigma=1.0, layers=4),
                                 grt.TPG(layers=6), grt.SLG(layers=[7, 8], start=0.0)],
                 {"_variant_attention_fwd", "_blur_pass", "_token_shuffle", "_combine"}),
    "tiny-flux": ("tiny-flux", 2, [grt.PAG(layers=2), grt.SEG(sigma=1.0, layers="s3"), grt.SEG(layers="s4"),
                                   grt.TPG(layers=[4])],
                  {"_variant_attention_fwd", "_blur_pass", "_token_shuffle", "_combine"}),
    "tiny-flux2": ("tiny-flux2", 2, [grt.PAG(layers=2), grt.SEG(sigma=1.0, layers="s3"), grt.TPG(layers=["s4"])],
                   {"_variant_attention_fwd", "_blur_pass", "_token_shuffle", "_combine"}),
    # per-frame query blur and within-frame shuffles
    "tiny-wan": ("tiny-wan", 1, [grt.CFG(5.0), grt.PAG(layers=3), grt.SEG(sigma=1.0, layers=4), grt.TPG(layers=5)],
                 {"_variant_attention_fwd", "_blur_pass", "_token_shuffle", "_combine"}),
    "tiny-qwenimage": ("tiny-qwenimage", 2, [grt.CFG(4.0), grt.PAG(layers=5), grt.SEG(sigma=1.0, layers=3),
                                             grt.TPG(layers=6)],
                       {"_variant_attention_fwd", "_blur_pass", "_token_shuffle", "_combine"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_packed_forward_with_kernels_equals_reference(tiny_model, case, monkeypatch):
    name, batch, terms, must_launch = CASES[case]
    launched = {}
    run = interpreter.GridExecutor.__call__

    def count(self, *a, **k):
        launched[self.fn.__name__] = launched.get(self.fn.__name__, 0) + 1
        return run(self, *a, **k)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", count)
    model = tiny_model(name)
    # short text: the interpreter runs every program of a launch, so keys cost time, not coverage
    inp = presets.example_inputs(name, batch=batch, height=8, width=8, seed=3, text_len=8)
    guidance = grt.Guidance(*terms)
    kw = dict(cond=inp["cond"], uncond=inp["uncond"], negative=inp["negative"], step=0, num_steps=1)
    with kernels.triton_on_cpu():
        packed = grt.GuidedDenoiser(model, guidance)(inp["sample"], inp["timestep"],
                                                      generator=torch.Generator().manual_seed(0), **kw)
    ref = grt.reference.step(model, guidance, inp["sample"], inp["timestep"],
                             generator=torch.Generator().manual_seed(0), **kw)
    assert rel(packed, ref) < 1e-4
    assert must_launch <= set(launched), f"kernels not launched: {must_launch - set(launched)} ({launched})"


def test_normal_rows_run_sdpa_and_only_variant_rows_the_kernel(monkeypatch):
    """The dispatch sends runs of plain and query-blurred rows to SDPA and only the variant rows
    to the kernel, re-based to their own row range."""
    from guidance_rt import ops
    from guidance_rt.effects import AttnVariant, Segment

    identity, soft = AttnVariant(pag=1.0), AttnVariant(pag=0.5)
    segments = (Segment(0, 4), Segment(4, 6, identity), Segment(6, 8, soft),
                Segment(8, 10, AttnVariant(blur=2.0)), Segment(10, 12, AttnVariant(blur=float("inf"))))
    runs = ops._runs(segments, mean_identical=True)
    assert [(lo, hi) for lo, hi, _ in runs] == [(0, 4), (4, 8), (8, 10), (10, 12)]
    assert runs[0][2] is None and runs[2][2] is None
    assert [(s.start, s.end, s.variant) for s in runs[1][2]] == [(0, 2, identity), (2, 4, soft)]
    assert runs[3][2][0].start == 0
    assert ops._runs(segments, mean_identical=False)[-1][1:] == (12, None)   # the mean: SDPA
    calls = []
    real = kernels.variant_attention
    monkeypatch.setattr(kernels, "variant_attention", lambda q, *a, **k: (calls.append(q.shape[0]), real(q, *a, **k))[1])
    q, k, v = (torch.randn(12, 2, 9, 16) for _ in range(3))
    runs = ops.attention_runs(segments, 2, q.device, mean_identical=True)
    with kernels.triton_on_cpu():
        out = ops.variant_attention(q, k, v, runs)
    assert calls == [4, 2]
    calls.clear()
    expect = ops.variant_attention(q, k, v, runs)   # the ops' PyTorch path
    assert calls == [4, 2]
    assert_close(out, expect)


def test_cpu_default_is_pytorch(tiny_model, monkeypatch):
    """Outside triton_on_cpu() a CPU step never enters a Triton kernel."""
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", lambda *a, **k: pytest.fail("kernel used on CPU"))
    model = tiny_model("tiny-sd15")
    inp = presets.example_inputs("tiny-sd15", height=8, width=8)
    grt.GuidedDenoiser(model, grt.Guidance(grt.CFG(5.0), grt.PAG(layers="mid")))(
        inp["sample"], inp["timestep"], cond=inp["cond"], uncond=inp["uncond"], step=0, num_steps=1)
