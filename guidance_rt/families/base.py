"""The Adapter interface every model family implements, and what their forwards share.

A family module declares, as class attributes of its Adapter: the diffusers classes it serves,
how its blocks are addressed and which are the defaults, which forward arguments are not batched
per sample, its NAG default, and what the pipelines integration needs; and it implements
`enumerate_layers` and the packed `forward`. The runtime asks these; it knows no family by name.

The forward runs stock diffusers submodules (resnets, norms, projections, unperturbed blocks) on
the live rows and takes over only where rows differ: forks, skipped blocks, shuffled tokens and
perturbed attention, all executed from the plan (guidance_rt.plan) through guidance_rt.ops.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from .. import ops
from ..layers import Layer, LayerNotFoundError, describe, match_layers
from ..plan import BlockPlan, Permutations, StepPlan


class Adapter:
    name: ClassVar[str] = ""                       # the family's name: "unet", "sd3", "flux"
    title: ClassVar[str] = ""                      # its name in messages: "SD1.5/SDXL", "FLUX"
    classes: ClassVar[tuple[str, ...]] = ()        # diffusers model classes it serves
    pipelines: ClassVar[tuple[str, ...]] = ()      # diffusers pipeline classes guided() wraps
    denoiser_attribute: ClassVar[str] = "transformer"   # the pipeline's attribute holding the model
    # further attributes holding denoisers of the same family that the pipeline switches to
    # (Wan 2.2's transformer_2), guided alike; absent or None ones are skipped
    denoiser_attributes: ClassVar[tuple[str, ...]] = ()
    # such an attribute -> the pipeline argument giving its own CFG scale (Wan: guidance_scale_2)
    expert_cfg_arguments: ClassVar[dict] = {}
    # layer addressing: bare integers address blocks; part names that address all their blocks
    by_index: ClassVar[bool] = True
    parts: ClassVar[tuple[str, ...]] = ()
    # per layer role (methods.base.PerturbationTerm.layer_role): the layers a term without
    # `layers` perturbs
    default_layers: ClassVar[dict] = {}
    self_attention: ClassVar[str] = "attn"         # a block's attention module that PAG perturbs
    unbatched: ClassVar[tuple[str, ...]] = ()      # forward arguments shared by every row
    nag_alpha: ClassVar[float] = 0.5               # NAG's alpha when the term leaves it None
    text_tokens: ClassVar[int] = 77                # text tokens its stock pipeline feeds by default
    default_guidance: ClassVar[str] = "cfg=5"      # `guidance-rt generate`'s default spec
    # its pipelines: the CFG scale argument, and whether CFG's uncond prediction is a second
    # denoiser call per step (FLUX's true CFG) instead of the uncond half of a doubled batch
    cfg_argument: ClassVar[str] = "guidance_scale"
    uncond_call: ClassVar[bool] = False
    # with uncond_call: whether the pipeline runs CFG only when given a negative prompt (FLUX), and
    # which of its encode_prompt calls' results holds the negative prompt (FLUX: the second; Wan:
    # the first and only one, returning both)
    cfg_needs_negative: ClassVar[bool] = True
    uncond_encoding: ClassVar[int] = 1
    # `guidance-rt generate`: the pipeline's images-per-prompt argument, the output attribute
    # holding its results (a video pipeline's: lists of frames), and the (width, height) in
    # pixels when the pipeline has no default_sample_size and the model no sample_size
    batch_argument: ClassVar[str] = "num_images_per_prompt"
    pipeline_output: ClassVar[str] = "images"
    default_pixels: ClassVar[tuple[int, int] | None] = None
    # what methods may ask of it: its timestep is a sigma in 0..1 (not 0..1000); its forward
    # collects S-CFG's semantic maps
    sigma_timesteps: ClassVar[bool] = False
    # its forward also takes a timestep per sample and token, (batch, tokens) (Wan 2.2 TI2V)
    token_timesteps: ClassVar[bool] = False
    semantic_maps: ClassVar[bool] = False
    # no rotary embedding after SEG's mean: a mean-blurred row's image queries stay identical
    # in its attention (ops.attention_runs)
    mean_identical: ClassVar[bool] = False
    # the pipeline rescales CFG's guided prediction per token to the cond prediction's norm over
    # the last (channel) dim (QwenImagePipeline's true CFG): the denoiser does so on every step
    # with the uncond row, after every term (combine.renorm_to_cond)
    cfg_renorm: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = self.enumerate_layers(model)
        self.trace: dict[int, int] | None = None   # position -> rows run, when tracing

    # ---------------------------------------------------------------- declarations

    @staticmethod
    def enumerate_layers(model: nn.Module) -> list[Layer]:
        """Every addressable block of the model, in execution order."""
        raise NotImplementedError

    @classmethod
    def resolve(cls, model: nn.Module, layers: list[Layer], spec, term: str = "layers", role: str | None = None,
                keep_order: bool = False) -> tuple[Layer, ...]:
        """The blocks a layer spec names (None: the family's default for `role`)."""
        if spec is None:
            spec = cls.default_layers.get(role)
            if spec is None:
                raise LayerNotFoundError(f"{term}: no default layers for {cls.name}; {describe(layers)}")
        return match_layers(layers, spec, by_index=cls.by_index, parts=cls.parts, owner=type(model).__name__,
                            term=term, keep_order=keep_order)

    @staticmethod
    def latent_multiple(config: dict) -> int:
        """Latent sides must be multiples of this (the patch size)."""
        return 1

    @staticmethod
    def latent_limit(config: dict) -> int | None:
        """The largest latent side the model's position embedding covers (None: no limit)."""
        return None

    @staticmethod
    def pipeline_class(config: dict) -> str:
        """The stock diffusers pipeline built around a model of this config."""
        raise NotImplementedError

    @staticmethod
    def encode_negative(pipe, original_class: type, kind: str, text: str) -> dict:
        """NAG's negative prompt through the pipeline's own text encoders (one row): the
        forward arguments it conditions (pipeline class `kind`, its stock class `original_class`)."""
        raise NotImplementedError

    @staticmethod
    def uncond_arguments(arguments: dict, encoded) -> dict:
        """With `uncond_call`: the uncond call's forward arguments, from the cond call's and the
        result of the pipeline's encode_prompt call number `uncond_encoding` (FLUX: the second,
        embeds, pooled, txt_ids)."""
        neg_embeds, neg_pooled, neg_ids = encoded
        return dict(arguments, encoder_hidden_states=neg_embeds, pooled_projections=neg_pooled, txt_ids=neg_ids)

    @staticmethod
    def pair(uncond: dict, cond: dict) -> tuple[dict, dict]:
        """uncond and cond forward arguments made packable into one batch (Qwen-Image: text of
        different lengths padded, with key masks); by default unchanged."""
        return uncond, cond

    @staticmethod
    def example_step(config: dict, batch: int, height: int, width: int, text_len: int, t: float, randn):
        """One step's random inputs in the stock pipeline's conventions (presets.example_inputs):
        (sample, timestep, branch) where branch() draws one branch's forward arguments. `randn`
        draws on the caller's device and dtype; `t` is the noise level in (0, 1)."""
        raise NotImplementedError

    @staticmethod
    def capture_site(layer: Layer, block: nn.Module) -> tuple[nn.Module, str, bool]:
        """The module whose output stands for a block in CSLG layer finding (guidance_rt.analysis),
        its description, and whether the image tokens are the last of its output's tokens (then
        only those are compared; False: the output is image tokens only)."""
        return block.attn.to_out[0], f"{layer.path}.attn.to_out.0", False

    @staticmethod
    def scheduler():
        """The stock pipeline's scheduler with its default configuration (layer finding runs)."""
        import diffusers
        return diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)

    @staticmethod
    def model_input(scheduler, x: torch.Tensor, t: torch.Tensor, n: int):
        """(sample, timestep) the stock pipeline passes the model at scheduler timestep t."""
        return x, t.expand(n).to(x.dtype)

    def output_shape(self, sample: torch.Tensor) -> tuple[int, ...]:
        """The shape of the model's prediction for `sample`: channels first, as the sample's,
        with the model's output channels (FLUX: channels last)."""
        return (sample.shape[0], self.model.config.out_channels, *sample.shape[2:])

    def output(self, sample: torch.Tensor, return_dict: bool):
        """The guided prediction in the form the model's own forward returns."""
        if not return_dict:
            return (sample,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput
        return Transformer2DModelOutput(sample=sample)

    def image_tokens(self, sample: torch.Tensor, position: int) -> int:
        """The image tokens block `position` sees for this sample (TPG permutes that many)."""
        raise NotImplementedError

    def token_groups(self, sample: torch.Tensor, position: int) -> int:
        """Equal consecutive groups of those image tokens that TPG shuffles each within itself
        (video: the frames); 1: one permutation of all of them."""
        return 1

    # ---------------------------------------------------------------- the step

    def prepare(self, plan: StepPlan) -> None:
        """Build, once per plan, the device tables the forward reads (the attention's row
        tables), so that a step creates no tensor from host data."""
        for bp in plan.blocks.values():
            bp.attn = ops.attention_runs(self.attended(bp), self.layers[bp.position].heads, plan.device,
                                         self.mean_identical)

    def attended(self, bp: BlockPlan) -> tuple:
        """The segments of the rows the block's variant attention runs on."""
        return bp.self_attn

    def host_inputs(self, plan: StepPlan, cond: dict) -> dict:
        """Keyword arguments of `forward` that only the host can compute, from tensor values
        rather than shapes (FLUX: the token grid, from img_ids); computed before the step."""
        return {}

    def forward(self, plan: StepPlan, sample: torch.Tensor, timestep: torch.Tensor, base: dict,
                perms: Permutations | None, negative: dict | None = None, nag=None,
                extras: dict | None = None, **host) -> torch.Tensor:
        """The packed forward: every row of the plan in one pass. `base`: the model's forward
        arguments stacked over the base rows (uncond, cond); `timestep` one value per base row;
        `perms` TPG's permutations; `negative` and `nag` (denoiser.NagStep) while NAG is active;
        `extras`: method data a family may feed (S-CFG's semantic maps under "maps"); `host`:
        host_inputs. Returns the prediction of every row. A pure tensor function: it branches
        on the plan and on shapes only, never on tensor values, and copies nothing from the
        host, so torch.compile captures it whole."""
        raise NotImplementedError

    # ---------------------------------------------------------------- rows

    @staticmethod
    def grow(t: torch.Tensor | None, rows: int, plan: StepPlan, cond: slice | None = None) -> torch.Tensor | None:
        """Append cond-row copies for the branches that forked after `t` was computed
        (`cond`: where the cond rows are in `t`, if not at the layout's place)."""
        if t is None or t.shape[0] >= rows:
            return t
        missing = (rows - t.shape[0]) // plan.batch
        cond = t[plan.cond_rows if cond is None else cond]
        return torch.cat([t] + [cond] * missing)

    @staticmethod
    def per_row(t: torch.Tensor | None, plan: StepPlan) -> torch.Tensor | None:
        """A base-row input (uncond, cond) gathered for every row of the layout."""
        if t is None:
            return None
        return t.index_select(0, plan.row_source)

    @staticmethod
    def shuffle(x: torch.Tensor, bp: BlockPlan, perms: Permutations, image: slice = slice(None),
                first: int = 0) -> torch.Tensor:
        """TPG: permute the image tokens of the shuffled rows (one permutation per term/layer).
        `first`: x holds the run rows from `first` on (NAG's stream: the positive rows; shuffled
        rows are branch rows, never before it)."""
        if not bp.shuffle:
            return x
        table = perms.at(bp.position)
        if table.shape[1] != x[:, image].shape[1]:
            raise RuntimeError(f"block {bp.position}: {table.shape[1]} tokens permuted, "
                               f"{x[:, image].shape[1]} in the block (Adapter.image_tokens)")
        return ops.token_shuffle(x, table, bp.shuffle_table(first), image.start or 0)

    @staticmethod
    def drop_rows(t: torch.Tensor | None, keep: torch.Tensor | None) -> torch.Tensor | None:
        """Zero the output of a sublayer on the rows SLG skips it (`keep`: BlockPlan.keep)."""
        if keep is None or t is None:
            return t
        return t * keep.view(-1, *([1] * (t.dim() - 1)))

    def record(self, position: int, rows: int):
        if self.trace is not None:
            self.trace[position] = rows

    # ---------------------------------------------------------------- checks

    @staticmethod
    def require_processor(attn: nn.Module, allowed: tuple[str, ...], where: str):
        name = type(getattr(attn, "processor", None)).__name__
        if name not in allowed:
            raise NotImplementedError(
                f"{where}: attention processor {name} is not supported on a perturbed layer; "
                f"supported: {', '.join(allowed)} (remove custom processors or pick other layers)")
