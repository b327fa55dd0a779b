"""S-CFG (semantic-aware classifier-free guidance) for the reference oracle, written from
shared/methods.md section 7 and the published code (SmilesDZgk/S-CFG, sd/sd.py + sd/utils.py).
Nothing here is shared with the packed runtime; plain PyTorch in float64, obviously right over fast.

S-CFG adds no branch. CFG's scale becomes a per-pixel map ``w * rate(x)`` computed from the
attention maps of the step's own uncond and cond forwards:

1. Layers: every BasicTransformerBlock whose token grid (h, w) is the REAL latent (H, W) divided
   by ``r`` for ``r`` in {R, 2R}, exactly: h * r == H and w * r == W (the published code takes r
   = int(sample_size / h) and assumes square grids; identical for the default sizes). A latent
   that is not a multiple of r has no level r (e.g. a 20x20 latent: the 3x3 grid is not
   latent/8). Levels the model lacks are skipped (SDXL at R = 4 has no latent/8 block); if
   neither exists, ValueError naming the latent and R.
   Per layer: A = attn1 probabilities (B, N, N), C = attn2 probabilities (B, N, T), each averaged
   over heads, recorded by forward pre-hooks on the attention modules that recompute q and k
   from the module's own inputs exactly as AttnProcessor2_0 makes them (MATERIALISED, float64).
   Hooks rather than replacement processors: the model's own computation is not touched, so the
   forward's output is unchanged bit for bit, and they compose with NAG's cross-attention
   processors on the cond forward (whose positive map is then recorded).
2. Completion S = (A + 3 A^2) / 4 ("code", the published loop) or (A + A^2 + A^3 + A^4) / 4
   ("paper"); C' = S @ C as (B, T, h, w).
3. The coarser level (r = 2R) is upsampled bilinearly (align_corners=False) to the level-R grid.
4. Every token map is smoothed by the 3x3 Gaussian (sigma 0.5, taps exp(-((x - 1) / (2 sigma))^2),
   x = 0, 1, 2, normalised in 2-D), reflect padding 1.
5. Per layer: C' / (spatial mean + 1e-8) per token, and fore = [C'_0, sum_{k>0} C'_k] / spatial
   mean (no epsilon); both summed over the layers of both levels, divided by their count.
6. Region = one-hot argmax over tokens of the COND forward's average (ties: every maximal token);
   foreground = 1 - [start token maximal] of the UNCOND forward's fore average; both at the
   level-R grid, nearest-upsampled to the latent (H, W).
7. d = c - u, n = |d|_2 over channels; per token k: m_k = mean of n over region k,
   fore_norm = mean of n over the foreground (both sum / (count + 1e-8)); rate_k = fore_norm *
   [region k not empty] / (m_k + 1e-8); rate(x) = sum_k rate_k region_k(x); clamp to ``clamp``,
   then to at most max_product / w (w > 0); smoothed by the same 3x3 Gaussian.
8. eps = u + w rate (c - u); everything else as CFG (oracle.combine).

Entry points: ``scfg_recorded`` (install the recorder for one forward), ``scfg_rate_from_maps``
(steps 2-7 from two recordings and u, c), ``scfg_rate`` (both plain forwards + steps 2-7: what
tests of the runtime compare rate maps against), and the pieces, each testable alone.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..families import enumerate_layers
from ..guidance import Guidance
from ..methods import SCFG
from .families import Family, family_for
from .hooks import hook

SMOOTH_SIZE = 3
SMOOTH_SIGMA = 0.5
MEAN_EPS = 1e-8        # token-map normalisation and the masked means of |d|


# ------------------------------------------------------------------------------ the pieces


def smoothing_kernel(dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The published GaussianSmoothing(kernel_size=3, sigma=0.5) kernel (3, 3): per axis
    exp(-((x - 1) / (2 sigma))^2) for x = 0, 1, 2 (the normal density's constant cancels), the 2-D
    product normalised to sum 1. Per axis about [0.212, 0.576, 0.212]."""
    x = torch.arange(SMOOTH_SIZE, dtype=torch.float64)
    mean = (SMOOTH_SIZE - 1) / 2.0
    taps = torch.exp(-(((x - mean) / (2.0 * SMOOTH_SIGMA)) ** 2))
    kernel = torch.outer(taps, taps)
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


