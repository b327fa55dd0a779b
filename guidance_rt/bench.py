"""Step timing of the packed runtime against the sequential reference on a preset.

The CPU default is a smoke-sized run that shows what a guided step costs relative to a CFG-only
step; absolute CPU times say nothing about a GPU (see shared/perf.md).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from . import presets, reference
from .denoiser import GuidedDenoiser
from .terms import CFG, PAG, SEG, SLG, TPG, Guidance

# the standard configurations, per family (methods.md defaults)
CONFIGS = {
    "unet": {
        "CFG": Guidance(CFG(5.0)),
        "CFG+PAG(mid)": Guidance(CFG(5.0), PAG(3.0, layers="mid")),
        "CFG+SEG(mid,inf)": Guidance(CFG(5.0), SEG(3.0, layers="mid")),
        "CFG+SEG(mid,sigma2)": Guidance(CFG(5.0), SEG(3.0, sigma=2.0, layers="mid")),
        "CFG+TPG(d6-d23)": Guidance(CFG(5.0), TPG(3.0, layers="d6-d23")),
    },
    "sd3": {
        "CFG": Guidance(CFG(4.0)),
        "CFG+SLG[7,8,9]": Guidance(CFG(4.0), SLG(2.8, layers=[7, 8, 9], start=0.0, stop=1.0)),
        "CFG+PAG": Guidance(CFG(4.0), PAG(3.0, layers="1")),
    },
    "flux": {
        "plain": Guidance(),
        "SLG[7,8,9]": Guidance(SLG(2.8, layers=[7, 8, 9], start=0.0, stop=1.0)),
    },
}


@dataclass
class Row:
    config: str
    implementation: str
    median_ms: float
    spread_ms: float
    ratio: float | None = None


def _time(fn, repeats: int, device) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def run(preset: str = "tiny-sdxl", configs: list[str] | None = None, steps: int = 3, batch: int = 1,
        device: str | None = None, dtype: torch.dtype = torch.float32, seed: int = 0, log=print) -> list[Row]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = presets.build_model(preset, dtype=dtype, device=dev, seed=seed)
    family = presets.get_preset(preset).family
    chosen = configs or list(CONFIGS[family])
    unknown = [c for c in chosen if c not in CONFIGS[family]]
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown} for {family}; valid: {list(CONFIGS[family])}")
    inputs = presets.example_inputs(preset, batch=batch, dtype=dtype, device=dev, seed=seed)
    log(f"guidance-rt bench: preset {preset} ({family}) on {dev}, batch {batch}, "
        f"latent {inputs['height']}x{inputs['width']}, {steps} timed steps per implementation")
    rows: list[Row] = []
    baseline: dict[str, float] = {}
    for name in chosen:
        guidance = CONFIGS[family][name]
        den = GuidedDenoiser(model, guidance)
        kwargs = dict(cond=inputs["cond"], uncond=inputs["uncond"], step=0, num_steps=1)
        impls = {
            "packed": lambda: den(inputs["sample"], inputs["timestep"], generator=torch.Generator().manual_seed(seed), **kwargs),
            "sequential": lambda: reference.step(model, guidance, inputs["sample"], inputs["timestep"],
                                                 generator=torch.Generator().manual_seed(seed), **kwargs),
        }
        for impl, fn in impls.items():
            with torch.no_grad():
                fn()  # warm-up
                times = _time(fn, steps, dev)
            med = statistics.median(times)
            spread = (max(times) - min(times)) if len(times) > 1 else 0.0
            if name == chosen[0]:
                baseline[impl] = med
            row = Row(name, impl, med, spread, med / baseline[impl] if impl in baseline else None)
            rows.append(row)
            log(f"  {name:22s} {impl:10s} step {med:9.2f} ms (spread {spread:.2f})"
                + (f"  x{row.ratio:.2f} vs {chosen[0]}" if row.ratio is not None else "")
                + "  per step: " + ", ".join(f"{t:.1f}" for t in times))
    return rows
