"""CPU (or GPU) per-step cost of NAG and S-CFG relative to CFG alone, packed, same process.

    python benchmarks/nag_scfg_cost.py [--repeats 20] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import guidance_rt as grt
from guidance_rt import presets

CONFIGS = {
    "tiny-sdxl": {"CFG": [grt.CFG(5.0)], "CFG+NAG": [grt.CFG(5.0), grt.NAG(5.0)], "SCFG": [grt.SCFG(5.0)]},
    "tiny-flux": {"plain": [], "NAG": [grt.NAG(5.0)], "CFG": [grt.CFG(3.0)], "CFG+NAG": [grt.CFG(3.0), grt.NAG(5.0)]},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "presets": {}}
    for preset, configs in CONFIGS.items():
        model = presets.build_model(preset)
        inp = presets.example_inputs(preset, height=32, width=32)
        kw = dict(cond=inp["cond"], uncond=inp["uncond"], negative=inp["negative"], step=0, num_steps=1)
        dens = {name: grt.GuidedDenoiser(model, grt.Guidance(*terms)) for name, terms in configs.items()}
        times = {name: [] for name in configs}
        for den in dens.values():
            den(inp["sample"], inp["timestep"], **kw)
        for _ in range(args.repeats):   # interleaved, so drift hits every configuration alike
            for name, den in dens.items():
                t0 = time.perf_counter()
                den(inp["sample"], inp["timestep"], **kw)
                times[name].append((time.perf_counter() - t0) * 1e3)
        base = statistics.median(times[next(iter(configs))])
        rows = {name: {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t),
                       "ratio": statistics.median(t) / base} for name, t in times.items()}
        results["presets"][preset] = rows
        for name, r in rows.items():
            print(f"{preset:10s} {name:10s} {r['median_ms']:8.1f} ms  x{r['ratio']:.2f} "
                  f"(min {r['min_ms']:.1f}, max {r['max_ms']:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
