"""Peak memory of one step beyond what existed before it (weights and inputs excluded): CUDA's
max_memory_allocated on a GPU; on the CPU, which has no allocator statistics, a dispatch-mode
tracker of the tensor storage that the step's ATen ops create (temporaries inside a kernel are
not seen).
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class TensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storage created by ATen ops inside the mode (views and in-place
    results of existing storage are not new memory). Freed storage is subtracted when its last
    reference dies."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key, n):
        self._seen.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        from torch.utils._pytree import tree_leaves

        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            s = t.untyped_storage()
            key = id(s)
            if key in inputs or key in self._seen:
                continue
            n = s.nbytes()
            self._seen.add(key)
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(s, self._free, key, n)
        return out


def peak_memory(fn, inp, device) -> tuple[int | None, str]:
    """(bytes, method) of one call's peak allocation beyond what existed before it."""
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            out = fn(inp)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - before
            del out
            return peak, "torch.cuda.max_memory_allocated"
        if device.type == "cpu":
            tracker = TensorMemory()
            with tracker:
                out = fn(inp)
            del out
            return tracker.peak, "ATen output storage (dispatch tracker)"
    return None, "n/a"
