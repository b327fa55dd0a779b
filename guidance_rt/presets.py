"""Model presets built in code: topology-faithful tiny models for tests, full-size ones for benchmarks.

Nothing here downloads anything. Every preset is a diffusers config dict; `build_model` builds it
with random weights, `example_inputs` makes one step's inputs in each pipeline's conventions, and
`build_pipeline` assembles a tiny stock diffusers pipeline (tokenizers, text encoders, VAE and
scheduler all made in code) around a tiny preset.

The table itself (configs, `PRESETS`, `get_preset`) is `preset_configs`, which needs no torch;
tiny presets keep the real model's block topology and shrink only widths (see there).

Conventions (one step, as each stock pipeline calls its denoiser):
- UNet (SD1.5, SDXL): sample (B, 4, H, W); timestep int64 in 0..999 (DDPM steps).
- SD3 / SD3.5: sample (B, 16, H, W); timestep float32 = sigma * 1000.
- FLUX: sample packed as FluxPipeline packs a (B, 16, H, W) latent: (B, H/2 * W/2, 64);
  timestep = sigma in 0..1 (the transformer multiplies by 1000 itself); img_ids / txt_ids 2-D.
- FLUX.2: sample packed as Flux2Pipeline packs a (B, 32, H, W) latent: (B, H/2 * W/2, 128);
  timestep = sigma; img_ids / txt_ids 2-D with 4 axes (t, h, w, l); guidance 4.0; no pooled text.
- Wan: sample (B, 16, F, H, W), F latent frames (the preset's `frames`); timestep float32 =
  the scheduler's t in 0..1000 (Wan 2.2 TI2V: one per latent token, (B, tokens)); UMT5 text.
H and W are always latent pixels (image pixels / 8).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

__all__ = [
    "Preset", "PRESETS", "FAMILIES", "get_preset", "build_model", "randomize_", "example_inputs",
    "build_pipeline", "pack_flux_latents", "unpack_flux_latents", "flux_image_ids",
]

from .families import FAMILIES as _FAMILY_CLASSES, model_family as _family_of
from .families.flux import flux_image_ids, pack_flux_latents, unpack_flux_latents
from .preset_configs import PRESETS, Preset, get_preset

FAMILIES = tuple(_FAMILY_CLASSES)

_VAE_SCALE = 8  # every family's VAE downsamples by 8 (SDXL's time_ids are in image pixels)


# ---------------------------------------------------------------------------------------------
# Models

@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Construct parameters directly in `dtype` (a full-size model in fp32 would not fit twice)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(name: str, *, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> nn.Module:
    """The preset's denoiser with random weights, in eval mode.

    Deterministic for (name, seed, device, dtype): every parameter is redrawn by `randomize_`.
    On the meta device the model is only constructed (no storage, no init): that is how
    full-size configs are inspected and counted without memory.
    """
    import diffusers

    preset = get_preset(name)
    cls = getattr(diffusers, preset.model_class)
    device = torch.device(device)
    if device.type == "meta":
        with torch.device("meta"), _default_dtype(dtype):
            return cls.from_config(preset.config).eval()
    # The stock init is thrown away below; fork the RNG so building a model does not move the
    # caller's random stream.
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices), torch.device(device), _default_dtype(dtype):
        model = cls.from_config(preset.config)
    if any(p.dtype != dtype for p in model.parameters()):
        model.to(dtype=dtype)  # anything diffusers created in an explicit dtype (to() warns, so only then)
    randomize_(model, seed)
    return model.eval()


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Redraw EVERY parameter of `module` in place, deterministically for a seed.

    diffusers zero-initialises some layers (adaLN gates and final projections in SD3/FLUX,
    ControlNet's zero convolutions, LoRA's B); a zero gate would make a perturbation of that block
    invisible in the output. Matrices and kernels get N(0, 1/fan_in), which keeps activations O(1)
    through the deep stacks; 1-D weights (norm scales) 1 + N(0, 0.1^2); biases N(0, 0.05^2).
    Values are drawn on each parameter's own device, so they are reproducible per device.
    """
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in module.named_parameters():
        if p.device.type == "meta":
            continue
        g = gens.get(p.device)
        if g is None:
            g = gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        noise = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
        if p.dim() >= 2:
            value = noise / math.sqrt(max(1, p[0].numel()))  # fan_in: in_features * kernel area
        elif name.endswith("weight"):
            value = 1.0 + 0.1 * noise
        else:
            value = 0.05 * noise
        p.copy_(value)
    return module


