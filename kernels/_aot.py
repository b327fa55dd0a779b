"""Ahead-of-time checks of the CUDA path on a machine without a GPU.

    GUIDANCE_RT_TRITON_JIT=1 python -m guidance_rt.kernels._aot [--quick] [--json FILE]

1. Traces every op with fake CUDA tensors through AOTAutograd (what torch.compile does), so each
   `triton_op` decomposes into its Triton kernel launches exactly as it would on a GPU: same tile
   sizes, grids and arguments. This proves the CUDA branch of each op is traceable and finds
   its launches without running anything.
2. Compiles every traced launch for sm_90 (H100) with Triton's own ptxas, with the launch's
   argument specialisation (unit strides, 16-byte alignment), and reads the registers, spill
   stack and shared memory of the cubin. A launch that needs more than the 227 KB of shared
   memory an H100 block may have fails, and so does a bf16/fp16 launch that spills registers
   (fp32 is a correctness path: its spills are reported).

It says nothing about speed: benchmarks/bench_kernels.py measures that on a GPU.
GUIDANCE_RT_TRITON_JIT=1 is needed because without CUDA the kernels are otherwise built for the
interpreter (kernels/_common.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

H100_SHARED = 232448          # bytes of shared memory one block may use on sm_90


def _step(K, img):
    """Every op once, on the shapes of `_inputs`."""

    def step(q, k, v, mode, beta, head_mask, perms, table, index, preds, weights, kn, vn, rate,
             key_mask, text_mask):
        rows, heads, n, d = q.shape
        x = q.transpose(1, 2).reshape(rows, n, heads * d)
        xb = K.query_blur(x, 64, (img[1] - img[0]) // 64, 3.0, img[0])
        xm = K.query_blur(x, 64, (img[1] - img[0]) // 64, 1e7, img[0])
        xs = K.token_shuffle(xb + xm, perms, table, img[0])
        qb = xs.view(rows, n, heads, d).transpose(1, 2)
        o = K.variant_attention(qb, k, v, mode, beta, head_mask, img)
        o2 = K.variant_attention(qb, k, v, mode, beta, head_mask, (0, n))
        o3 = K.variant_attention(qb, k, v, mode, beta, head_mask, img, key_mask)   # HAS_KMASK
        z = K.nag_attention(qb, k, v, kn, vn, 3.0, 2.5, 0.5, 1)
        zj = K.nag_attention(qb, kn, vn, kn, vn, 3.0, 2.5, 0.5, 1, k, v)   # joint: HAS_SHARED
        zm = K.nag_attention(qb, kn, vn, kn, vn, 3.0, 2.5, 0.5, 1, k, v, text_mask, text_mask)
        g = K.gather_rows(o + o2 + o3 + z + zj + zm, index)
        s = K.scatter_rows(o, index, g)
        e1 = K.guidance_combine(preds * s.mean(), weights, 1, True, 0.5, rate)
        e2 = K.guidance_combine(preds, weights, 1, True, 0.0, None)
        return e1 + e2

    return step


def _inputs(d: int, dtype: torch.dtype, device: str):
    # the shapes only set tile choices and grids (fake tensors): SDXL-sized, 64 x 64 latents
    # between 12 + 12 text tokens (joint attention) and a 77-token negative text for NAG
    rows, heads, n, text = 4, 2, 64 * 64 + 24, 24
    img = (text // 2, text // 2 + 64 * 64)
    mk = lambda *s, dt=dtype: torch.empty(*s, dtype=dt, device=device)
    qkv = [mk(rows, n, heads, d).transpose(1, 2) for _ in range(3)]
    neg = [mk(rows, 77, heads, d).transpose(1, 2) for _ in range(2)]
    args = (*qkv, mk(rows, dt=torch.int32), mk(rows, dt=torch.float32),
            mk(rows, heads, dt=torch.bool), mk(2, img[1] - img[0], dt=torch.int64),
            mk(rows, dt=torch.int64), mk(2, dt=torch.int64), mk(3, 4, 128, 128, dt=dtype),
            mk(2, dt=torch.float32), *neg, mk(1, 1, 128, 128, dt=torch.float32),
            mk(rows, n, dt=torch.bool), mk(rows, 77, dt=torch.bool))
    return args, img


def trace_cuda_launches(d: int, dtype: torch.dtype):
    """The Triton launches (kernel, arguments, num_warps, num_stages) every op makes on CUDA."""
    from torch._functorch.aot_autograd import aot_export_module
    from torch._higher_order_ops.triton_kernel_wrap import (kernel_side_table,
                                                            triton_kernel_wrapper_functional)
    from torch._subclasses.fake_tensor import FakeTensorMode

    import guidance_rt.kernels as K

    with FakeTensorMode():
        args, img = _inputs(d, dtype, "cuda")
    step = _step(K, img)

    class Step(torch.nn.Module):
        def forward(self, *a):
            return (step(*a),)

    with torch.no_grad():
        gm, _ = aot_export_module(Step(), args, trace_joint=False)
    launches = []
    for node in gm.graph.nodes:
        if node.target is not triton_kernel_wrapper_functional:
            continue
        kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
        config = kernel.configs[0] if hasattr(kernel, "configs") else None
        jit_fn = kernel.fn if config is not None else kernel
        kwargs = dict(kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"]))
        for name, value in node.kwargs["kwargs"].items():
            kwargs[name] = value.meta["val"] if isinstance(value, torch.fx.Node) else value
        launches.append(dict(kernel=jit_fn, kwargs=kwargs, grid=node.kwargs["grid"],
                             num_warps=getattr(config, "num_warps", 4),
                             num_stages=getattr(config, "num_stages", 3)))
    return launches


def compile_launch(launch: dict, arch: int = 90) -> dict:
    """Compile one traced launch for `arch` with the launch's specialisation; cubin resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch["kernel"]
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    # fake tensors have no storage: real 16-byte aligned stand-ins give the pointer types
    kwargs = {k: (torch.empty(1, dtype=v.dtype) if isinstance(v, torch.Tensor) else v)
              for k, v in launch["kwargs"].items()}
    kwargs.update(num_warps=launch["num_warps"], num_stages=launch["num_stages"])
    bound, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                              specialization, options)
    start = time.time()
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                            "cuobjdump")
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    constexpr = {p.name: kwargs[p.name] for p in kernel.params if p.is_constexpr}
    return dict(kernel=kernel.__name__, constexprs={k: str(v) for k, v in constexpr.items()},
                num_warps=launch["num_warps"], num_stages=launch["num_stages"],
                registers=int(re.search(r"REG:(\d+)", usage).group(1)),
                spill_stack=int(re.search(r"STACK:(\d+)", usage).group(1)),
                shared=compiled.metadata.shared, seconds=round(time.time() - start, 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="head dims 64 and 128, bf16 only")
    ap.add_argument("--cases", help="head_dim:dtype list, e.g. 40:bfloat16,64:float32")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    from ._common import INTERPRET
    if INTERPRET:
        print("the kernels are built for the interpreter: run with GUIDANCE_RT_TRITON_JIT=1",
              file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cases = [(64, torch.bfloat16), (128, torch.bfloat16)] if args.quick else \
        [(d, dt) for d in (40, 64, 80, 128, 160) for dt in (torch.bfloat16, torch.float16)] + \
        [(64, torch.float32)]
    if args.cases:
        cases = [(int(c.split(":")[0]), getattr(torch, c.split(":")[1])) for c in args.cases.split(",")]
    results, seen, failures = [], set(), []
    for d, dtype in cases:
        for launch in trace_cuda_launches(d, dtype):
            key = (launch["kernel"].__name__, d, str(dtype),
                   tuple(sorted((k, str(v)) for k, v in launch["kwargs"].items()
                                if not isinstance(v, torch.Tensor) and k.isupper())))
            if key in seen:
                continue
            seen.add(key)
            res = dict(head_dim=d, dtype=str(dtype).replace("torch.", ""), **compile_launch(launch))
            results.append(res)
            # fp32 (3xTF32 dots) is a correctness path: its spills are reported, not failed
            bad = res["shared"] > H100_SHARED or (res["spill_stack"] > 0 and dtype != torch.float32)
            failures += [res] if bad else []
            print(("FAIL " if bad else "ok   ") + json.dumps(res), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
