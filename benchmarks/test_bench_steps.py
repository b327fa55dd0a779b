"""pytest-benchmark suite: one guided step per (preset, standard configuration, implementation),
on the harness of `guidance-rt bench` (guidance_rt.bench.PREPARE). Groups compare the
implementations of one configuration. CI runs each once (--benchmark-disable); on a GPU:

    GRT_BENCH_PRESETS=sdxl,sd3-medium python -m pytest benchmarks/test_bench_steps.py --benchmark-enable
"""
import itertools

import pytest
import torch

from guidance_rt import bench, presets

from _common import BATCH, DEVICE, DTYPE, PRESETS, synced

STEPS = 30


def _cases():
    for name in PRESETS:
        family = presets.get_preset(name).family
        for config in bench.ordered_configs(bench.standard_configs(family)):
            for impl in bench.IMPLEMENTATIONS:
                yield name, config, impl


CASES = list(_cases())


@pytest.mark.parametrize("preset,config,impl", CASES,
                         ids=[f"{p}-{c.name}-{i}" for p, c, i in CASES])
def test_step(benchmark, bench_target, preset, config, impl):
    target, inputs = bench_target(preset)
    g = config.guidance
    ctx = bench.Ctx(target, STEPS, bench.probe_step(g, STEPS), 0, DTYPE, DEVICE)
    try:
        prepared = bench.PREPARE[impl](ctx, g)
    except bench.Unsupported as e:
        pytest.skip(f"{impl} does not offer {config.name}: {e}")
    benchmark.group = f"{preset} b{BATCH} {config.name}"
    benchmark.extra_info.update(preset=preset, config=config.spec, implementation=impl, batch=BATCH,
                                dtype=str(DTYPE), step=ctx.step, steps=STEPS)
    rotating = itertools.cycle(inputs)
    fn = synced(prepared.fn)
    with prepared.active(), torch.no_grad():
        try:
            fn(inputs[0])
        except Exception as e:
            if impl in bench.OURS:
                raise
            pytest.skip(f"peer {impl} is missing: {bench._short(e)}")
        out = benchmark(lambda: fn(next(rotating)))
    assert torch.isfinite(out).all()
