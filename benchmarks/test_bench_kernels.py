"""pytest-benchmark suite: the per-row attention variants behind guidance_rt.ops (PAG
identity, SoftPAG, SEG mean / blur queries) against plain SDPA and, on CUDA, each SDPA backend
(flash, efficient, cuDNN, math). extra_info carries FLOPs and bytes per call, so TFLOP/s and
GB/s follow from the timings. CI runs each once on small shapes; on a GPU the shapes are SDXL's
at 1024^2:

    python -m pytest benchmarks/test_bench_kernels.py --benchmark-enable
"""
import pytest
import torch

from guidance_rt import ops
from guidance_rt.effects import AttnVariant, Segment

from _common import DEVICE, DTYPE, synced

# (rows, heads, tokens, head dim, grid): SDXL's attention shapes at 1024^2 on a GPU (3 rows: one
# perturbed branch at batch 1 is one row; 3 rows = a batch of 3); tiny ones elsewhere
SHAPES = ([(3, 10, 4096, 64, (64, 64)), (3, 20, 1024, 64, (32, 32))] if DEVICE.type == "cuda"
          else [(2, 2, 64, 16, (8, 8))])
VARIANTS = {
    "sdpa": None,
    "pag-identity": AttnVariant(pag=1.0),
    "softpag-0.5": AttnVariant(pag=0.5),
    "seg-mean": AttnVariant(blur=float("inf")),
    "seg-blur-2": AttnVariant(blur=2.0),
}


def _qkv(rows, heads, n, d):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    return [torch.randn(rows, heads, n, d, generator=g, device=DEVICE, dtype=DTYPE) for _ in range(3)]


def _variant(name, rows, heads, n, d, grid):
    q, k, v = _qkv(rows, heads, n, d)
    variant = VARIANTS[name]
    if variant is None:
        return lambda: ops.sdpa(q, k, v)
    seg = Segment(0, rows, variant)
    # the op's row tables are built once per step configuration, as the plan does
    runs = ops.attention_runs((seg,), heads, DEVICE, mean_identical=variant.mean)
    if variant.blur:   # the query perturbation works on tokens before the head split
        def run():
            tokens = q.transpose(1, 2).reshape(rows, n, heads * d)
            qq = ops.blur_queries(tokens, (seg,), grid, slice(None))
            qq = qq.reshape(rows, n, heads, d).transpose(1, 2)
            return ops.variant_attention(qq, k, v, runs)
        return run
    return lambda: ops.variant_attention(q, k, v, runs)


def _info(benchmark, rows, heads, n, d, dense: bool):
    size = torch.tensor([], dtype=DTYPE).element_size()
    benchmark.extra_info.update(
        shape=[rows, heads, n, d], dtype=str(DTYPE),
        flops=4 * rows * heads * n * n * d if dense else 0,
        bytes=4 * rows * heads * n * d * size)   # q, k, v in, out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant(benchmark, name, shape):
    rows, heads, n, d, grid = shape
    fn = synced(_variant(name, rows, heads, n, d, grid))
    benchmark.group = f"attention {'x'.join(map(str, shape[:4]))}"
    _info(benchmark, rows, heads, n, d, dense=name not in ("pag-identity",))
    with torch.no_grad():
        out = benchmark(fn)
    assert out.shape == (rows, heads, n, d) and torch.isfinite(out).all()


BACKENDS = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]


@pytest.mark.skipif(DEVICE.type != "cuda", reason="SDPA backends are compared on CUDA")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_backend(benchmark, backend, shape):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows, heads, n, d, _ = shape
    q, k, v = _qkv(rows, heads, n, d)
    benchmark.group = f"attention {'x'.join(map(str, shape[:4]))}"
    _info(benchmark, rows, heads, n, d, dense=True)
    with sdpa_kernel(getattr(SDPBackend, backend)), torch.no_grad():
        try:
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
        except RuntimeError as e:
            pytest.skip(f"{backend} unavailable here: {e}".splitlines()[0])
        benchmark(synced(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)))