def _norm(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def _preset_of(model: nn.Module) -> Preset | None:
    """The preset a model was built from, matched on its config (survives save/load)."""
    cfg = model.config
    matches = [p for p in PRESETS.values() if p.model_class == type(model).__name__
               and all(_norm(cfg.get(k)) == _norm(v) for k, v in p.config.items())]
    return max(matches, key=lambda p: len(p.config), default=None)  # the most specific


# ---------------------------------------------------------------------------------------------
# FLUX packing (FluxPipeline._pack_latents / _unpack_latents / _prepare_latent_image_ids)

# ---------------------------------------------------------------------------------------------
# Inputs

def example_inputs(name_or_model, *, batch: int = 1, height: int | None = None, width: int | None = None,
                   seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu",
                   t: float = 0.5, text_len: int | None = None, frames: int | None = None) -> dict:
    """One denoising step's inputs, in the conventions of the model's stock pipeline.

    Returns {"sample", "timestep", "cond", "uncond", "negative", "height", "width"}: cond / uncond /
    negative are keyword-argument dicts for `model(sample, timestep=timestep, **cond)`, with the
    same keys and shapes and distinct random text embeddings (shared position ids, time ids and
    FLUX guidance, as in the pipelines). `height`/`width` are latent pixels (default: the preset's,
    or the config's sample_size for an unknown model); `t` is the noise level in (0, 1): sigma
    for SD3/FLUX, t * 999 rounded for a UNet. `frames`: latent frames of a video model (default:
    the preset's). Tensors are batch-major with batch `batch`, except
    FLUX's 2-D img_ids / txt_ids. Random values come from a CPU generator, so they do not depend
    on `device`.
    """
    if isinstance(name_or_model, str):
        preset = get_preset(name_or_model)
        family, cfg = preset.family, preset.config
    else:
        family, cfg = _family_of(name_or_model), dict(name_or_model.config)
        preset = _preset_of(name_or_model)
    family_cls = _FAMILY_CLASSES[family]
    if preset is not None:
        default_hw = preset.latent
        text_len = text_len or preset.text_len or family_cls.text_tokens
    else:
        s = cfg.get("sample_size") or 128
        default_hw = (s, s) if isinstance(s, int) else tuple(s)
        text_len = text_len or family_cls.text_tokens
    h, w = height or default_hw[0], width or default_hw[1]
    multiple = family_cls.latent_multiple(cfg)
    if h % multiple or w % multiple:
        raise ValueError(f"latent {h}x{w} must be divisible by {multiple} for a {family} model")

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    frames = frames or (preset.frames if preset is not None else 0)   # video presets: latent frames
    sample, timestep, branch = family_cls.example_step(cfg, batch, h, w, text_len, t, randn,
                                                       **({"frames": frames} if frames else {}))
    cond, uncond, negative = branch(), branch(), branch()
    return {"sample": sample, "timestep": timestep, "cond": cond, "uncond": uncond,
            "negative": negative, "height": h, "width": w}


# ---------------------------------------------------------------------------------------------
# Tiny stock pipelines

_CLIP_MAX_LEN = 77


def _clip_tokenizer():
    """A byte-level CLIP BPE tokenizer with no merges: every byte is a token (plus its end-of-word
    form), which is all a random text encoder needs."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=_CLIP_MAX_LEN)


def _t5_tokenizer():
    """A T5 (Unigram) tokenizer over single characters, with T5's special ids: pad 0, eos 1, unk 2."""
    from transformers import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars + chars[:26].upper()]
    vocab += [("\u2581" + c, -3.5) for c in chars + chars[:26].upper()]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _clip_text(tokenizer, hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=_CLIP_MAX_LEN,
        projection_dim=projection or hidden, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def _t5_text(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_ff=2 * d_model, d_kv=8,
                      num_heads=d_model // 8, num_layers=2, relative_attention_num_buckets=8,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def _qwen_tokenizer():
    """A byte-level BPE Qwen2 tokenizer with no merges (every byte a token), with the chat
    template's special tokens, built with the `tokenizers` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    out = Qwen2Tokenizer(tokenizer_object=tok, unk_token=None, bos_token=None, eos_token="<|endoftext|>",
                         pad_token="<|endoftext|>")
    out.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return out


def _qwen_text(tokenizer, hidden: int):
    """A tiny random Qwen2.5-VL (2 text layers, 2 vision layers), as diffusers' pipeline tests
    (mrope sections sum to half the 16-wide text heads)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": hidden, "intermediate_size": hidden, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": len(tokenizer),
                     "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                     "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": hidden},
        hidden_size=hidden, vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _qwen_vae(latent_channels: int):
    """A tiny AutoencoderKLQwenImage with the real 8x spatial downsampling (3 levels)."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=8, z_dim=latent_channels, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                  temperal_downsample=[False, True, True], latents_mean=[0.0] * latent_channels,
                                  latents_std=[1.0] * latent_channels).eval()


def _vae(latent_channels: int, *, scaling_factor: float, shift_factor: float | None, quant_conv: bool):
    """A tiny AutoencoderKL with the real 8x downsampling (4 levels)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=128,
        scaling_factor=scaling_factor, shift_factor=shift_factor,
        use_quant_conv=quant_conv, use_post_quant_conv=quant_conv).eval()


# the FLUX.2 pipeline's chat format, enough for Flux2Pipeline's apply_chat_template: each message's
# text parts (content given as a string or as [{"type": "text", "text": ...}]) in Mistral's
# [SYSTEM_PROMPT] / [INST] markers
_MISTRAL_CHAT = (
    "{{ bos_token }}{% for m in messages %}{% set c = m['content'] %}"
    "{% if c is string %}{% set t = c %}{% else %}{% set t = c | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('') %}{% endif %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ t }}[/SYSTEM_PROMPT]{% elif m['role'] == 'user' %}"
    "[INST]{{ t }}[/INST]{% else %}{{ t }}{{ eos_token }}{% endif %}{% endfor %}")


def _mistral_tokenizer():
    """A byte-level BPE tokenizer with no merges (every byte a token) built with `tokenizers`, with
    Mistral's special tokens (unk 0, bos 1, eos 2, pad 11 as in Mistral Small 3.1) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<unk>", "<s>", "</s>"] + [f"[CONTROL_{i}]" for i in range(3, 11)] + ["<pad>"] + \
        ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({c: len(specials) + i for i, c in enumerate(bytes_to_unicode().values())})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=512, chat_template=_MISTRAL_CHAT)


def _mistral3_text(tokenizer, hidden: int, layers: int = 30):
    """A tiny Mistral3ForConditionalGeneration (FLUX.2-dev's text encoder class): `layers` language
    layers, so that Flux2Pipeline's default text_encoder_out_layers (10, 20, 30) exist, and a
    one-layer Pixtral vision tower (unused for text)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=2 * hidden, max_position_embeddings=512, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=hidden // 2, num_hidden_layers=layers,
                         rms_norm_eps=1e-5, rope_theta=1e9, sliding_window=None, **ids),
        vision_config=dict(model_type="pixtral", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, image_size=32, patch_size=8, num_channels=3),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), vision_feature_layer=-1, **ids)
    return Mistral3ForConditionalGeneration(config).eval()


