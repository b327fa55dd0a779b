"""guidance_rt.kernels on a CUDA GPU: each kernel at the full shapes of shared/models.md against
what else can compute the same thing, in one process, bf16.

    python benchmarks/bench_kernels.py [--quick] [--out benchmarks/results] [--no-flex]

Shapes (1024^2 images): SDXL self-attention 4096 tokens (10 heads x 64) and 1024 tokens
(20 x 64); SD3 joint attention 4096 image + 333 text tokens (24 x 64); FLUX joint attention
512 text + 4096 image tokens (24 x 128). Three rows per batch: uncond, cond, one perturbed branch
(a CFG + PAG / SEG step at batch 1).

Each measurement is `triton.testing.do_bench` (warm-up first, so compilation and autotuning stay
out; L2 flushed between runs; random inputs, never zeros): median and the 20th / 80th
percentiles in ms. Peers: PyTorch SDPA per backend (flash, cuDNN, memory-efficient), xformers
when importable, FlexAttention (compiled) where it can express the variant, diffusers'
processors' own computations (PAG identity: V as is; MM-DiT PAG: SDPA with the full additive
mask PAGJointAttnProcessor2_0 builds), the PyTorch query blur, the PyTorch guidance formula.

Goals (perf.md, issue 5), each reported as a ratio with its goal:
- NORMAL rows >= 0.9x the best SDPA backend (time ratio best_sdpa / ours);
- IDENTITY rows cost no more than reading V (compared with a device copy of V);
- MEAN rows < 5% of a NORMAL row; finite-blur rows (blur + attention) <= 1.2x a NORMAL row;
- the combine at >= 80% of the measured device copy bandwidth.

Writes benchmarks/results/<device>-kernels.json and .md with the device (nvidia-ml-py: name,
clocks, power, memory), torch / triton / diffusers versions and the git commit measured.
Without CUDA it stops with an error: CPU timings of GPU kernels mean nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import traceback

import torch
import torch.nn.functional as F

DEV = "cuda"          # --cpu-smoke: "cpu" (the script's logic only, see main)
GOALS = {"normal_vs_best_sdpa": 0.9, "identity_vs_copy_v": 1.0, "mean_vs_normal": 0.05,
         "blur_vs_normal": 1.2, "combine_vs_copy_bandwidth": 0.8}


# ---------------------------------------------------------------- environment


def require_cuda():
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py: no CUDA device. These are GPU kernel benchmarks; CPU timings "
                 "of them (Triton's interpreter) are meaningless. Run it on a GPU machine.")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("bench_kernels.py: Triton is not installed (pip install triton)")
    import guidance_rt.kernels as K
    if K.INTERPRET:
        sys.exit("bench_kernels.py: TRITON_INTERPRET=1 is set; unset it to time compiled kernels")


def device_info() -> dict:
    info = {"torch_name": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability()}
    try:
        import pynvml as nv
        nv.nvmlInit()
        h = nv.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        name = nv.nvmlDeviceGetName(h)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        info.update(
            name=name.decode() if isinstance(name, bytes) else name,
            driver=_str(nv.nvmlSystemGetDriverVersion()),
            sm_clock_mhz=nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
            sm_clock_max_mhz=nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM),
            mem_clock_mhz=nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM),
            mem_clock_max_mhz=nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_MEM),
            power_w=nv.nvmlDeviceGetPowerUsage(h) / 1000,
            power_limit_w=nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000,
            temperature_c=nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
            memory_total_gib=mem.total / 2 ** 30, memory_used_gib=mem.used / 2 ** 30)
    except Exception as e:  # the figures are still valid; say why the device data is missing
        info["nvml_error"] = f"{type(e).__name__}: {e} (pip install nvidia-ml-py)"
        info["name"] = info["torch_name"]
    return info


def _str(x):
    return x.decode() if isinstance(x, bytes) else x


def versions() -> dict:
    import triton
    out = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version()}
    for mod in ("diffusers", "xformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


def git_commit() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=root, capture_output=True, text=True).stdout.strip())
        return {"commit": sha, "dirty": dirty}
    except Exception as e:
        return {"commit": None, "error": str(e)}


# ---------------------------------------------------------------- timing


def bench(fn) -> dict:
    """Median and 20 / 80th percentiles (ms) of fn, after warm-up, L2 flushed between runs."""
    if DEV != "cuda":   # --cpu-smoke: one run, to exercise the code; the number means nothing
        import time
        start = time.perf_counter()
        fn()
        ms = (time.perf_counter() - start) * 1e3
        return {"ms": ms, "ms_p20": ms, "ms_p80": ms}
    from triton.testing import do_bench
    fn()
    torch.cuda.synchronize()
    q20, q50, q80 = do_bench(fn, warmup=25, rep=200, quantiles=[0.2, 0.5, 0.8])
    return {"ms": q50, "ms_p20": q20, "ms_p80": q80}


class Results:
    def __init__(self):
        self.rows: list[dict] = []
        self.failures: list[str] = []

    def run(self, group: str, name: str, fn, *, ours: bool = False, flops: float = 0.0,
            bytes_moved: float = 0.0, note: str = ""):
        row = {"group": group, "name": name, "ours": ours, "note": note}
        try:
            row.update(bench(fn))
            if flops:
                row["tflops"] = flops / row["ms"] / 1e9
            if bytes_moved:
                row["gbps"] = bytes_moved / row["ms"] / 1e6
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            if ours:  # our kernels must run: fail the script at the end, loudly
                self.failures.append(f"{group}/{name}: {row['error']}")
                traceback.print_exc()
        self.rows.append(row)
        shown = f"{row['ms']:.4f} ms" if "ms" in row else row["error"]
        print(f"  {group:28s} {name:44s} {shown}", flush=True)
        return row.get("ms")


# ---------------------------------------------------------------- shapes


def full_or_smoke(full, smoke):
    return full if DEV == "cuda" else smoke


def attention_shapes(quick: bool):
    if DEV != "cuda":
        return [("smoke-self", 3, 2, 64, 40, None, (8, 8)),
                ("smoke-joint", 3, 2, 8 + 64, 64, (8, 72), (8, 8))]
    shapes = [
        # name, rows, heads, tokens, head dim, image range (None: self-attention), latent grid
        ("sdxl-4096", 3, 10, 4096, 64, None, (64, 64)),
        ("sdxl-1024", 3, 20, 1024, 64, None, (32, 32)),
        ("sd3-4096+333", 3, 24, 4096 + 333, 64, (0, 4096), (64, 64)),
        ("flux-512+4096", 3, 24, 512 + 4096, 128, (512, 4608), (64, 64)),
    ]
    return shapes[:2] if quick else shapes


def qkv(rows, heads, n, d, dtype=torch.bfloat16):
    # the adapters' layout: (R, N, H, d) memory seen as (R, H, N, d)
    return [torch.randn(rows, n, heads, d, device=DEV, dtype=dtype).transpose(1, 2)
            for _ in range(3)]


def attention_flops(rows, heads, nq, nk, d):
    return 4.0 * rows * heads * nq * nk * d


# ---------------------------------------------------------------- peers


def sdpa_backends():
    from torch.nn.attention import SDPBackend
    return {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}


def sdpa_with(backend, q, k, v, mask=None):
    from torch.nn.attention import sdpa_kernel

    def fn():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return fn


def xformers_fn(q, k, v):
    import xformers.ops as xops
    qx, kx, vx = (t.transpose(1, 2) for t in (q, k, v))     # (B, N, H, d) views
    return lambda: xops.memory_efficient_attention(qx, kx, vx)


def flex_fns(q, k, v, image):
    """FlexAttention (compiled): plain, and PAG's MM-DiT map as a block mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
    out = {"flex-normal": lambda: flex(q, k, v)}
    if image is not None:
        lo, hi = image

        def pag_mask(b, h, q_idx, kv_idx):
            q_img = (q_idx >= lo) & (q_idx < hi)
            k_img = (kv_idx >= lo) & (kv_idx < hi)
            return ~(q_img & k_img) | (q_idx == kv_idx)

        n = q.shape[2]
        mask = create_block_mask(pag_mask, None, None, n, n, device=DEV)
        out["flex-pag-map"] = lambda: flex(q, k, v, block_mask=mask)
    return out


