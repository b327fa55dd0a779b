"""What an implementation is measured on, and the contract between the run and an implementation:
the model under test (a preset, or a local diffusers model or pipeline folder, and a meta-device
copy of it for FLOP counting), the step context an implementation is prepared for (Ctx), and what
preparing returns (Prepared: the step function, with set-up and tear-down around its calls) or
raises when the implementation does not offer a configuration (Unsupported: no row).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import presets
from ..families import model_family


@dataclass
class Target:
    label: str
    family: str
    model: torch.nn.Module
    preset: str | None          # preset name, or None for a model folder
    description: str = ""
    vae_factor: int = presets._VAE_SCALE   # image pixels per latent pixel (a pipeline folder: its VAE's)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _model_class(config: dict):
    import diffusers

    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if name else None
    if cls is None:
        raise ValueError(f"model class {name!r} is not a diffusers model class")
    return cls


def load_model_folder(path: str, *, dtype=torch.float32, device="cpu") -> torch.nn.Module:
    """A denoiser from a local folder: a model saved with save_pretrained (config.json), or a
    pipeline folder (model_index.json) with a ``unet`` or ``transformer`` subfolder."""
    import json

    path = os.path.expanduser(path)
    if os.path.isfile(os.path.join(path, "model_index.json")):
        for sub in ("unet", "transformer"):
            if os.path.isfile(os.path.join(path, sub, "config.json")):
                return load_model_folder(os.path.join(path, sub), dtype=dtype, device=device)
        raise ValueError(f"pipeline folder {path} has no unet/ or transformer/ subfolder")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path} is not a diffusers model folder (no config.json or model_index.json)")
    with open(cfg_path) as f:
        cls = _model_class(json.load(f))
    model = cls.from_pretrained(path, dtype=dtype, local_files_only=True)
    model_family(model)  # a clear error for unsupported classes
    return model.to(device).eval()


def folder_vae_factor(path: str) -> int:
    """A pipeline folder's vae_scale_factor as its pipeline computes it, 2 ** (VAE levels - 1);
    8 for a model folder or a pipeline without a VAE (generate reads a folder the same way)."""
    import json

    cfg = os.path.join(os.path.expanduser(path), "vae", "config.json")
    with contextlib.suppress(OSError, ValueError):
        with open(cfg) as f:
            channels = json.load(f).get("block_out_channels")
        if isinstance(channels, list) and channels:
            return 2 ** (len(channels) - 1)
    return presets._VAE_SCALE


def size_problem(size: tuple[int, int], name: str, family: str, config: dict,
                 vae_factor: int = presets._VAE_SCALE) -> str | None:
    """What is wrong with an image size (width, height) in pixels for a model of this family and
    config (None: nothing), in generate --size's words: sides must be multiples of the VAE factor
    x the patch, and within the position embedding."""
    from ..families import FAMILIES
    from ..generate import size_problem as problem

    fam = FAMILIES[family]
    limit = fam.latent_limit(config)
    return problem(size[0], size[1], name=name, pipeline=fam.pipeline_class(config),
                   multiple=vae_factor * fam.latent_multiple(config),
                   max_side=limit * vae_factor if limit else None)


def preset_size_problem(size: tuple[int, int], preset: str) -> str | None:
    """size_problem for a preset, from its config alone (nothing is built)."""
    p = presets.get_preset(preset)
    return size_problem(size, p.name, p.family, dict(p.config))


def load_target(preset: str, *, dtype=torch.float32, device="cpu", seed: int = 0) -> Target:
    if os.path.isdir(os.path.expanduser(preset)):
        model = load_model_folder(preset, dtype=dtype, device=device)
        return Target(os.path.basename(os.path.normpath(preset)) or preset, model_family(model), model,
                      None, f"{type(model).__name__} from {preset}", folder_vae_factor(preset))
    p = presets.get_preset(preset)
    model = presets.build_model(preset, dtype=dtype, device=device, seed=seed)
    return Target(preset, p.family, model, preset, p.description)


def meta_copy(target: Target, dtype) -> torch.nn.Module:
    if target.preset is not None:
        return presets.build_model(target.preset, dtype=dtype, device="meta")
    with torch.device("meta"):
        return type(target.model).from_config(target.model.config).to(dtype).eval()


@dataclass
class Ctx:
    target: Target
    steps: int
    step: int
    seed: int
    dtype: torch.dtype
    device: torch.device

    def generator(self):
        return torch.Generator().manual_seed(self.seed)


@dataclass
class Prepared:
    fn: Callable[[dict], torch.Tensor]
    setup: Callable[[], None] | None = None
    teardown: Callable[[], None] | None = None
    extra: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def active(self):
        if self.setup:
            self.setup()
        try:
            yield
        finally:
            if self.teardown:
                self.teardown()


class Unsupported(Exception):
    """The implementation does not offer this configuration (no row)."""
