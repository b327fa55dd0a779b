"""Out-of-bounds checks for kernels run by Triton's interpreter (installed by conftest.py).

Every masked load and store of an interpreted launch must fall inside the storage of one of the
launch's tensor arguments; anything else raises instead of reading or corrupting the heap.
"""
from __future__ import annotations

import numpy as np
import torch


def install():
    import triton.runtime.interpreter as interp

    builder, executor = interp.InterpreterBuilder, interp.GridExecutor
    needed = [(builder, "create_masked_load"), (builder, "create_masked_store"),
              (executor, "__call__"), (executor, "_init_args_hst")]
    missing = [f"{cls.__name__}.{name}" for cls, name in needed if not hasattr(cls, name)]
    if missing:
        raise RuntimeError(f"tests/interpreter_bounds.py: this Triton's interpreter has no {missing}; "
                           "update the bounds checks for it")
    if getattr(builder, "_bounds_checked", False):
        return
    launches = []   # (kernel name, [(lo, hi)] of its tensor arguments' storages), innermost last
    init_args, call = executor._init_args_hst, executor.__call__
    masked_load, masked_store = builder.create_masked_load, builder.create_masked_store

    def init_args_checked(self, args_dev, kwargs):
        args, kw = init_args(self, args_dev, kwargs)
        spans = []

        def visit(x):
            if isinstance(x, (tuple, list)):
                for y in x:
                    visit(y)
            elif isinstance(x, torch.Tensor):
                lo = x.untyped_storage().data_ptr()
                spans.append((lo, lo + x.untyped_storage().nbytes()))

        visit(args)
        visit(list(kw.values()))
        launches.append((self.fn.__name__, spans))
        return args, kw

    def call_checked(self, *args, **kwargs):
        depth = len(launches)
        try:
            return call(self, *args, **kwargs)
        finally:
            del launches[depth:]

    def check(kind, ptrs, mask, itemsize):
        if not launches:
            return
        addr = ptrs.data[mask.data.astype(bool)].astype(np.uint64)
        if addr.size == 0:
            return
        name, spans = launches[-1]
        inside = np.zeros(addr.shape, bool)
        for lo, hi in spans:
            inside |= (addr >= lo) & (addr + itemsize <= hi)
        if not inside.all():
            raise IndexError(f"out-of-bounds {kind} in kernel {name}: {int((~inside).sum())} of "
                             f"{addr.size} addresses are outside every tensor argument")

    def load_checked(self, ptrs, mask, other, cache_policy, is_volatile):
        check("load", ptrs, mask, np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize)
        return masked_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store_checked(self, ptrs, value, mask, cache_policy):
        check("store", ptrs, mask, value.data.dtype.itemsize)
        return masked_store(self, ptrs, value, mask, cache_policy)

    executor._init_args_hst, executor.__call__ = init_args_checked, call_checked
    builder.create_masked_load, builder.create_masked_store = load_checked, store_checked
    builder._bounds_checked = True
