"""The CUDA path without a GPU: every op traced with fake CUDA tensors decomposes into its Triton
kernels, and each launch compiles for sm_90 (H100) with Triton's ptxas, without register spills
and within an H100 block's shared memory (kernels/_aot.py). Runs in a subprocess because the
kernels must be built as JIT kernels there (GUIDANCE_RT_TRITON_JIT=1), not for the interpreter.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="Triton is not installed")

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
KERNELS = {"_variant_attention_fwd", "_mean_partials", "_blur_pass", "_mean_tokens",
           "_nag_attention_fwd", "_nag_combine", "_token_shuffle", "_copy_rows", "_combine"}


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="this Triton build ships no ptxas")
def test_cuda_launches_compile_for_h100(tmp_path):
    out = tmp_path / "aot.json"
    env = dict(os.environ, GUIDANCE_RT_TRITON_JIT="1", TRITON_DEFAULT_FP_FUSION="1",
               TRITON_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "guidance_rt.kernels._aot", "--quick",
                           "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert {r["kernel"] for r in results} == KERNELS
    # both specialisations of the variant attention, with and without text tokens, and with a
    # key mask (joint attention)
    specs = {(r["constexprs"]["PAG_MAP"], r["constexprs"]["HAS_TEXT"], r["constexprs"]["HAS_KMASK"])
             for r in results if r["kernel"] == "_variant_attention_fwd"}
    assert specs == {("False", "False", "False"), ("False", "True", "False"), ("True", "True", "False"),
                     ("False", "True", "True"), ("True", "True", "True")}
    assert {r["constexprs"]["HAS_KMASK"] for r in results if r["kernel"] == "_mean_partials"} == {"False", "True"}
    # NAG: separate keys (UNet cross-attention), and the joint form's shared image keys with and
    # without text key masks
    assert {(r["constexprs"]["HAS_SHARED"], r["constexprs"]["HAS_KMASK"]) for r in results
            if r["kernel"] == "_nag_attention_fwd"} == {("False", "False"), ("True", "False"), ("True", "True")}
    for r in results:
        assert r["spill_stack"] == 0, r
        assert r["shared"] <= 232448, r
