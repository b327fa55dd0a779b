"""Triton kernels of guidance-rt, registered as torch ops in the `guidance_rt` namespace.

Every op has a plain PyTorch implementation (CPU, or any device without Triton) and Triton
kernels (CUDA; CPU tensors inside `triton_on_cpu()`, run by Triton's interpreter). See
kernels/README.md for the API and the semantics of each op.
"""
if __name__ == "guidance_rt.kernels":
    from ._common import HAS_TRITON, INTERPRET, triton_on_cpu
    from .attention import IDENTITY, MEAN, NORMAL, SOFT, table_to, variant_attention
    from .blur import query_blur, seg_kernel_size
    from .combine import combine_weights, guidance_combine
    from .nag import nag_attention, nag_combine
    from .rows import gather_rows, scatter_rows
    from .shuffle import token_shuffle

    __all__ = [
        "HAS_TRITON", "INTERPRET", "triton_on_cpu",
        "NORMAL", "IDENTITY", "SOFT", "MEAN", "variant_attention", "table_to",
        "query_blur", "seg_kernel_size",
        "nag_attention", "nag_combine",
        "token_shuffle",
        "gather_rows", "scatter_rows",
        "guidance_combine", "combine_weights",
    ]
else:
    # Imported as a top-level `kernels` because the repository root is on sys.path: that name
    # belongs to the Hugging Face `kernels` package, which transformers (a dependency of it since
    # 5.25) imports. Load that package in this module's place when it is installed; otherwise
    # re-export guidance_rt.kernels (running the op definitions again would re-register every
    # guidance_rt op, freeing the operators that existing op handles still point to).
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        __name__, [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root])
    if _spec is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules[__name__] = _module   # what `import kernels` returns once this file has run
        _spec.loader.exec_module(_module)
    else:
        try:
            from guidance_rt.kernels import *  # noqa: F401,F403
        except ImportError:   # guidance_rt not installed: an empty module, never an import error
            pass