def diffusers_joint_pag(q, k, v, image):
    """PAGJointAttnProcessor2_0's perturbed path: SDPA with a full (N, N) additive mask, -inf on
    image x image except the diagonal (built once here; diffusers builds it every call)."""
    lo, hi = image
    n = q.shape[2]
    mask = torch.zeros(n, n, device=DEV, dtype=q.dtype)
    mask[lo:hi, lo:hi] = float("-inf")
    mask[lo:hi, lo:hi].fill_diagonal_(0)
    mask = mask[None, None]
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ---------------------------------------------------------------- benchmarks


def bench_attention(res: Results, shapes, flex: bool):
    import guidance_rt.kernels as K
    from guidance_rt.kernels.blur import query_blur_torch
    summary = {}
    for name, rows, heads, n, d, image, grid in shapes:
        g = f"attention/{name}"
        q, k, v = qkv(rows, heads, n, d)
        flops = attention_flops(rows, heads, n, n, d)
        lo, hi = image if image is not None else (0, n)
        # every row in one mode (the per-mode cost); device tensors made once, outside the timing
        modes = {m: torch.full((rows,), m, dtype=torch.int32, device=DEV)
                 for m in (K.NORMAL, K.IDENTITY, K.SOFT, K.MEAN)}
        beta = torch.full((rows,), 0.5, device=DEV)
        heads_all = torch.ones(rows, heads, dtype=torch.bool, device=DEV)

        def ours_fn(mode, qq=q):
            return lambda: K.variant_attention(qq, k, v, modes[mode], beta, heads_all, image)

        # correctness at full size before timing anything of ours
        ref = F.scaled_dot_product_attention(q, k, v)
        ours = ours_fn(K.NORMAL)()
        err = ((ours.float() - ref.float()).norm() / ref.float().norm()).item()
        print(f"{g}: normal rows vs SDPA rel. error {err:.2e}")

        sdpa_times = {}
        for bname, backend in sdpa_backends().items():
            t = res.run(g, bname, sdpa_with(backend, q, k, v), flops=flops)
            if t:
                sdpa_times[bname] = t
        try:
            res.run(g, "xformers", xformers_fn(q, k, v), flops=flops)
        except ImportError:
            res.rows.append({"group": g, "name": "xformers", "error": "not installed"})
        if flex:
            try:
                for fname, fn in flex_fns(q, k, v, image).items():
                    res.run(g, fname, fn, flops=flops if fname == "flex-normal" else 0.0)
            except Exception as e:
                res.rows.append({"group": g, "name": "flex", "error": f"{type(e).__name__}: {e}"[:300]})

        t_normal = res.run(g, "ours NORMAL rows", ours_fn(K.NORMAL), ours=True, flops=flops)
        t_ident = res.run(g, "ours IDENTITY rows", ours_fn(K.IDENTITY), ours=True)
        t_soft = res.run(g, "ours SOFT rows (beta 0.5, all heads)", ours_fn(K.SOFT), ours=True)
        qm = q.clone()
        qm[:, :, lo:hi] = q[:, :, lo:hi].float().mean(2, keepdim=True).to(q.dtype)
        # joint layouts: a MEAN row's text queries are normal attention (333 / 512 of them)
        t_mean = res.run(g, "ours MEAN rows", ours_fn(K.MEAN, qm), ours=True,
                         note="" if image is None else "text queries attend normally")
        x = q.transpose(1, 2).reshape(rows, n, heads * d)                  # pre-head-split query
        sigma = 10.0
        blur = lambda: K.query_blur(x, grid[0], grid[1], sigma, lo)
        t_blur = res.run(g, f"ours query_blur (sigma {sigma})", blur, ours=True,
                         bytes_moved=2 * x.numel() * x.element_size())
        res.run(g, f"pytorch query_blur (sigma {sigma})",
                lambda: query_blur_torch(x, grid[0], grid[1], sigma, lo),
                bytes_moved=2 * x.numel() * x.element_size())

        def blur_then_attend():
            xb = K.query_blur(x, grid[0], grid[1], sigma, lo)
            qb = xb.view(rows, n, heads, d).transpose(1, 2)
            return K.variant_attention(qb, k, v, modes[K.NORMAL], beta, heads_all, image)
        t_blur_attn = res.run(g, "ours blur + attention (finite SEG rows)", blur_then_attend, ours=True)

        # peers of the variants
        copy_v = torch.empty_like(v)
        t_copy = res.run(g, "device copy of V (the identity floor)", lambda: copy_v.copy_(v),
                         bytes_moved=2 * v.numel() * v.element_size())
        if image is None:
            res.run(g, "diffusers PAG identity (V as is: no kernel)", lambda: v, note="no work")
        else:
            res.run(g, "diffusers PAGJointAttnProcessor2_0 (SDPA + full mask)",
                    diffusers_joint_pag(q, k, v, image))
        best = min(sdpa_times.values()) if sdpa_times else None
        summary[name] = {
            "rel_error_normal_vs_sdpa": err,
            "best_sdpa": min(sdpa_times, key=sdpa_times.get) if sdpa_times else None,
            "normal_vs_best_sdpa": best / t_normal if best and t_normal else None,
            "identity_vs_copy_v": t_ident / t_copy if t_ident and t_copy else None,
            "soft_vs_normal": t_soft / t_normal if t_soft and t_normal else None,
            "mean_vs_normal": t_mean / t_normal if t_mean and t_normal else None,
            "blur_vs_normal": t_blur_attn / t_normal if t_blur_attn and t_normal else None,
            "blur_alone_vs_normal": t_blur / t_normal if t_blur and t_normal else None,
        }
        del q, k, v, qm, x, ref, ours, copy_v
        torch.cuda.empty_cache()
    return summary