def _flux2_vae(latent_channels: int):
    """A tiny AutoencoderKLFlux2 with the real 8x downsampling (4 levels)."""
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=128,
        use_quant_conv=False, use_post_quant_conv=False).eval()


def _umt5_text(tokenizer, d_model: int):
    """A tiny random UMT5 encoder (Wan's text encoder is UMT5-XXL)."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=len(tokenizer), d_model=d_model, d_ff=2 * d_model, d_kv=8,
                        num_heads=d_model // 8, num_layers=2, relative_attention_num_buckets=8,
                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return UMT5EncoderModel(config).eval()


def _wan_vae(latent_channels: int):
    """A tiny AutoencoderKLWan with the real compression: 4x in time (2 temporal downsamples),
    8x in space (3 levels); as diffusers' own Wan pipeline tests build it."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=3, z_dim=latent_channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def _wan_parts(name: str, preset: Preset, denoiser: nn.Module, seed: int) -> dict:
    """WanPipeline's components around a tiny Wan preset (two experts for a Wan 2.2 A14B one)."""
    import diffusers as D

    tok = _t5_tokenizer()
    parts = dict(
        tokenizer=tok, text_encoder=_umt5_text(tok, preset.config["text_dim"]),
        vae=_wan_vae(preset.latent_channels), transformer=denoiser,
        # Wan 2.1 / 2.2's published scheduler: UniPC on flow sigmas, shift 3 (480p)
        scheduler=D.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            flow_shift=3.0))
    if preset.experts == 2:
        parts.update(transformer_2=build_model(name, seed=seed + 1), boundary_ratio=0.875)
    return parts


