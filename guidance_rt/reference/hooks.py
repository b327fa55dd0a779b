"""Temporary changes to a stock model for the reference oracle: each helper makes one change
(an attention processor, a per-instance forward, a forward hook) and registers its undo on an
ExitStack, so leaving the stack - also after an exception - leaves the model exactly as before."""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable

import torch
import torch.nn as nn


def set_processor(stack: contextlib.ExitStack, attn: nn.Module, processor) -> None:
    original = attn.processor
    if isinstance(original, nn.Module):
        raise ValueError("reference: attention processors with weights are not supported")
    attn.processor = processor
    stack.callback(setattr, attn, "processor", original)


def wrap_forward(stack: contextlib.ExitStack, module: nn.Module,
                 replace: Callable[[Callable, dict], object]) -> None:
    """Give ``module`` an instance-level forward returning ``replace(run, arguments)``:
    ``arguments`` are the call's arguments by parameter name (what ``replace`` changes there
    reaches the stock forward) and ``run()`` calls the stock forward with them. On exit the
    instance attribute is restored (or removed when it did not exist)."""
    had_own = "forward" in module.__dict__
    own = module.__dict__.get("forward")
    inner = module.forward
    signature = inspect.signature(inner)

    def forward(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        return replace(lambda: inner(*bound.args, **bound.kwargs), bound.arguments)

    module.forward = forward

    def restore():
        if had_own:
            module.forward = own
        else:
            del module.forward

    stack.callback(restore)


def hook(stack: contextlib.ExitStack, module: nn.Module, fn, pre: bool = False,
         with_kwargs: bool = False) -> None:
    if pre:
        handle = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
    else:
        handle = module.register_forward_hook(fn, with_kwargs=with_kwargs)
    stack.callback(handle.remove)


def return_zeros(module, args, output):
    """A forward hook making ``module`` output zeros (tuples: each tensor, None kept)."""
    if isinstance(output, tuple):
        return tuple(None if o is None else torch.zeros_like(o) for o in output)
    return torch.zeros_like(output)