def smooth(maps: torch.Tensor) -> torch.Tensor:
    """Smooth every channel of ``maps`` (B, C, h, w) with ``smoothing_kernel``, reflect padding 1."""
    batch, channels, height, width = maps.shape
    if height < 2 or width < 2:
        raise ValueError(f"S-CFG: a {height}x{width} map is too small for the 3x3 reflect-padded "
                         f"smoothing (needs at least 2x2)")
    kernel = smoothing_kernel(maps.dtype, maps.device).expand(channels, 1, SMOOTH_SIZE, SMOOTH_SIZE)
    padded = F.pad(maps, (1, 1, 1, 1), mode="reflect")
    return F.conv2d(padded, kernel, groups=channels)


def complete(self_probs: torch.Tensor, form: str = "code") -> torch.Tensor:
    """Self-attention completion of A (B, N, N): "code" (A + 3 A^2) / 4, the published code's
    loop (it adds A @ A three times); "paper" (A + A^2 + A^3 + A^4) / 4."""
    a = self_probs
    if form == "code":
        return (a + 3.0 * (a @ a)) / 4.0
    if form == "paper":
        total, power = a.clone(), a
        for _ in range(3):
            power = power @ a
            total = total + power
        return total / 4.0
    raise ValueError(f"S-CFG completion must be 'code' or 'paper', got {form!r}")


def level_grid(latent_hw: tuple[int, int], r: int) -> tuple[int, int] | None:
    """The token grid latent / r, (H / r, W / r); None when r does not divide the latent."""
    height, width = latent_hw
    if height % r or width % r:
        return None
    return height // r, width // r


def region_masks(token_maps: torch.Tensor) -> torch.Tensor:
    """One-hot argmax over tokens (dim 1) of (B, T, h, w); every maximal token is set on ties."""
    return (token_maps == token_maps.max(dim=1, keepdim=True).values).to(token_maps.dtype)


def foreground_mask(fore_maps: torch.Tensor) -> torch.Tensor:
    """1 - [the start token (index 0) is maximal] of (B, 2, h, w) -> (B, 1, h, w)."""
    start_max = fore_maps[:, :1] == fore_maps.max(dim=1, keepdim=True).values
    return 1.0 - start_max.to(fore_maps.dtype)


def rate_map(u: torch.Tensor, c: torch.Tensor, region: torch.Tensor, foreground: torch.Tensor,
             scale: float, clamp: tuple[float, float], max_product: float):
    """Step 7: the smoothed rate (B, 1, H, W) from the predictions (B, C, H, W) and the masks at
    the latent size (region (B, T, H, W), foreground (B, 1, H, W)). Returns (rate, token_rates
    (B, T), unclamped rate (B, 1, H, W)), all float64."""
    u, c = u.double(), c.double()
    region, foreground = region.double(), foreground.double()
    norm = torch.linalg.vector_norm(c - u, ord=2, dim=1, keepdim=True)            # (B, 1, H, W)
    region_size = region.sum(dim=(2, 3))                                           # (B, T)
    region_norm = (norm * region).sum(dim=(2, 3)) / (region_size + MEAN_EPS)      # (B, T)
    fore_norm = (norm * foreground).sum(dim=(2, 3)) / (foreground.sum(dim=(2, 3)) + MEAN_EPS)
    token_rates = fore_norm * (region_size > 0).double() / (region_norm + MEAN_EPS)  # (B, T)
    raw = (token_rates[:, :, None, None] * region).sum(dim=1, keepdim=True)
    rate = raw.clamp(min=clamp[0], max=clamp[1])
    if scale > 0:
        rate = rate.clamp(max=max_product / scale)
    return smooth(rate), token_rates, raw


# ------------------------------------------------------------------------------ recording


@dataclass
class LayerMaps:
    """One block's head-averaged attention probabilities from one forward (float64)."""

    path: str                   # the BasicTransformerBlock's module path
    r: int                      # its level: the latent divided by r
    grid: tuple[int, int]       # its token grid (h, w)
    self_probs: torch.Tensor    # (B, N, N), attn1
    cross_probs: torch.Tensor   # (B, N, T), attn2


@dataclass
class SCFGRecording:
    """What one recorded forward saw: the level-R / level-2R layers' maps, in execution order,
    and every token grid the UNet's transformer blocks ran at."""

    latent: tuple[int, int]
    R: int
    layers: list
    grids_seen: set