def bench_nag(res: Results, quick: bool):
    """FLUX-sized NAG: image + text queries against [pos text, image] and [neg text, image]."""
    import guidance_rt.kernels as K
    g = "nag/flux-512+4096"
    rows, heads, n, d = full_or_smoke((1, 24, 512 + 4096, 128), (1, 2, 40, 32))
    q, kp, vp = qkv(rows, heads, n, d)
    _, kn, vn = qkv(rows, heads, n, d)
    flops = 2 * attention_flops(rows, heads, n, n, d)
    t_ours = res.run(g, "ours nag_attention", lambda: K.nag_attention(q, kp, vp, kn, vn, 3.0, 2.5, 0.25),
                     ours=True, flops=flops)

    def torch_nag():
        zp = F.scaled_dot_product_attention(q, kp, vp).transpose(1, 2).float()
        zn = F.scaled_dot_product_attention(q, kn, vn).transpose(1, 2).float()
        zt = 3.0 * zp - 2.0 * zn
        r = zt.abs().sum((2, 3), keepdim=True) / zp.abs().sum((2, 3), keepdim=True)
        z = zt * (r.clamp(max=2.5) / r)
        return (0.25 * z + 0.75 * zp).to(q.dtype)
    t_torch = res.run(g, "pytorch: 2 x SDPA + blend", torch_nag, flops=flops)
    t_sdpa = res.run(g, "2 x SDPA alone (floor of the unfused form)",
                     lambda: (F.scaled_dot_product_attention(q, kp, vp),
                              F.scaled_dot_product_attention(q, kn, vn)), flops=flops)
    return {"nag_vs_torch": t_torch / t_ours if t_ours and t_torch else None,
            "nag_vs_two_sdpa": t_sdpa / t_ours if t_ours and t_sdpa else None}


