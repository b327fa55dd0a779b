"""CFG + PAG(mid) per-step denoiser call: guidance-rt packed vs diffusers' StableDiffusionXLPAGPipeline
(its own PAG attention processors on one [uncond, cond, cond] batch), same model, same inputs,
same process. Also counts the block-row executions that prefix sharing saves.

    python benchmarks/pag_vs_diffusers.py [--preset tiny-sdxl] [--repeats 20] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from diffusers import StableDiffusionXLPAGPipeline

import guidance_rt as grt
from guidance_rt import presets
from guidance_rt.families import enumerate_layers


def timed(fn, repeats, device):
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny-sdxl")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--height", type=int, help="latent height (default: the preset's)")
    ap.add_argument("--width", type=int, help="latent width (default: the preset's)")
    ap.add_argument("--json")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    unet = presets.build_model(args.preset, dtype=dtype, device=device)
    inp = presets.example_inputs(args.preset, batch=args.batch, dtype=dtype, device=device,
                                 height=args.height, width=args.width)
    x, t, c, u = inp["sample"], inp["timestep"], inp["cond"], inp["uncond"]
    w, s = 5.0, 3.0

    den = grt.GuidedDenoiser(unet, grt.Guidance(grt.CFG(w), grt.PAG(s, layers="mid")))
    den_cfg = grt.GuidedDenoiser(unet, grt.Guidance(grt.CFG(w)))
    ours = lambda: den(x, t, cond=c, uncond=u, step=0, num_steps=1)
    ours_cfg = lambda: den_cfg(x, t, cond=c, uncond=u, step=0, num_steps=1)

    # the peer: diffusers' PAG pipeline installs its processors and runs one batch of 3B rows
    peer = StableDiffusionXLPAGPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                        tokenizer_2=None, unet=unet, scheduler=None,
                                        pag_applied_layers=["mid"])
    original = unet.attn_processors
    cat3 = lambda a, b: torch.cat([a, b, b])
    ehs = cat3(u["encoder_hidden_states"], c["encoder_hidden_states"])
    added = {k: cat3(u["added_cond_kwargs"][k], c["added_cond_kwargs"][k]) for k in c["added_cond_kwargs"]}
    tt = t.repeat(3)

    def peer_step():
        with torch.no_grad():
            out = unet(torch.cat([x] * 3), tt, encoder_hidden_states=ehs, added_cond_kwargs=added,
                       return_dict=False)[0]
        eu, ec, ep = out.chunk(3)
        return eu + w * (ec - eu) + s * (ec - ep)

    def peer_cfg():
        with torch.no_grad():
            out = unet(torch.cat([x] * 2), t.repeat(2), encoder_hidden_states=ehs[: 2 * args.batch],
                       added_cond_kwargs={k: v[: 2 * args.batch] for k, v in added.items()},
                       return_dict=False)[0]
        eu, ec = out.chunk(2)
        return eu + w * (ec - eu)

    res = {"device": str(device), "preset": args.preset, "batch": args.batch, "dtype": args.dtype,
           "latent": list(inp["sample"].shape[-2:]),
           "torch": torch.__version__, "threads": torch.get_num_threads()}
    res["grt_cfg_ms"] = timed(ours_cfg, args.repeats, device)
    res["grt_cfg_pag_ms"] = timed(ours, args.repeats, device)
    res["peer_cfg_ms"] = timed(peer_cfg, args.repeats, device)
    mine = ours()
    peer._set_pag_attn_processor(pag_applied_layers=["mid"], do_classifier_free_guidance=True)
    try:
        res["peer_cfg_pag_ms"] = timed(peer_step, args.repeats, device)
        theirs = peer_step()
        diff = ((mine - theirs).double().norm() / theirs.double().norm()).item()
    finally:
        unet.set_attn_processor(original)
    res["relative_difference"] = diff

    den.adapter.trace = {}
    ours()
    n_blocks = len(enumerate_layers(unet))
    res["block_rows_packed"] = sum(den.adapter.trace.values())
    res["block_rows_naive"] = 3 * args.batch * n_blocks
    res["speedup_vs_peer"] = res["peer_cfg_pag_ms"][0] / res["grt_cfg_pag_ms"][0]
    res["grt_ratio_to_cfg"] = res["grt_cfg_pag_ms"][0] / res["grt_cfg_ms"][0]
    res["peer_ratio_to_cfg"] = res["peer_cfg_pag_ms"][0] / res["peer_cfg_ms"][0]
    for k, v in res.items():
        print(f"{k:22s} {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