class SCFGUnsupportedModelError(ValueError, NotImplementedError):
    """S-CFG on a model that is not a UNet (a ValueError and a NotImplementedError)."""


def require_unet(model: nn.Module) -> Family:
    """S-CFG is UNet-only (the families whose ``semantic_maps`` can be recorded): returns the
    model's reference family; any other model raises SCFGUnsupportedModelError."""
    family = family_for(model)
    if not family.semantic_maps:
        raise SCFGUnsupportedModelError(
            f"S-CFG is UNet-only (UNet models: SD1.5 / SDXL): it needs the self- and cross-"
            f"attention maps of a UNet; got a {family.name} model ({type(model).__name__})")
    return family


def scfg_term(guidance: Guidance, model: nn.Module | None = None) -> SCFG | None:
    """The Guidance's SCFG term (None when it has none); with ``model``, a non-UNet model raises
    SCFGUnsupportedModelError when the Guidance has an SCFG term (whatever the step)."""
    term = guidance.cfg if isinstance(guidance.cfg, SCFG) else None
    if term is not None and model is not None:
        require_unet(model)
    return term


def _head_mean_probs(family: Family, attn: nn.Module, hidden: torch.Tensor,
                     context: torch.Tensor | None):
    """softmax(q k^T * scale) of the attention module's own inputs, averaged over heads, float64.
    q / k are made exactly as AttnProcessor2_0 makes them (to_q, norm_cross, to_k, head split,
    norm_q / norm_k), in the model's dtype; logits and softmax in float64."""
    # the processors whose q / k path this mirrors: the stock ones and the family's own
    family.check_processor(attn, "S-CFG", family.semantic_map_processors)
    name = type(attn.processor).__name__
    if attn.spatial_norm is not None or attn.group_norm is not None or hidden.ndim != 3:
        raise ValueError("reference S-CFG: unsupported attention configuration")
    batch = hidden.shape[0]
    query = attn.to_q(hidden)
    if context is None:
        context = hidden
    elif attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    key = attn.to_k(context)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    # AttnProcessor (classic) uses attn.scale; AttnProcessor2_0 / NAG: SDPA's default
    scale = attn.scale if name == "AttnProcessor" else head_dim ** -0.5
    logits = (query.double() @ key.double().transpose(-1, -2)) * scale
    return torch.softmax(logits, dim=-1).mean(dim=1)