def _add_random_lora(model: nn.Module, seed: int) -> None:
    """A rank-4 LoRA on every attention projection, registered through diffusers' peft integration
    (`add_adapter`, so pipe.set_adapters / fuse_lora / lora scale work), with non-zero B so it
    changes the output."""
    try:
        from peft import LoraConfig
    except ImportError as e:  # diffusers' LoRA support is peft
        raise ImportError("build_pipeline(lora=True) needs the `peft` package") from e
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_adapter(config, adapter_name="tiny-lora")


def build_pipeline(name: str, *, seed: int = 0, controlnet: bool = False, lora: bool = False):
    """A stock diffusers pipeline around the tiny preset `name`, every component built in code.

    tiny-sd15 -> StableDiffusionPipeline (DDIM), tiny-sdxl -> StableDiffusionXLPipeline
    (EulerDiscrete), tiny-sd3 / tiny-sd35 -> StableDiffusion3Pipeline, tiny-flux -> FluxPipeline
    (FlowMatchEulerDiscrete), tiny-qwenimage -> QwenImagePipeline (tiny random Qwen2.5-VL),
    tiny-wan / tiny-wan22 -> WanPipeline (UniPC flow; tiny-wan22 with two experts, boundary_ratio
    0.875; call it with height, width and num_frames: 64, 64, 9 for the preset's 3 x 8 x 8
    latent). `controlnet=True` (UNet presets only) gives the ControlNet variant
    with a random ControlNetModel.from_unet (call it with `image=`, a control image in pixels);
    `lora=True` adds a random LoRA adapter named "tiny-lora" to the denoiser (needs peft).
    Default image size is 8x the preset latent (128 px); progress bars are off.
    """
    import diffusers as D

    preset = get_preset(name)
    if not preset.tiny:
        raise ValueError(f"build_pipeline builds tiny presets only, not {name!r}")
    if controlnet and preset.family != "unet":
        raise ValueError("controlnet=True is supported for the UNet presets (tiny-sd15, tiny-sdxl)")
    cfg = preset.config
    denoiser = build_model(name, seed=seed)

    # Everything else uses its library's own init, made deterministic by seeding a forked RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "tiny-sd15":
            tok = _clip_tokenizer()
            parts = dict(
                vae=_vae(4, scaling_factor=0.18215, shift_factor=None, quant_conv=True),
                text_encoder=_clip_text(tok, cfg["cross_attention_dim"]), tokenizer=tok, unet=denoiser,
                scheduler=D.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                          clip_sample=False, set_alpha_to_one=False, steps_offset=1),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            cls = D.StableDiffusionControlNetPipeline if controlnet else D.StableDiffusionPipeline
        elif name == "tiny-sdxl":
            tok, tok2 = _clip_tokenizer(), _clip_tokenizer()
            pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            h1 = cfg["cross_attention_dim"] - pooled  # the two encoders' hidden states are concatenated
            parts = dict(
                vae=_vae(4, scaling_factor=0.13025, shift_factor=None, quant_conv=True),
                text_encoder=_clip_text(tok, h1), tokenizer=tok,
                text_encoder_2=_clip_text(tok2, pooled, projection=pooled), tokenizer_2=tok2,
                unet=denoiser,
                scheduler=D.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                                   beta_schedule="scaled_linear", steps_offset=1,
                                                   timestep_spacing="leading"),
                add_watermarker=False)
            cls = D.StableDiffusionXLControlNetPipeline if controlnet else D.StableDiffusionXLPipeline
        elif preset.family == "sd3":
            tok, tok2, tok3 = _clip_tokenizer(), _clip_tokenizer(), _t5_tokenizer()
            half = cfg["pooled_projection_dim"] // 2  # pooled = concat of the two CLIP projections
            parts = dict(
                vae=_vae(16, scaling_factor=1.5305, shift_factor=0.0609, quant_conv=False),
                text_encoder=_clip_text(tok, half, projection=half), tokenizer=tok,
                text_encoder_2=_clip_text(tok2, half, projection=half), tokenizer_2=tok2,
                # CLIP hidden states (2 * half) are zero-padded up to the T5 width
                text_encoder_3=_t5_text(tok3, cfg["joint_attention_dim"]), tokenizer_3=tok3,
                transformer=denoiser,
                scheduler=D.FlowMatchEulerDiscreteScheduler(shift=3.0))
            cls = D.StableDiffusion3Pipeline
        elif preset.family == "flux2":
            tok = _mistral_tokenizer()
            parts = dict(
                vae=_flux2_vae(preset.latent_channels),
                # the pipeline stacks 3 hidden layers: joint_attention_dim = 3 x the encoder width
                text_encoder=_mistral3_text(tok, cfg["joint_attention_dim"] // 3), tokenizer=tok,
                transformer=denoiser,
                scheduler=D.FlowMatchEulerDiscreteScheduler(   # FLUX.2-dev's scheduler config
                    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                    base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential"))
            cls = D.Flux2Pipeline
        elif preset.family == "qwenimage":
            tok = _qwen_tokenizer()
            parts = dict(vae=_qwen_vae(preset.latent_channels), text_encoder=_qwen_text(tok, cfg["joint_attention_dim"]),
                         tokenizer=tok, transformer=denoiser,
                         scheduler=D.FlowMatchEulerDiscreteScheduler(
                             shift=1.0, use_dynamic_shifting=True, base_shift=math.log(3), max_shift=math.log(3),
                             base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                             time_shift_type="exponential"))   # Qwen-Image's scheduler config
            cls = D.QwenImagePipeline
        elif preset.family == "wan":
            parts, cls = _wan_parts(name, preset, denoiser, seed), D.WanPipeline
        else:  # flux
            tok, tok2 = _clip_tokenizer(), _t5_tokenizer()
            parts = dict(
                vae=_vae(16, scaling_factor=0.3611, shift_factor=0.1159, quant_conv=False),
                text_encoder=_clip_text(tok, cfg["pooled_projection_dim"]), tokenizer=tok,
                text_encoder_2=_t5_text(tok2, cfg["joint_attention_dim"]), tokenizer_2=tok2,
                transformer=denoiser,
                scheduler=D.FlowMatchEulerDiscreteScheduler(
                    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                    base_image_seq_len=256, max_image_seq_len=4096))
            cls = D.FluxPipeline
        if controlnet:
            # conditioning embedding of 4 levels = the VAE's 8x; randomized so that the zero
            # convolutions do not hide the control signal
            parts["controlnet"] = randomize_(D.ControlNetModel.from_unet(
                denoiser, conditioning_embedding_out_channels=(4, 4, 4, 4)), seed + 1).eval()
    if lora:
        _add_random_lora(denoiser, seed + 2)

    pipe = cls(**parts)
    if preset.family in ("flux", "flux2", "qwenimage"):
        pipe.default_sample_size = preset.latent[0]  # FluxPipeline hard-codes 128 (1024 px)
    if preset.frames:   # a video pipeline defaults to its full size (Wan: 480x832, 81 frames)
        pipe.default_sample_size = preset.latent[0]
        pipe.default_num_frames = (preset.frames - 1) * pipe.vae_scale_factor_temporal + 1
    pipe.set_progress_bar_config(disable=True)
    return pipe
