"""NAG (normalized attention guidance) for the reference oracle, written from shared/methods.md
section 5. Nothing here is shared with the packed runtime; plain PyTorch, obviously right over fast.

NAG adds no branch: it changes the attention of every POSITIVE forward (cond and every perturbed
branch; the CFG uncond branch stays plain). Per guided layer and per token, over all heads'
channels together, before the output projection:

    Zp = attention(q, K_pos, V_pos);  Zn = attention(q, K_neg, V_neg)      (same queries)
    Zt = phi Zp - (phi - 1) Zn;  r = |Zt|_p / |Zp|_p;  Zh = Zt min(r, tau) / r
    Z  = alpha Zh + (1 - alpha) Zp          (min(r, tau) / r := 1 where r is 0 or not finite)

The formula is attention.nag_combine; which attentions are guided, and how the negative text
reaches them, the model's family module says (families/: its ``install_nag``). One plain forward
of the stock model per positive branch still: the whole batch at once, or sample by sample for
families that carry the negative text as a second row (``nag_per_sample``).

Everything is installed on an ExitStack and removed on exit, also after an exception.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ..guidance import Guidance
from .attention import NAGSetting
from .families import family_for, family_named
from .families.base import negative_input


def nag_setting(guidance: Guidance, family: str, step: int, num_steps: int) -> NAGSetting | None:
    """The step's NAG setting, or None when NAG is absent, outside its window or phi == 1."""
    term = guidance.nag
    if term is None:
        return None
    phi = term.step_scale(step, num_steps)
    if phi == 1.0:
        return None
    # alpha None: the family's default (methods.md section 5), from the oracle's own family module
    alpha = family_named(family).nag_alpha if term.alpha is None else term.alpha
    return NAGSetting(phi=float(phi), tau=float(term.tau), alpha=float(alpha), norm=int(term.norm))


@contextlib.contextmanager
def nag_installed(model: nn.Module, setting: NAGSetting, negative: dict, kwargs: dict,
                  row: int | None = None):
    """Install NAG on ``model`` for one positive forward with forward kwargs ``kwargs``; always
    removed on exit. The forward may have any batch, except for ``nag_per_sample`` families
    (SD3 / FLUX), where it must be batch 1 and ``row`` picks the negative's row (a batch-1
    negative serves every row). Yields the guided attention modules."""
    family = family_for(model)
    with contextlib.ExitStack() as stack:
        yield family.install_nag(stack, model, setting, negative, kwargs, row)


# ---------------------------------------------------------------------------------- forward


def _row(value, b: int, batch: int, unbatched: tuple[str, ...], key: str | None = None):
    """Sample b of one forward kwarg: tensors whose first dim is the batch are sliced (the 2-D
    form of the family's ``unbatched`` kwargs has no batch dim), dicts recursively, everything
    else kept."""
    if isinstance(value, dict):
        return {k: _row(v, b, batch, unbatched, k) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        if key in unbatched and value.ndim < 3:
            return value
        if value.ndim >= 1 and value.shape[0] == batch and batch > 1:
            return value[b:b + 1]
    return value


def nag_forward(model: nn.Module, setting: NAGSetting, negative: dict, sample: torch.Tensor,
                timestep, kwargs: dict) -> torch.Tensor:
    """One positive branch forward of the stock model with NAG (the whole batch, or sample by
    sample, concatenated, for ``nag_per_sample`` families)."""
    family = family_for(model)
    if not family.nag_per_sample:
        with nag_installed(model, setting, negative, kwargs):
            return model(sample, timestep=timestep, **kwargs, return_dict=False)[0]
    batch = sample.shape[0]
    rows = negative_input(negative, "encoder_hidden_states", None).shape[0]
    if rows not in (1, batch):
        raise ValueError(f"reference NAG: negative encoder_hidden_states has batch {rows}, "
                         f"expected 1 or {batch}")
    outputs = []
    for b in range(batch):
        kwargs_b = _row(kwargs, b, batch, family.unbatched)
        timestep_b = _row(timestep, b, batch, family.unbatched)
        with nag_installed(model, setting, negative, kwargs_b, row=b):
            outputs.append(model(sample[b:b + 1], timestep=timestep_b, **kwargs_b,
                                 return_dict=False)[0])
    return torch.cat(outputs, dim=0)
