"""FLOP floors of the standard configurations at full size, counted on the meta device.

    python benchmarks/flop_floors.py [--preset P[,P...]] [--json FILE] [--markdown FILE]

The floor of a configuration is the FLOPs of its packed step over the FLOPs of its baseline step
(CFG alone; the plain step where the family has no CFG), at a step where every term is on (step
windows opened: a floor is the cost while the terms run), both counted by torch.utils.flop_counter
around one GuidedDenoiser call on a meta-device copy of the full-size model (bench.count_flops:
the perturbed attention and NAG ops count by their own formulas). No weights, no time: any CPU.
Each preset runs its family's standard configurations (guidance_rt.standard) at its default
size (1024x1024 images; Wan at 480x832, 81 frames), batch 1.
"""
from __future__ import annotations

import argparse
import json

import torch

from guidance_rt import bench, presets, spec
from guidance_rt.preset_configs import PRESETS
from guidance_rt.standard import STANDARD


def floors(name: str) -> list[dict]:
    preset = PRESETS[name]
    model = presets.build_model(name, device="meta")
    inp = presets.example_inputs(name, device="meta")
    counted: dict[str, int] = {}
    rows = []
    for family, config, text in STANDARD:
        if family != preset.family:
            continue
        guidance = spec.parse_spec(text)
        for i in range(len(guidance.terms)):
            guidance = guidance.replace(i, start=0.0, stop=1.0)
        baseline = bench.baseline_guidance(guidance)
        try:
            flops = bench.count_flops(model, guidance, inp, 0, 1)
        except (KeyError, ValueError) as e:   # a layer the full-size model lacks (SD1.5 has no d6-d23)
            rows.append({"preset": name, "config": config, "spec": text, "error": str(e)})
            continue
        key = repr(baseline)
        if key not in counted:
            counted[key] = bench.count_flops(model, baseline, inp, 0, 1)
        rows.append({"preset": name, "config": config, "spec": text, "flops": flops,
                     "baseline_flops": counted[key], "floor": flops / counted[key]})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| preset | configuration | TFLOP/step | baseline TFLOP | floor |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['config']} | n/a: {r['error'].splitlines()[0]} | | |")
        else:
            lines.append(f"| {r['preset']} | {r['config']} | {r['flops'] / 1e12:.1f} | "
                         f"{r['baseline_flops'] / 1e12:.1f} | {r['floor']:.3f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default=",".join(n for n, p in PRESETS.items() if not p.tiny))
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    args = ap.parse_args()
    rows = []
    with torch.no_grad():
        for name in args.preset.split(","):
            rows += floors(name)
            print(markdown([r for r in rows if r["preset"] == name]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows))


if __name__ == "__main__":
    main()