def bench_memory_ops(res: Results, quick: bool):
    import guidance_rt.kernels as K
    out = {}
    # device copy bandwidth: the reference for the memory-bound kernels
    big = torch.randn(full_or_smoke(256 * 2 ** 20 // 2, 4096), device=DEV, dtype=torch.bfloat16)  # 256 MiB
    dst = torch.empty_like(big)
    t = res.run("memory", "device copy 256 MiB", lambda: dst.copy_(big),
                bytes_moved=2 * big.numel() * big.element_size())
    copy_gbps = 2 * big.numel() * big.element_size() / t / 1e6
    out["copy_gbps"] = copy_gbps
    del big, dst

    # TPG token shuffle on SDXL's d6-d23 blocks: 4096 tokens x 640 and 1024 x 1280, 3 rows
    for n, c in full_or_smoke(((4096, 640), (1024, 1280)), ((40, 24),)):
        g = f"token_shuffle/{n}x{c}"
        x = torch.randn(3, n, c, device=DEV, dtype=torch.bfloat16)
        perms = torch.stack([torch.randperm(n, device=DEV) for _ in range(2)])
        table = torch.tensor([-1, -1, 0], device=DEV)
        moved = 2 * x.numel() * x.element_size()
        res.run(g, "ours token_shuffle", lambda: K.token_shuffle(x, perms, table), ours=True,
                bytes_moved=moved)
        res.run(g, "pytorch index_select (shuffled rows) + clone",
                lambda: x.clone().index_copy_(0, torch.tensor([2], device=DEV),
                                              x[2:].index_select(1, perms[0])), bytes_moved=moved)

    # SLG-style row subsets: rows [0, 1, 3] of 4 SD3 joint hidden states (4429 tokens x 1536)
    n, c = full_or_smoke((4429, 1536), (20, 24))
    g = f"rows/sd3-4x{n}x{c}"
    x = torch.randn(4, n, c, device=DEV, dtype=torch.bfloat16)
    idx = torch.tensor([0, 1, 3], device=DEV)
    src = torch.randn(3, n, c, device=DEV, dtype=torch.bfloat16)
    row_bytes = x[0].numel() * x.element_size()
    res.run(g, "ours gather_rows", lambda: K.gather_rows(x, idx), ours=True, bytes_moved=6 * row_bytes)
    res.run(g, "pytorch index_select", lambda: x.index_select(0, idx), bytes_moved=6 * row_bytes)
    res.run(g, "ours scatter_rows", lambda: K.scatter_rows(x, idx, src), ours=True, bytes_moved=8 * row_bytes)
    res.run(g, "pytorch clone + index_copy_", lambda: x.clone().index_copy_(0, idx, src),
            bytes_moved=8 * row_bytes)

    # the guidance combine: CFG + 1 branch (3 rows per sample), with and without rescale; the
    # real latents are small (launch-bound), so also a large batch for the bandwidth goal
    from guidance_rt.kernels.combine import guidance_combine_torch
    cases = full_or_smoke([("sdxl-latent b1", 1, (4, 128, 128)), ("flux-latent b1", 1, (4096, 64)),
                           ("sdxl-latent b64", 64, (4, 128, 128))], [("smoke b2", 2, (4, 8, 8))])
    for label, b, shape in cases:
        g = f"combine/{label}"
        preds = torch.randn(3 * b, *shape, device=DEV, dtype=torch.bfloat16)
        w = K.combine_weights(5.0, [3.0], DEV)
        moved = (3 * b + b) * preds[0].numel() * preds.element_size()
        t = res.run(g, "ours guidance_combine", lambda: K.guidance_combine(preds, w, b, True),
                    ours=True, bytes_moved=moved)
        res.run(g, "pytorch formula", lambda: guidance_combine_torch(preds, w, b, True, 0.0, None),
                bytes_moved=moved)
        res.run(g, "ours guidance_combine + rescale 0.7",
                lambda: K.guidance_combine(preds, w, b, True, 0.7), ours=True)
        res.run(g, "pytorch formula + rescale 0.7",
                lambda: guidance_combine_torch(preds, w, b, True, 0.7, None))
        if t:
            out[f"combine_vs_copy_bandwidth[{label}]"] = moved / t / 1e6 / copy_gbps
    return out


# ---------------------------------------------------------------- report


def write(results: Results, summary: dict, meta: dict, out_dir: str):
    os.makedirs(out_dir, exist_ok=True)
    dev = re.sub(r"[^A-Za-z0-9]+", "-", meta["device"].get("name", DEV)).strip("-").lower()
    stem = os.path.join(out_dir, f"{dev}-kernels")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "goals": GOALS, "summary": summary, "rows": results.rows}, f,
                  indent=1, default=str)
    lines = [f"# guidance_rt.kernels on {meta['device'].get('name')}", "",
             f"commit {meta['git'].get('commit')}{' (dirty)' if meta['git'].get('dirty') else ''}, "
             f"{meta['date']}; torch {meta['versions']['torch']}, triton {meta['versions']['triton']}, "
             f"CUDA {meta['versions']['cuda']}; bf16; do_bench medians (ms).", "",
             "## Goals", "", "| shape | measure | value | goal |", "|---|---|---|---|"]
    for shape, vals in summary.items():
        for key, val in vals.items():
            goal = next((g for k, g in GOALS.items() if key.startswith(k)), None)
            if isinstance(val, float):
                shown = f"{val:.3g}"
                if goal is not None:
                    ok = val >= goal if key in ("normal_vs_best_sdpa",) or key.startswith("combine") \
                        else val <= goal
                    shown += " ok" if ok else " MISSED"
                lines.append(f"| {shape} | {key} | {shown} | {goal if goal is not None else ''} |")
            elif val is not None:
                lines.append(f"| {shape} | {key} | {val} | |")
    lines += ["", "## Every measurement", "", "| group | implementation | ms | p20-p80 | TFLOP/s | GB/s |",
              "|---|---|---|---|---|---|"]
    for r in results.rows:
        if "ms" in r:
            tflops = f"{r['tflops']:.1f}" if "tflops" in r else ""
            gbps = f"{r['gbps']:.0f}" if "gbps" in r else ""
            lines.append(f"| {r['group']} | {r['name']}{' (ours)' if r.get('ours') else ''} | "
                         f"{r['ms']:.4f} | {r['ms_p20']:.4f}-{r['ms_p80']:.4f} | {tflops} | {gbps} |")
        else:
            lines.append(f"| {r['group']} | {r['name']} | {r.get('error', '')} | | | |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return stem


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="SDXL shapes only")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (slow to compile)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="developers only: run the script's code on tiny CPU shapes in Triton's "
                         "interpreter (timings meaningless, no peers that need CUDA)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    global DEV
    if args.cpu_smoke:
        DEV = "cpu"
        import guidance_rt.kernels as K
        with K.triton_on_cpu():
            return run(args)
    require_cuda()
    return run(args)


def run(args):
    torch.manual_seed(0)
    meta = {"device": device_info() if DEV == "cuda" else {"name": "cpu-smoke"},
            "versions": versions(), "git": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv[1:]}
    print(json.dumps(meta, indent=1, default=str))
    res = Results()
    summary = {}
    summary.update({f"attention/{k}": v for k, v in
                    bench_attention(res, attention_shapes(args.quick),
                                    not args.no_flex and DEV == "cuda").items()})
    summary["nag/flux"] = bench_nag(res, args.quick)
    summary["memory"] = bench_memory_ops(res, args.quick)
    if DEV == "cuda":
        meta["device_after"] = device_info()          # clocks and power after the run
    stem = write(res, summary, meta, args.out)
    print(f"wrote {stem}.json and {stem}.md")
    if res.failures:
        print("FAILED (our kernels):\n  " + "\n  ".join(res.failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