@contextlib.contextmanager
def scfg_recorded(model: nn.Module, term: SCFG | None, sample: torch.Tensor):
    """Record the S-CFG layers' maps during one forward of ``model`` on ``sample`` (the latent,
    for its real (H, W)). Yields an SCFGRecording, filled while the forward runs (None, and
    nothing installed, when ``term`` is None). The hooks only read; all are removed on exit,
    also after an exception. On a normal exit, a forward that met no layer of either level
    raises ValueError."""
    if term is None:
        yield None
        return
    family = require_unet(model)
    latent = tuple(int(s) for s in sample.shape[-2:])
    levels = {level_grid(latent, r): r for r in (term.R, 2 * term.R)
              if level_grid(latent, r) is not None}
    recording = SCFGRecording(latent=latent, R=term.R, layers=[], grids_seen=set())
    grids: dict[str, tuple[int, int]] = {}
    pending: dict[str, torch.Tensor] = {}

    def capture_grid(path):
        def capture(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.ndim != 4:
                raise ValueError(f"reference S-CFG: {path} got a {hidden.ndim}-D input; expected "
                                 f"a (B, C, h, w) latent feature map")
            grids[path] = tuple(int(s) for s in hidden.shape[-2:])
            recording.grids_seen.add(grids[path])
        return capture

    def record(block_path, transformer_path, which):
        def record_maps(module, args, kwargs):
            grid = grids.get(transformer_path)
            if grid not in levels:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
            mask = args[2] if len(args) > 2 else kwargs.get("attention_mask")
            if mask is not None:
                raise ValueError("reference S-CFG: attention masks are not supported")
            if hidden.shape[1] != grid[0] * grid[1]:
                raise ValueError(f"reference S-CFG: {block_path}.{which} has {hidden.shape[1]} "
                                 f"tokens, expected a {grid[0]}x{grid[1]} grid")
            with torch.no_grad():
                if which == "attn1":
                    if context is not None:
                        raise ValueError(f"reference S-CFG: {block_path}.attn1 is not a "
                                         f"self-attention")
                    if block_path in pending:
                        raise ValueError(f"reference S-CFG: {block_path} ran twice in one forward")
                    pending[block_path] = _head_mean_probs(family, module, hidden, None)
                else:
                    if context is None or block_path not in pending:
                        raise ValueError(f"reference S-CFG: {block_path}.attn2 is not a "
                                         f"cross-attention following its attn1")
                    recording.layers.append(LayerMaps(
                        block_path, levels[grid], grid, pending.pop(block_path),
                        _head_mean_probs(family, module, hidden, context)))
            return None
        return record_maps

    with contextlib.ExitStack() as stack:
        hooked_transformers = set()
        for layer in enumerate_layers(model):
            block = model.get_submodule(layer.path)
            if getattr(block, "attn2", None) is None:
                raise ValueError(f"reference S-CFG: {layer.path} has no cross-attention")
            transformer_path = family.grid_path(layer)
            if transformer_path not in hooked_transformers:
                hooked_transformers.add(transformer_path)
                hook(stack, model.get_submodule(transformer_path), capture_grid(transformer_path),
                     pre=True, with_kwargs=True)
            hook(stack, block.attn1, record(layer.path, transformer_path, "attn1"),
                 pre=True, with_kwargs=True)
            hook(stack, block.attn2, record(layer.path, transformer_path, "attn2"),
                 pre=True, with_kwargs=True)
        yield recording
    if pending:
        raise ValueError(f"reference S-CFG: no cross-attention map for {sorted(pending)}")
    if not recording.layers:
        wanted = ", ".join(f"latent/{r} = {h}x{w}" for (h, w), r in levels.items()) or (
            "neither divides the latent")
        seen = ", ".join(f"{h}x{w}" for h, w in sorted(recording.grids_seen, reverse=True))
        raise ValueError(f"S-CFG: the UNet has no transformer block at the maps' levels for a "
                         f"{latent[0]}x{latent[1]} latent with R={term.R} ({wanted}); its "
                         f"transformer blocks run at {seen or 'no grid'}")


# ------------------------------------------------------------------------------ steps 2-7


def layer_token_maps(layer: LayerMaps, target: tuple[int, int], form: str) -> torch.Tensor:
    """Steps 2-4 for one layer: S @ C on its grid as (B, T, h, w), upsampled bilinearly to the
    level-R grid ``target`` when coarser, then smoothed. float64."""
    completed = complete(layer.self_probs.double(), form) @ layer.cross_probs.double()   # (B, N, T)
    batch, _, tokens = completed.shape
    height, width = layer.grid
    maps = completed.transpose(1, 2).reshape(batch, tokens, height, width)
    if (height, width) != tuple(target):
        maps = F.interpolate(maps, size=tuple(target), mode="bilinear", align_corners=False)
    return smooth(maps)


def average_maps(recording: SCFGRecording, form: str):
    """Step 5 over the recording's layers: (token maps (B, T, hR, wR), fore maps (B, 2, hR, wR)),
    each layer's spatially normalised maps summed and divided by the number of layers."""
    target = level_grid(recording.latent, recording.R)
    token_sum, fore_sum = 0.0, 0.0
    for layer in recording.layers:
        maps = layer_token_maps(layer, target, form)
        token_sum = token_sum + maps / (maps.mean(dim=(2, 3), keepdim=True) + MEAN_EPS)
        fore = torch.stack([maps[:, 0], maps[:, 1:].sum(dim=1)], dim=1)
        fore_sum = fore_sum + fore / fore.mean(dim=(2, 3), keepdim=True)
    count = len(recording.layers)
    return token_sum / count, fore_sum / count


@dataclass
class SCFGRate:
    """S-CFG's rate of one step and its intermediates (float64).

    rate (B, 1, H, W): the final smoothed, clamped map (eps = u + w rate (c - u));
    raw_rate (B, 1, H, W): sum_k rate_k region_k before clamping and smoothing;
    token_rates (B, T): rate_k; region (B, T, H, W) / foreground (B, 1, H, W): the 0/1 masks at the
    latent size; region_grid / foreground_grid: the same at the level-R grid; token_maps (B, T,
    hR, wR): the cond forward's layer-averaged normalised token maps; fore_maps (B, 2, hR, wR):
    the uncond forward's layer-averaged [start, rest] maps; layers: (path, r) of the layers used."""

    rate: torch.Tensor
    raw_rate: torch.Tensor
    token_rates: torch.Tensor
    region: torch.Tensor
    foreground: torch.Tensor
    region_grid: torch.Tensor
    foreground_grid: torch.Tensor
    token_maps: torch.Tensor
    fore_maps: torch.Tensor
    layers: tuple


def scfg_rate_from_maps(term: SCFG, scale: float, u: torch.Tensor, c: torch.Tensor,
                        uncond: SCFGRecording, cond: SCFGRecording) -> SCFGRate:
    """Steps 2-7 from the uncond and cond forwards' recordings and predictions (B, C, H, W);
    ``scale`` is the step's CFG weight w."""
    latent = tuple(u.shape[-2:])
    for name, rec in (("uncond", uncond), ("cond", cond)):
        if rec is None or not rec.layers:
            raise ValueError(f"S-CFG: no attention maps were recorded in the {name} forward")
        if tuple(rec.latent) != latent or rec.R != term.R:
            raise ValueError(f"S-CFG: the {name} recording is for a {rec.latent} latent at "
                             f"R={rec.R}, not {latent} at R={term.R}")
    if [(l.path, l.r) for l in uncond.layers] != [(l.path, l.r) for l in cond.layers]:
        raise ValueError("S-CFG: the uncond and cond forwards recorded different layers")
    token_maps, _ = average_maps(cond, term.completion)
    _, fore_maps = average_maps(uncond, term.completion)
    region_grid = region_masks(token_maps)
    foreground_grid = foreground_mask(fore_maps)
    region = F.interpolate(region_grid, size=latent, mode="nearest")
    foreground = F.interpolate(foreground_grid, size=latent, mode="nearest")
    rate, token_rates, raw = rate_map(u, c, region, foreground, scale, term.clamp, term.max_product)
    return SCFGRate(rate=rate, raw_rate=raw, token_rates=token_rates, region=region,
                    foreground=foreground, region_grid=region_grid,
                    foreground_grid=foreground_grid, token_maps=token_maps, fore_maps=fore_maps,
                    layers=tuple((l.path, l.r) for l in cond.layers))


def scfg_step_rate(guidance: Guidance, branches) -> torch.Tensor | None:
    """The oracle's hook: the rate map (float64) of a step whose uncond / cond branches were
    recorded (``branch.maps``), or None when S-CFG is not active in the step."""
    term = scfg_term(guidance)
    by_kind = {b.kind: b for b in branches if b.kind in ("uncond", "cond")}
    if term is None or "uncond" not in by_kind:
        return None
    u, c = by_kind["uncond"], by_kind["cond"]
    return scfg_rate_from_maps(term, u.scale, u.prediction, c.prediction, u.maps, c.maps).rate


def scfg_rate(model: nn.Module, term: SCFG | Guidance, sample: torch.Tensor, timestep, *,
              cond: dict, uncond: dict, scale: float | None = None) -> SCFGRate:
    """S-CFG's rate map and intermediates for one step, by two plain recorded forwards (uncond,
    cond) of the stock model (no other term: no NAG, no perturbation). ``scale`` defaults to the
    term's scale. The model is left exactly as it was, also when a forward raises."""
    if isinstance(term, Guidance):
        guidance = term
        term = scfg_term(guidance)
        if term is None:
            raise ValueError("scfg_rate: the Guidance has no SCFG term")
    if not isinstance(term, SCFG):
        raise TypeError(f"scfg_rate takes an SCFG term or a Guidance, got {type(term).__name__}")
    require_unet(model)
    w = term.scale if scale is None else float(scale)
    with torch.no_grad():
        with scfg_recorded(model, term, sample) as rec_u:
            u = model(sample, timestep=timestep, **uncond, return_dict=False)[0]
        with scfg_recorded(model, term, sample) as rec_c:
            c = model(sample, timestep=timestep, **cond, return_dict=False)[0]
    return scfg_rate_from_maps(term, w, u, c, rec_u, rec_c)


__all__ = ["SCFGUnsupportedModelError", "LayerMaps", "SCFGRecording", "SCFGRate", "smoothing_kernel", "smooth", "complete",
           "level_grid", "region_masks", "foreground_mask", "rate_map", "require_unet", "scfg_term",
           "scfg_recorded", "layer_token_maps", "average_maps", "scfg_rate_from_maps",
           "scfg_step_rate", "scfg_rate"]
