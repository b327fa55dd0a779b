"""Triton kernels of guidance-rt, registered as torch ops in the `guidance_rt` namespace.

Every op has a plain PyTorch implementation (CPU, or any device without Triton) and Triton
kernels (CUDA; CPU tensors inside `triton_on_cpu()`, run by Triton's interpreter). See
kernels/README.md for the API and the semantics of each op.
"""
from ._common import HAS_TRITON, INTERPRET, triton_on_cpu
from .attention import IDENTITY, MEAN, NORMAL, SOFT, variant_attention
from .blur import query_blur, seg_kernel_size
from .combine import combine_weights, guidance_combine
from .nag import nag_attention
from .rows import gather_rows, scatter_rows
from .shuffle import token_shuffle

__all__ = [
    "HAS_TRITON", "INTERPRET", "triton_on_cpu",
    "NORMAL", "IDENTITY", "SOFT", "MEAN", "variant_attention",
    "query_blur", "seg_kernel_size",
    "nag_attention",
    "token_shuffle",
    "gather_rows", "scatter_rows",
    "guidance_combine", "combine_weights",
]
