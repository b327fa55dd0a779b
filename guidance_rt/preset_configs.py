"""The preset table: every preset's diffusers config, family, default latent size and whether it is
tiny. Torch-free, so the command line lists and checks preset names without importing torch;
presets.py builds the models and pipelines.

Tiny presets keep the real model's block topology (block types, layers per block, transformer
layers per block, joint / double / single block counts, dual attention layers, qk norm, guidance
embedding) and shrink only widths, so layer names such as SDXL's `d6-d23` or SLG's `[7, 8, 9]`
mean the same thing as on the real model. Each tiny config is the full config with width keys
overridden (`_TINY_WIDTHS`), which makes that true by construction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Preset:
    name: str
    family: str                 # "unet" | "sd3" | "flux"
    model_class: str            # diffusers class name
    config: dict[str, Any]      # kwargs for model_class.from_config
    latent: tuple[int, int]     # default (height, width) in latent pixels
    tiny: bool
    description: str
    text_len: int = 0  # default text tokens in example_inputs (0: the family's)
    latent_packing: int = 1  # model input channels per VAE latent channel (FLUX.2: 2x2 patches, 4)
    frames: int = 0    # latent frames of a video preset (0: an image preset)
    experts: int = 1   # denoisers of its pipeline (Wan 2.2 A14B: transformer, transformer_2)

    @property
    def latent_channels(self) -> int:
        """Channels of the unpacked VAE latent."""
        c = self.config["in_channels"]
        return c // self.latent_packing


# ---------------------------------------------------------------------------------------------
# Full-size configs (the published diffusers configs of the real checkpoints)

_SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    attention_head_dim=8,  # diffusers' name; it is the number of heads (head dim 40..160)
    cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
)

_SDXL = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),  # number of heads per level: 64-wide heads throughout
    cross_attention_dim=2048,        # 768 (CLIP-L) + 1280 (OpenCLIP-G)
    use_linear_projection=True, upcast_attention=False,
    addition_embed_type="text_time", addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids * 256 + 1280 pooled text
    norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
)

_SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16,
    num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096,        # T5-XXL width (CLIP embeddings are zero-padded to it)
    caption_projection_dim=1536,     # = heads * head dim
    pooled_projection_dim=2048,      # 768 + 1280 pooled CLIP
    pos_embed_max_size=192,
)

_SD35_MEDIUM = dict(
    _SD3_MEDIUM, pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)

_SD35_LARGE = dict(
    _SD3_MEDIUM, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
    qk_norm="rms_norm",
)

_FLUX_DEV = dict(
    patch_size=1, in_channels=64, out_channels=None,
    num_layers=19, num_single_layers=38,
    attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096,        # T5-XXL
    pooled_projection_dim=768,       # CLIP-L pooled
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),     # sums to attention_head_dim
)

_QWEN_IMAGE = dict(
    patch_size=2, in_channels=64, out_channels=16,   # 16-channel latents in 2x2 patches (packed)
    num_layers=60, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=3584,        # Qwen2.5-VL-7B hidden size
    guidance_embeds=False, axes_dims_rope=(16, 56, 56),
)

_FLUX2_DEV = dict(   # Flux2Transformer2DModel's defaults are FLUX.2-dev's published config
    patch_size=1, in_channels=128, out_channels=None,   # 32 VAE channels in 2x2 patches
    num_layers=8, num_single_layers=48,
    attention_head_dim=128, num_attention_heads=48,
    joint_attention_dim=15360,       # Mistral Small 3.1: 3 hidden layers x 5120
    timestep_guidance_channels=256, mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6,
    guidance_embeds=True,
)

# Wan (WanTransformer3DModel): the published diffusers configs of Wan-AI/Wan2.1-T2V-1.3B-Diffusers,
# Wan2.1-T2V-14B-Diffusers and Wan2.2-T2V-A14B-Diffusers (each of the two experts is a 14B model of
# the Wan 2.1 14B shape); UMT5-XXL text (4096 wide), 16-channel Wan VAE latent (4x temporal, 8x
# spatial compression: 480x832, 81 frames -> 21 x 60 x 104 latent)
_WAN21_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)
_WAN21_14B = dict(_WAN21_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
_WAN22_A14B = dict(_WAN21_14B)   # per expert

# Width-only overrides for the tiny presets. Channels in/out stay real (4 / 16 / 64), so latents
# have the real shapes. UNet channels keep the real ratios between levels (SD1.5 1:2:4:4), so the
# same resnets get a shortcut conv and the module trees match the real ones module for module.
_TINY_WIDTHS = {
    "sd15": dict(sample_size=16, block_out_channels=(8, 16, 32, 32), attention_head_dim=2,
                 cross_attention_dim=16, norm_num_groups=4),
    "sdxl": dict(sample_size=16, block_out_channels=(8, 16, 32), attention_head_dim=(1, 2, 4),
                 cross_attention_dim=32,                    # 16 + 16 from the two tiny CLIPs
                 addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=64,  # 6 * 8 + 16 pooled text
                 norm_num_groups=4),
    "sd3": dict(sample_size=16, attention_head_dim=8, num_attention_heads=4,
                joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
                pos_embed_max_size=32),
    "sd35": dict(sample_size=16, attention_head_dim=8, num_attention_heads=4,
                 joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
                 pos_embed_max_size=64),
    # head dim 12: Wan's rotary embedding splits it into 4 (frames) + 4 (rows) + 4 (cols)
    "wan": dict(num_attention_heads=2, attention_head_dim=12, text_dim=32, freq_dim=16, ffn_dim=48),
    "flux": dict(attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                 pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)),
    "qwenimage": dict(attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                      axes_dims_rope=(4, 6, 6)),
    "flux2": dict(attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,   # 3 x 16
                  timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4)),
}

# Text lengths of the tiny presets: shorter than the pipelines' defaults so that text tokens do
# not dominate a 16x16 latent's 64..256 image tokens; the models accept any length.
_TINY_TEXT = {"sd3": 77 + 32, "flux": 64, "flux2": 32, "qwenimage": 16, "wan": 16}


def _preset(name, family, cls, config, latent, tiny, description, text_len=0, latent_packing=1, frames=0,
            experts=1):
    return Preset(name, family, cls, dict(config), latent, tiny, description, text_len, latent_packing, frames,
                  experts)


_UNET, _SD3, _FLUX = "UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel"
_FLUX2 = "Flux2Transformer2DModel"
_QWEN = "QwenImageTransformer2DModel"
_WAN = "WanTransformer3DModel"

# full-size presets first, then the tiny ones, each in family order
PRESETS: dict[str, Preset] = {p.name: p for p in sorted([
    _preset("sd15", "unet", _UNET, _SD15, (64, 64), False,
            "Stable Diffusion 1.5 UNet (860M), 512px"),
    _preset("sdxl", "unet", _UNET, _SDXL, (128, 128), False,
            "SDXL base UNet (2.6B), 1024px"),
    _preset("sd3-medium", "sd3", _SD3, _SD3_MEDIUM, (128, 128), False,
            "SD3-medium MMDiT (2B, 24 joint blocks), 1024px"),
    _preset("sd35-medium", "sd3", _SD3, _SD35_MEDIUM, (128, 128), False,
            "SD3.5-medium MMDiT-X (2.5B, 24 blocks, dual attention in 0..12, rms qk norm), 1024px"),
    _preset("sd35-large", "sd3", _SD3, _SD35_LARGE, (128, 128), False,
            "SD3.5-large MMDiT (8B, 38 blocks, rms qk norm), 1024px"),
    _preset("flux-dev", "flux", _FLUX, _FLUX_DEV, (128, 128), False,
            "FLUX.1-dev (12B, 19 double + 38 single blocks, guidance embedding), 1024px", latent_packing=4),
    _preset("tiny-sd15", "unet", _UNET, {**_SD15, **_TINY_WIDTHS["sd15"]}, (16, 16), True,
            "SD1.5 topology (6 down / 1 mid / 9 up transformer blocks), tiny widths"),
    _preset("tiny-sdxl", "unet", _UNET, {**_SDXL, **_TINY_WIDTHS["sdxl"]}, (16, 16), True,
            "SDXL topology (d0-d23, m0-m9, u0-u35), tiny widths"),
    _preset("tiny-sd3", "sd3", _SD3, {**_SD3_MEDIUM, **_TINY_WIDTHS["sd3"]}, (16, 16), True,
            "SD3-medium topology (24 joint blocks, patch 2), tiny widths", _TINY_TEXT["sd3"]),
    _preset("tiny-sd35", "sd3", _SD3, {**_SD35_MEDIUM, **_TINY_WIDTHS["sd35"]}, (16, 16), True,
            "SD3.5-medium topology (24 blocks, dual attention 0..12, rms qk norm), tiny widths",
            _TINY_TEXT["sd3"]),
    _preset("tiny-flux", "flux", _FLUX, {**_FLUX_DEV, **_TINY_WIDTHS["flux"]}, (16, 16), True,
            "FLUX.1-dev topology (19 double + 38 single blocks, guidance embedding), tiny widths",
            _TINY_TEXT["flux"], latent_packing=4),
    _preset("flux2-dev", "flux2", _FLUX2, _FLUX2_DEV, (128, 128), False,
            "FLUX.2-dev (32B, 8 double + 48 single blocks, shared modulation, guidance embedding), 1024px",
            latent_packing=4),
    _preset("tiny-flux2", "flux2", _FLUX2, {**_FLUX2_DEV, **_TINY_WIDTHS["flux2"]}, (16, 16), True,
            "FLUX.2-dev topology (8 double + 48 single blocks, guidance embedding), tiny widths",
            _TINY_TEXT["flux2"], latent_packing=4),
    _preset("qwen-image", "qwenimage", _QWEN, _QWEN_IMAGE, (128, 128), False,
            "Qwen-Image MMDiT (20B, 60 dual-stream blocks), 1024px", latent_packing=4),
    _preset("tiny-qwenimage", "qwenimage", _QWEN, {**_QWEN_IMAGE, **_TINY_WIDTHS["qwenimage"]}, (16, 16), True,
            "Qwen-Image topology (60 dual-stream blocks), tiny widths", _TINY_TEXT["qwenimage"], latent_packing=4),
    _preset("wan21-1.3b", "wan", _WAN, _WAN21_1_3B, (60, 104), False,
            "Wan 2.1 T2V 1.3B (30 blocks), 480x832, 81 frames (21 latent frames)", frames=21),
    _preset("wan21-14b", "wan", _WAN, _WAN21_14B, (60, 104), False,
            "Wan 2.1 T2V 14B (40 blocks), 480x832, 81 frames (21 latent frames)", frames=21),
    _preset("wan22-a14b", "wan", _WAN, _WAN22_A14B, (60, 104), False,
            "Wan 2.2 T2V A14B (two 14B experts of 40 blocks, boundary 0.875), 480x832, 81 frames; "
            "bench counts one expert's step", frames=21, experts=2),
    _preset("tiny-wan", "wan", _WAN, {**_WAN21_1_3B, **_TINY_WIDTHS["wan"]}, (8, 8), True,
            "Wan 2.1 T2V 1.3B topology (30 blocks), tiny widths, 3 latent frames", _TINY_TEXT["wan"], frames=3),
    _preset("tiny-wan22", "wan", _WAN, {**_WAN22_A14B, **_TINY_WIDTHS["wan"]}, (8, 8), True,
            "Wan 2.2 T2V A14B topology (two experts of 40 blocks, boundary 0.875), tiny widths, "
            "3 latent frames", _TINY_TEXT["wan"], frames=3, experts=2),
], key=lambda p: p.tiny)}


def preset_problem(name: str) -> str | None:
    """Why `name` is not a preset (None: it is one)."""
    return None if name in PRESETS else f"unknown preset {name!r}; known: {', '.join(PRESETS)}"


def get_preset(name: str) -> Preset:
    problem = preset_problem(name)
    if problem:
        raise KeyError(problem)
    return PRESETS[name]


# what `guidance-rt generate` can build: a stock pipeline with random weights around a tiny preset
TINY = tuple(name for name, p in PRESETS.items() if p.tiny)


def tiny_preset_problem(name: str) -> str | None:
    """Why generate cannot build `name` (None: it can)."""
    if name in TINY:
        return None
    return (f"{name!r} is not a tiny preset; generate builds {', '.join(TINY)} (random weights); a real "
            "model goes in --model")
