"""Command line: `guidance-rt bench` (the main job), `guidance-rt generate`, `guidance-rt spec`.

Each subcommand is a pair of functions: ``add_<name>(subparsers)`` declares it and sets
``run=<function>``; ``SUBCOMMANDS`` lists the ``add_`` functions. A new subcommand is one more
pair and one more entry.

Declaring the parsers reads only torch-free tables (preset_configs, standard), and the ``run_``
functions import torch and diffusers only when they need them, so that --help and `spec` answer
in a fraction of a second.
"""
from __future__ import annotations

import argparse
import json
import sys

from .preset_configs import PRESETS, TINY, preset_problem, tiny_preset_problem
from .standard import FAMILY_PRESET, IMPLEMENTATIONS, standard_names

GUIDANCE_HELP = ("guidance: a spec such as 'cfg=5 pag=3@mid seg=3@mid:sigma=inf "
                 "slg=2.8@7,8,9:0.01-0.2', JSON, or a file holding either (grammar: README)")


def _dtype(name: str):
    import torch

    choices = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
               "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in choices:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; valid: float32, float16, bfloat16")
    return choices[name]


def _count(minimum: int):
    """argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _seed(text: str) -> int:
    """argparse type for bench and layers, which seed generators with seed + small offsets."""
    value = _count(0)(text)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"must be below 2**63 (generator seeds), got {value}")
    return value


def _checked(problem):
    """argparse type: the text itself, once problem(text) finds nothing wrong with it."""
    def parse(text: str) -> str:
        why = problem(text)
        if why:
            raise argparse.ArgumentTypeError(why)
        return text
    return parse


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,4,8, got {text!r}")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers such as 1,4,8, got {text!r}")
    return values


def _fail(command: str, err: BaseException) -> int:
    # a KeyError's str() is its message quoted: print the message itself
    message = err.args[0] if isinstance(err, KeyError) and err.args else err
    print(f"guidance-rt {command}: {message}", file=sys.stderr)
    return 2


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error: "<prog>: <message>", exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------- bench

def add_bench(sub) -> None:
    names = "; ".join(f"{fam}: {', '.join(n)}" for fam, n in standard_names().items())
    p = sub.add_parser(
        "bench", help="time guided steps: guidance-rt packed vs the sequential reference and peers",
        description="Per-step latency of guided denoiser calls for guidance-rt (packed), the "
                    "sequential reference and every installed peer that does the same job, in one "
                    "process on the same inputs; ratio to a CFG-only step, its FLOP floor, "
                    "efficiency, peak memory and throughput.")
    p.add_argument("--preset", default="tiny",
                   help="comma-separated presets or local model folders (default 'tiny': each "
                        f"family's bench preset, {', '.join(FAMILY_PRESET.values())}); presets: {', '.join(PRESETS)}")
    p.add_argument("--guidance", action="append", metavar="SPEC",
                   help=f"configuration (repeatable): a standard name ({names}) or a {GUIDANCE_HELP}; "
                        "default: the standard set of the preset's family")
    p.add_argument("--batch", type=_int_list, default=(1,), metavar="B[,B...]",
                   help="batch sizes, e.g. 1,4,8 (throughput in images/s per size)")
    p.add_argument("--steps", type=_count(1), default=30,
                   help="sampling steps of the run a step belongs to: terms' windows and img/s")
    p.add_argument("--size", metavar="WxH", help="image size in pixels, multiples of the model's factor "
                                                "(8 UNet, 16 SD3 and FLUX; default: the preset's); the "
                                                "inputs and the FLOP floors are at this size")
    p.add_argument("--repeats", type=_count(1), default=None, help="timed calls (default 10 CPU, 50 CUDA)")
    p.add_argument("--warmup", type=_count(0), default=None, help="warm-up calls (default 2 CPU, 10 CUDA)")
    p.add_argument("--dtype", type=_dtype, default="float32", help="float32, float16 or bfloat16")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile each implementation's step")
    p.add_argument("--impl", action="append", choices=IMPLEMENTATIONS,
                   help="implementations to run (repeatable; default all)")
    p.add_argument("--threads", type=_count(1), default=None,
                   help="CPU intra-op threads (default: 1 for tiny presets, else torch's default)")
    p.add_argument("--seed", type=_seed, default=0, help="0 <= S < 2**63")
    p.add_argument("--json", metavar="FILE", help="write every row and the environment as JSON")
    p.add_argument("--markdown", metavar="FILE", help="write the commit, the environment and one table per "
                                                     "preset (median, spread, ratio, floor, efficiency, "
                                                     "speed-up vs each peer, noisy flag) as markdown")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    p.set_defaults(run=run_bench)


def _standard_names_of(presets: list[str]) -> str:
    """The standard configuration names of the families of `presets` (every family's when one of
    them is 'tiny' or a folder, whose family is known only once it is loaded)."""
    names = standard_names()
    families = [PRESETS[p].family for p in presets if p in PRESETS]
    if len(families) < len(presets):
        families = list(names)
    return "; ".join(f"{fam}: {', '.join(names[fam])}" for fam in dict.fromkeys(families))


def _check_bench_guidance(items: list[str], presets: list[str]) -> None:
    """Each --guidance is a standard name or a spec; checked before torch is imported."""
    from . import spec

    known = {name.lower() for names in standard_names().values() for name in names}
    for item in items:
        if item.strip().lower() in known:
            continue
        try:
            spec.load_guidance(item)
        except spec.SpecError as e:
            raise ValueError(f"configuration {item!r} is neither a standard name ({_standard_names_of(presets)}) "
                             f"nor a guidance spec: {e}") from None


def run_bench(args) -> int:
    presets = [s.strip() for s in args.preset.split(",") if s.strip()]
    try:
        _check_bench_guidance(args.guidance or [], presets)
    except ValueError as e:
        return _fail("bench", e)

    import torch

    from . import bench

    size = None
    if args.size:
        from .generate import parse_size

        try:
            size = parse_size(args.size)
        except ValueError as e:
            return _fail("bench", e)
    opts = bench.Options(presets=presets, size=size,
                         guidance=args.guidance, batches=args.batch, steps=args.steps,
                         repeats=args.repeats, warmup=args.warmup, dtype=args.dtype,
                         device=args.device, compile=args.compile, seed=args.seed,
                         implementations=tuple(args.impl or bench.IMPLEMENTATIONS),
                         progress=args.progress, threads=args.threads)
    env = bench.environment(opts.device)
    dev = env["device"]
    where = (f"{bench.cpu_threads(opts)} of {dev.get('cores')} threads" if env["device_type"] == "cpu"
             else f"CUDA {dev.get('cuda')}")
    print(f"guidance-rt bench on {env['device_type']} ({dev.get('name')}, {where}), "
          f"torch {env['torch']}, diffusers {env['diffusers']}, {str(opts.dtype).replace('torch.', '')}"
          f"{', compiled' if opts.compile else ''}")
    try:
        rows = bench.run(opts, log=lambda s: print(s, flush=True))
    except (KeyError, ValueError, OSError) as e:
        return _fail("bench", e)
    print()
    print(bench.format_table(rows), end="")
    print("ms/step: median of timed calls of one guided step; IQR: interquartile range; ratio: to "
          "the CFG-only step of the same implementation; floor: that ratio in FLOPs of the rows "
          "guidance-rt runs; eff = floor / ratio; peak MiB: " +
          ("max_memory_allocated during a step" if torch.device(env["device_type"]).type == "cuda"
           else "live tensor storage created by a step's ATen ops") +
          "; img/s: batch / (steps x ms/step); vs ref: relative difference to the reference; vs peer: "
          "the peer's ms / guidance-rt's ms (guidance-rt's row: the fastest working peer); NOISY: IQR "
          f"above {bench.NOISY_IQR:.0%} of the median after re-timing.")
    summary = bench.summary(rows)
    if summary:
        print()
        print(summary, end="")
    report = bench.report(rows, opts) if args.json or args.markdown else None
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, allow_nan=False)
        print(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(bench.markdown(report))
        print(f"wrote {args.markdown}")
    return 1 if any(r["status"] == "error" for r in rows) else 0


# ------------------------------------------------------------------------------------- generate

def add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate images with a stock diffusers pipeline under guided()",
        description="Generate with guidance-rt around the model's stock diffusers pipeline; the "
                    "settings go into each PNG so that --from-image reproduces it.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local pipeline folder (save_pretrained) or Hugging Face hub id")
    src.add_argument("--preset", type=_checked(tiny_preset_problem),
                     help=f"a tiny preset pipeline with random weights ({', '.join(TINY)}): smoke tests")
    src.add_argument("--from-image", metavar="PNG", help="reproduce an image from its own settings "
                     "(options given here override them)")
    src.add_argument("--settings", metavar="FILE.json", help="run the settings of a JSON file, as "
                     "--save-settings writes them (options given here override them)")
    p.add_argument("--prompt")
    p.add_argument("--negative-prompt")
    p.add_argument("--nag-negative-prompt", help="the prompt NAG guides away from (NAG needs one: default "
                                                 "--negative-prompt when given; \"\" for an empty one)")
    p.add_argument("--guidance", metavar="SPEC", help=GUIDANCE_HELP + " (default: CFG for the family)")
    p.add_argument("--steps", type=int, help="1 to 10000 (default 30)")
    p.add_argument("--size", metavar="WxH", help="image size in pixels, multiples of the model's factor "
                                                "(8 UNet, 16 SD3 and FLUX; default: the model's)")
    p.add_argument("--seed", type=int, help="0 <= S and S + B - 1 < 2**64 (image i of a batch is "
                                           "seeded S + i; default 0)")
    p.add_argument("--batch", type=int, help="images per prompt (1 to 1024)")
    p.add_argument("--grid", nargs="+", metavar="PARAM=v1,v2",
                   help="comparison grid over guidance parameters, e.g. pag.scale=0,1.5,3 "
                        "seg.sigma=1,inf (term.field; a term alone means its scale; list values in "
                        "brackets: slg.layers=[7,8,9],[8])")
    p.add_argument("--out", help="output PNG (default guidance-rt.png; with several images "
                                 "-<index> is added before .png)")
    p.add_argument("--save-settings", metavar="FILE.json",
                   help="also write the run's complete settings (the JSON each PNG stores) to this file, "
                        "for --settings")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything and load the pipeline (it fixes the scheduler and default "
                        "size) but generate nothing; with --save-settings, write them")
    p.add_argument("--dtype", type=_dtype, default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None)
    p.add_argument("--allow-download", action="store_true",
                   help="let --from-image or --settings download the hub model they name (without it, "
                        "only a model already in the hub cache or a local folder is used)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar of the steps, and of the images when a grid makes several "
                        "pipeline calls (default: when stderr is a terminal)")
    p.set_defaults(run=run_generate)


def run_generate(args) -> int:
    from . import generate

    try:
        generate.main(args, log=print)
    except (ValueError, KeyError, OSError, generate.ModelMissing) as e:
        return _fail("generate", e)
    return 0


# ----------------------------------------------------------------------------------------- spec

def add_spec(sub) -> None:
    p = sub.add_parser("spec", help="check a guidance spec; print its canonical form and JSON")
    p.add_argument("guidance", nargs="+", help=GUIDANCE_HELP + " (several arguments are joined)")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--preset", type=_checked(preset_problem),
                       help="also check layers and fields against this preset's model (built without "
                            f"weights): {', '.join(PRESETS)}")
    model.add_argument("--model", help="also check against this pipeline folder's (or cached hub "
                                       "model's) denoiser, from its configs; nothing is downloaded")
    p.set_defaults(run=run_spec)


def run_spec(args) -> int:
    from . import spec

    try:
        g = spec.load_guidance(" ".join(args.guidance))
        text = spec.format_spec(g)
    except (ValueError, KeyError) as e:
        return _fail("spec", e)
    if args.preset or args.model:   # the model's blocks: only here are torch and diffusers needed
        from . import generate

        try:
            info = generate.inspect_model(generate.Settings(preset=args.preset, model=args.model),
                                          no_download="guidance-rt spec does not download")
            generate.check_guidance(info, [g])
        except (ValueError, KeyError, generate.ModelMissing) as e:
            return _fail("spec", e)
    print(text)
    print(spec.to_json(g, indent=2))
    return 0


# --------------------------------------------------------------------------------------- layers

def add_layers(sub) -> None:
    p = sub.add_parser(
        "layers", help="CSLG layer finding: rank blocks by how they separate contrastive prompt pairs",
        description="Runs each prompt pair (same seed, same latent) as rows of packed forwards, "
                    "captures every block's attention output and ranks the blocks by the drop in "
                    "cosine similarity between the pair (first difference, relative change), and by "
                    "how much skipping each block alone changes the prediction. Writes "
                    "captures.safetensors, ranking.json and layers.png (guidance_rt.analysis).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", type=_checked(preset_problem),
                     help=f"a preset with random weights ({', '.join(PRESETS)}); prompts become "
                          "deterministic pseudo-embeddings")
    src.add_argument("--model", help="local diffusers pipeline folder (from_pretrained, offline)")
    p.add_argument("--pairs", default=None, help="JSON prompt pairs (default: the shipped visible-text pairs)")
    p.add_argument("--out", default="guidance-rt-layers", help="output folder (default guidance-rt-layers)")
    p.add_argument("--mode", default="both", choices=["cosine", "skip", "both"],
                   help="cosine: rank by the drop in the pairs' cosine similarity; skip: by how much "
                        "skipping each block alone changes the prediction; both (default)")
    p.add_argument("--steps", type=_count(1), default=None, help="sampling steps (default 4 bare, 28 pipeline)")
    p.add_argument("--capture-step", type=int, action="append", dest="capture_steps", metavar="I",
                   help="step index to capture (repeatable; default -1, the last)")
    p.add_argument("--seed", type=_seed, default=0, help="0 <= S < 2**63")
    p.add_argument("--batch-pairs", type=_count(1), default=4, help="pairs per packed forward")
    p.add_argument("--skip-chunk", type=_count(1), default=8, help="skipped layers per packed forward")
    p.add_argument("--skip-layers", default=None, help="restrict skip mode to these layers, e.g. 0-18")
    p.add_argument("--top", type=_count(1), default=5, help="candidates to report and mark")
    p.add_argument("--full-captures", action="store_true", help="also save the full attention outputs")
    p.add_argument("--dtype", type=_dtype, default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None)
    p.set_defaults(run=run_layers)


def run_layers(args) -> int:
    from . import analysis

    try:
        ranking = analysis.run_cli(args)
    except (ValueError, KeyError, OSError, TypeError) as e:
        return _fail("layers", e)
    print(analysis.format_ranking(ranking, args.top))
    return 0


SUBCOMMANDS = [add_bench, add_generate, add_spec, add_layers]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="guidance-rt", description="Training-free guidance for "
                     "diffusion models, every branch in one packed forward.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:   # --help, or a usage error already reported: its exit status
        return e.code
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
