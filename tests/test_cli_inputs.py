"""Outside input to the command line: tampered PNG metadata, bad options and specs. Every error is
one line "guidance-rt <command>: <message>" with exit status 2, and everything that can be checked
without weights is rejected before a pipeline is built (load_pipeline / build_pipeline fail the
test when called)."""
import copy
import dataclasses
import json
import math
import random

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from guidance_rt import generate, presets, spec
from guidance_rt.cli import main
from guidance_rt.preset_configs import TINY
from tests.test_spec import _fuzz_cases

MAX_SEED = 2**64 - 1
MISSING_GPU = f"cuda:{max(7, torch.cuda.device_count())}"   # the tester's cuda:7, absent on any machine


@pytest.fixture
def no_build(monkeypatch):
    """Building a pipeline fails the test: the error must come first."""
    def fail(*args, **kwargs):
        pytest.fail("a pipeline was built before the error")
    monkeypatch.setattr(generate, "load_pipeline", fail)
    monkeypatch.setattr(presets, "build_pipeline", fail)


class Reached(Exception):
    """load_pipeline was called (with these settings): every check before it passed."""


@pytest.fixture
def reaches_build(monkeypatch):
    def stop(settings, *args, **kwargs):
        raise Reached(settings, args, kwargs)
    monkeypatch.setattr(generate, "load_pipeline", stop)


def _reached(argv) -> generate.Settings:
    with pytest.raises(Reached) as info:
        main(argv)
    return info.value.args[0]


def _error(capsys, argv, command="generate") -> str:
    """Run the command line; it must fail with exit status 2 and exactly one line on stderr."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"guidance-rt {command}: "), err
    return lines[0][len(f"guidance-rt {command}: "):]


# ---------------------------------------------------------------------------------------- PNGs

def _valid_settings() -> generate.Settings:
    """Complete settings as generate records them for tiny-sd15 (its pipeline's scheduler)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return generate.Settings(
        prompt="a cat", guidance="cfg=5", guidance_json=spec.to_dict(spec.parse_spec("cfg=5")), steps=2,
        width=64, height=64, seed=3, preset="tiny-sd15", dtype="float32", device="cpu", threads=1,
        scheduler={"class": "DDIMScheduler", "config": json.loads(scheduler.to_json_string())},
        pipeline="StableDiffusionPipeline", versions=generate._versions())


@pytest.fixture
def png(tmp_path):
    """A real PNG written by generate.save; png.tamper(text) rewrites its guidance-rt chunk."""
    path = tmp_path / "made.png"
    generate.save(Image.new("RGB", (8, 8), "gray"), _valid_settings(), str(path))

    class Png:
        name = str(path)

        @staticmethod
        def tamper(text: str) -> str:
            with Image.open(path) as im:
                chunks, pixels = dict(im.text), im.copy()
            chunks[generate.METADATA_KEY] = text
            info = PngInfo()
            for key, value in chunks.items():
                info.add_itxt(key, value)
            pixels.save(path, pnginfo=info)
            return str(path)

    return Png


def _edit(**changes):
    """JSON of the valid settings with fields changed (a value DELETE removes the field)."""
    data = json.loads(_valid_settings().to_json())
    for key, value in changes.items():
        if value is DELETE:
            del data[key]
        else:
            data[key] = value
    return json.dumps(data)


def _edit_scheduler(cls=None, **config):
    data = json.loads(_valid_settings().to_json())
    data["scheduler"]["config"].update(config)
    if cls is not None:
        data["scheduler"]["class"] = cls
    return json.dumps(data)


DELETE = object()

TAMPERED = {
    # the tester's cases
    "list": ("[1, 2]", "expected a JSON object of settings, got a list"),
    "steps-text": (_edit(steps="abc"), "steps: must be an integer, got a string 'abc'"),
    "steps-fraction": (_edit(steps=2.5), "steps: must be an integer, got a number 2.5"),
    "width-negative": (_edit(width=-64), "width: must be between 1 and 16384, got -64"),
    "dtype-save": (_edit(dtype="save"), "dtype: must be one of float32, float16, bfloat16, got 'save'"),
    "threads-negative": (_edit(threads=-1), "threads: must be between 1 and 1024, got -1"),
    "scheduler-timesteps": (_edit_scheduler(num_train_timesteps=-5),
                            "scheduler: DDIMScheduler.from_config rejects the config: RuntimeError"),
    "scheduler-not-a-scheduler": (_edit_scheduler("UNet2DConditionModel"),
                                  "scheduler: class 'UNet2DConditionModel' is not a diffusers scheduler"),
    "scheduler-base-class": (_edit_scheduler("SchedulerMixin"),
                             "scheduler: class 'SchedulerMixin' is not a diffusers scheduler"),
    "scheduler-dunder": (_edit_scheduler("__class__"), "scheduler: class '__class__' is not a diffusers scheduler"),
    "pack-string": (_edit(pack="cfg=5"), "pack: must be a list or null, got a string 'cfg=5'"),
    # missing and unknown fields
    "missing": (_edit(steps=DELETE), "steps: missing"),
    "unknown": (_edit(sampler="euler"), "unknown field 'sampler' (fields: prompt, negative_prompt,"),
    "no-model": (_edit(preset=None), "model: neither a model nor a preset is given"),
    "model-and-preset": (_edit(model="org/x"), "model: both a model and a preset ('tiny-sd15') are set"),
    "full-size-preset": (_edit(preset="sdxl"), "preset: 'sdxl' is not a tiny preset"),
    # wrong nested types
    "prompt-number": (_edit(prompt=5), "prompt: must be a string, got an integer 5"),
    "scheduler-keys": (_edit(scheduler={"class": "DDIMScheduler"}), 'scheduler: must be {"class": NAME'),
    "scheduler-config-list": (_edit(scheduler={"class": "DDIMScheduler", "config": [1]}),
                              "scheduler: config must be an object, got a list"),
    "scheduler-config-type": (_edit_scheduler(steps_offset="x"),
                              "scheduler: config steps_offset: must be an integer, got a string 'x'"),
    "scheduler-config-nan": (_edit_scheduler(beta_start=math.nan), "scheduler: config beta_start: must be finite"),
    "versions-type": (_edit(versions={"torch": 2}), "versions: torch must be a version string or null"),
    "guidance-json-type": (_edit(guidance_json={"terms": "x"}), "guidance_json: guidance JSON must be"),
    "guidance-json-mismatch": (_edit(guidance_json=spec.to_dict(spec.parse_spec("cfg=7"))),
                               "guidance_json: 'cfg=7' does not match guidance 'cfg=5'"),
    "guidance-spec": (_edit(guidance="pgg=3"), "guidance: not a guidance spec: unknown guidance term 'pgg'"),
    "guidance-file": (_edit(guidance="/etc/hostname"), "guidance: not a guidance spec"),
    "grid": (_edit(grid=["pgg=1,2"]), "grid: --grid 'pgg=1,2': unknown term 'pgg'"),
    "pipeline": (_edit(pipeline="FooPipeline"), "pipeline: must be one of StableDiffusionPipeline"),
    "device-name": (_edit(device="banana"), "device: 'banana' is not a device name"),
    "device-type": (_edit(device="meta"), "device: device type must be one of cpu, cuda, mps, got 'meta'"),
    # huge numbers, NaN
    "seed-2**64": (_edit(seed=2**64), f"seed: must be between 0 and {MAX_SEED} (torch.Generator seeds"),
    "seed-batch": (_edit(seed=MAX_SEED, batch=2), f"seed: must be between 0 and {MAX_SEED - 1}"),
    "steps-huge": (_edit(steps=10**30), "steps: must be between 1 and 10000, got 1000000000000000000000000000000"),
    "digits": (_edit(steps=1).replace('"steps": 1', '"steps": ' + "9" * 5000),
               "not valid JSON for Python: an integer of more than 4300 digits"),
    "scheduler-huge": (_edit_scheduler(num_train_timesteps=10**9),
                       "scheduler: config num_train_timesteps: must be at most 1000000"),
    "steps-nan": (_edit(steps=math.nan), "steps: must be an integer, got a number nan"),
    "nested": ("[" * 100_000, "not valid JSON: nested too deeply"),
    "not-json": ("{steps: 2", "not valid JSON: Expecting property name"),
    # batches, indices, packs
    "batch-negative": (_edit(batch=-2), "batch: must be between 1 and 1024, got -2"),
    "index-out-of-range": (_edit(batch=2, index=3), "index: must be between 0 and 1 (batch 2), got 3"),
    "pack-length": (_edit(batch=3, pack=["cfg=5", "cfg=6"]), "pack: has 2 guidance specs but the batch has 3"),
    "pack-structure": (_edit(batch=2, pack=["cfg=5", "cfg=5 pag=3"]),
                       "pack: per-sample Guidances can differ only in"),
    "pack-not-its-guidance": (_edit(batch=2, index=1, pack=["cfg=5", "cfg=6"]),
                              "pack: image 1's entry 'cfg=6' is not its guidance 'cfg=5'"),
    "pack-items": (_edit(batch=2, pack=["cfg=5", 6]), "pack: must be a list of guidance specs"),
}


def test_valid_settings_reach_the_build(png, reaches_build):
    """The base of every tampered case passes every check: each case fails for its own change."""
    settings = _reached(["generate", "--from-image", png.tamper(_edit())])
    assert settings.preset == "tiny-sd15" and settings.steps == 2


@pytest.mark.parametrize("name", sorted(TAMPERED))
def test_tampered_png_metadata_is_reported_before_building(name, png, no_build, capsys):
    text, problem = TAMPERED[name]
    message = _error(capsys, ["generate", "--from-image", png.tamper(text)])
    assert message.startswith(f"corrupt guidance-rt metadata: {problem}"), message


@pytest.mark.parametrize("name", sorted(TAMPERED))
def test_corrupt_settings_file_is_reported_before_building(name, tmp_path, no_build, capsys):
    """A --settings file goes through the same checks as a PNG's settings."""
    text, problem = TAMPERED[name]
    path = tmp_path / "settings.json"
    path.write_text(text)
    message = _error(capsys, ["generate", "--settings", str(path)])
    assert message.startswith(f"corrupt guidance-rt settings: {problem}"), message


def test_settings_file_problems_outside_its_fields(tmp_path, no_build, capsys):
    assert _error(capsys, ["generate", "--settings", str(tmp_path / "none.json")]).startswith(
        f"cannot read {tmp_path / 'none.json'}: [Errno 2]")
    png = tmp_path / "image.png"
    Image.new("RGB", (4, 4)).save(png)
    assert _error(capsys, ["generate", "--settings", str(png)]).startswith(f"cannot read {png}: 'utf-8' codec")


def test_valid_settings_file_reaches_the_build_with_options_overriding(tmp_path, reaches_build):
    path = tmp_path / "settings.json"
    path.write_text(_edit())
    s = _reached(["generate", "--settings", str(path), "--seed", "9"])
    assert (s.preset, s.steps, s.seed) == ("tiny-sd15", 2, 9)


def test_fuzzed_png_metadata_is_a_clear_error_or_valid_settings():
    """Random values of random JSON types in random fields: read as valid settings, or a
    "corrupt guidance-rt metadata" ValueError, never another exception."""
    rng = random.Random(11)
    valid = json.loads(_valid_settings().to_json())
    values = [None, True, -1, 0, 1, 2, 7, 2**64, 10**400, 0.5, math.nan, math.inf, "", "x", "cfg=5", "cpu",
              "float16", "tiny-sdxl", [], ["cfg=5"], [1], {}, {"class": "DDIMScheduler", "config": {}}]
    outcomes = set()
    for _ in range(300):
        data = copy.deepcopy(valid)
        for key in rng.sample(sorted(data), rng.randrange(1, 3)):
            data[key] = rng.choice(values)
        try:
            generate.Settings.from_json(json.dumps(data))
            outcomes.add("ok")
        except generate.SettingsError:
            outcomes.add("error")
    assert outcomes == {"ok", "error"}


def test_schema_covers_every_settings_field():
    assert list(generate.SCHEMA) and set(generate.SCHEMA) == {f.name for f in dataclasses.fields(generate.Settings)}


def test_device_from_a_png_that_this_machine_lacks(png, no_build, capsys):
    message = _error(capsys, ["generate", "--from-image", png.tamper(_edit(device=MISSING_GPU))])
    assert message.startswith(f"--device: {MISSING_GPU} is not on this machine (") and "--device cpu" in message


def test_png_scheduler_must_fit_the_pipeline(png, capsys, tmp_path):
    """FlowMatchEuler is a scheduler, so the PNG reads; SD1.5's pipeline cannot take it."""
    path = png.tamper(_edit_scheduler("FlowMatchEulerDiscreteScheduler"))
    message = _error(capsys, ["generate", "--from-image", path, "--out", str(tmp_path / "x.png")])
    assert message.startswith("corrupt guidance-rt metadata: scheduler: FlowMatchEulerDiscreteScheduler "
                              "does not fit StableDiffusionPipeline; compatible: DDIMScheduler")
    # the same from a settings file
    file = tmp_path / "settings.json"
    file.write_text(_edit_scheduler("FlowMatchEulerDiscreteScheduler"))
    message = _error(capsys, ["generate", "--settings", str(file), "--out", str(tmp_path / "x.png")])
    assert message.startswith("corrupt guidance-rt settings: scheduler: FlowMatchEulerDiscreteScheduler "
                              "does not fit StableDiffusionPipeline")


def test_unreadable_images(tmp_path, capsys, no_build):
    assert _error(capsys, ["generate", "--from-image", str(tmp_path / "none.png")]).startswith(
        f"cannot read {tmp_path / 'none.png'}: [Errno 2]")
    text = tmp_path / "text.png"
    text.write_text("not an image")
    assert _error(capsys, ["generate", "--from-image", str(text)]).startswith(f"cannot read {text}: ")
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    assert "has no guidance-rt settings" in _error(capsys, ["generate", "--from-image", str(plain)])


# ---------------------------------------------------------------------------------------- hub models

def test_a_hub_model_named_in_a_png_is_not_downloaded_without_the_flag(png, no_build, monkeypatch, capsys,
                                                                      tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def download(repo, filename, local_files_only=False, **kwargs):
        calls.append((repo, filename, local_files_only))
        raise LocalEntryNotFoundError("not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    path = png.tamper(_edit(preset=None, model="org/some-model"))
    message = _error(capsys, ["generate", "--from-image", path])
    assert calls == [("org/some-model", "model_index.json", True)]
    assert message.startswith(f"model 'org/some-model' is not on this machine (a model named in {path} is "
                              "downloaded only with --allow-download)")
    _error(capsys, ["generate", "--from-image", path, "--allow-download"])
    assert calls[-1] == ("org/some-model", "model_index.json", False)
    # nor one named in a settings file
    file = tmp_path / "settings.json"
    file.write_text(_edit(preset=None, model="org/some-model"))
    assert _error(capsys, ["generate", "--settings", str(file)]).startswith(
        f"model 'org/some-model' is not on this machine (a model named in {file} is downloaded only with "
        "--allow-download)")
    assert calls[-1] == ("org/some-model", "model_index.json", True)
    # a hub id on the command line may be downloaded, as before
    _error(capsys, ["generate", "--model", "org/other"])
    assert calls[-1] == ("org/other", "model_index.json", False)


# ---------------------------------------------------------------------------------------- options

@pytest.mark.parametrize("argv,message", [
    (["--seed", str(2**64)], f"--seed: must be between 0 and {MAX_SEED} (torch.Generator seeds are below "
                             f"2**64), got {2**64}"),
    (["--seed", "-1"], f"--seed: must be between 0 and {MAX_SEED}"),
    (["--seed", str(MAX_SEED), "--batch", "3"], f"--seed: must be between 0 and {MAX_SEED - 2} (torch."
                                                "Generator seeds are below 2**64 and image i of the batch "
                                                "of 3 is seeded seed + i)"),
    (["--size", "0x0"], "--size width: must be between 1 and 16384, got 0"),
    (["--size", "64x99999"], "--size height: must be between 1 and 16384, got 99999"),
    (["--size", "64"], "--size '64': expected WxH in pixels, e.g. 1024x768"),
    (["--size", "9" * 5000 + "x64"], "--size '99999999"),
    (["--size", "99999x64"], "--size width: must be between 1 and 16384, got 99999"),
    (["--size", "100x60"], "size 100x60 does not fit tiny-sd15 (StableDiffusionPipeline): width and height "
                           "must be multiples of 8; nearest: 96x64"),
    (["--steps", "-1"], "--steps: must be between 1 and 10000, got -1"),
    (["--steps", "0"], "--steps: must be between 1 and 10000, got 0"),
    (["--steps", "abc"], "argument --steps: invalid int value: 'abc' (see guidance-rt generate --help)"),
    (["--batch", "0"], "--batch: must be between 1 and 1024, got 0"),
    (["--device", "banana"], "--device: 'banana' is not a device name"),
    (["--device", MISSING_GPU], f"--device: {MISSING_GPU} is not on this machine"),
    (["--dtype", "save"], "argument --dtype: unknown dtype 'save'; valid: float32, float16, bfloat16"),
    (["--guidance", "pag=3@mdi"], "guidance 'pag=3@mdi' does not fit tiny-sd15: PAG: layer 'mdi' matches no "
                                  "block of this UNet2DConditionModel; valid layers: d0-d5"),
    (["--guidance", "cfg=5 pag=3@mid:heads=9"], "guidance 'cfg=5 pag=3@mid:heads=9,' does not fit tiny-sd15: "
                                                "PAG (term 1).heads: head 9 does not exist"),
    (["--guidance", "cfg=1"], "guidance 'cfg=1' does not fit tiny-sd15: guided(): CFG(scale=1.0) needs scale > 1"),
    (["--guidance", '{"terms": [{"type": "PAG", "layers": "a b"}]}'], "--guidance: value 'a b' has no spec "
                                                                      "string form"),
    (["--grid", "slg.layers=[m0],[99]"], "guidance 'cfg=5 slg=2.8@99,' does not fit tiny-sd15: SLG: layer 99"),
    (["--grid", "pag.scale=1,x"], "--grid pag.scale='x': PAG.scale must be a number, got str 'x'"),
    (["--grid", "pag.heads=[0,,1]"], "--grid: --grid 'pag.heads=[0,,1]': empty value"),
    (["--grid", "pag=1,2", "--batch", "2"], "--grid: makes one image per cell, so the batch must be 1, got 2"),
    (["--model", ""], "--model: must not be empty"),
])
def test_bad_options_are_one_line_before_building(argv, message, no_build, capsys):
    source = [] if "--model" in argv else ["--preset", "tiny-sd15"]
    got = _error(capsys, ["generate", *source, *argv])
    assert got.startswith(message), got


def test_scfg_on_flux_and_unknown_sd3_layers_before_building(no_build, capsys):
    assert _error(capsys, ["generate", "--preset", "tiny-flux", "--guidance", "scfg=5"]) == (
        "guidance 'scfg=5' does not fit tiny-flux: SCFG (semantic-aware CFG) is supported on UNet models "
        "(SD1.5, SDXL) only, not on FluxTransformer2DModel; use CFG")
    assert _error(capsys, ["generate", "--preset", "tiny-sd3", "--guidance", "cfg=4 pag=3@mid"]).startswith(
        "guidance 'cfg=4 pag=3@mid' does not fit tiny-sd3: PAG: layer 'mid' matches no block")
    assert _error(capsys, ["generate", "--preset", "tiny-flux", "--size", "120x120"]) == (
        "size 120x120 does not fit tiny-flux (FluxPipeline): width and height must be multiples of 16; "
        "nearest: 128x128")
    assert _error(capsys, ["generate", "--preset", "tiny-sd3", "--size", "520x512"]).startswith(
        "size 520x512 does not fit tiny-sd3 (StableDiffusion3Pipeline): width and height must be multiples of 16")


def test_boundary_seed_and_sizes_pass(reaches_build):
    s = _reached(["generate", "--preset", "tiny-sd15", "--seed", str(MAX_SEED), "--size", "8x16"])
    assert (s.seed, s.width, s.height) == (MAX_SEED, 8, 16)
    s = _reached(["generate", "--preset", "tiny-flux", "--seed", str(MAX_SEED - 1), "--batch", "2",
                  "--size", "16x32"])
    assert (s.seed, s.batch) == (MAX_SEED - 1, 2)


def test_each_subcommand_takes_the_presets_it_can_run(capsys, no_build):
    """generate builds tiny presets only: a full-size one is a usage error, listing the tiny ones,
    and its --help lists only those; spec and layers take every preset."""
    tiny = ", ".join(TINY)   # every tiny preset, in the table's order
    assert tiny.startswith("tiny-sd15, tiny-sdxl, tiny-sd3, tiny-sd35, tiny-flux")
    assert _error(capsys, ["generate", "--preset", "sdxl"]) == (
        f"argument --preset: 'sdxl' is not a tiny preset; generate builds {tiny} (random weights); a real "
        "model goes in --model (see guidance-rt generate --help)")
    assert main(["generate", "--help"]) == 0
    text = "".join(capsys.readouterr().out.split())   # help wraps lines, also at hyphens
    assert f"randomweights({tiny.replace(' ', '')})" in text and "sd3-medium" not in text
    for command in ("spec", "layers"):
        assert main([command, "--help"]) == 0
        text = "".join(capsys.readouterr().out.split())
        assert "flux-dev,flux2-dev,qwen-image,wan21-1.3b,wan21-14b,wan22-a14b,tiny-sd15" in text, command
    assert "both(default)" in text   # layers --help: the default mode
    assert _error(capsys, ["layers", "--preset", "tiny-nothing"], "layers").startswith(
        "argument --preset: unknown preset 'tiny-nothing'; known: sd15, sdxl")


def test_usage_errors_are_one_line(capsys):
    assert _error(capsys, ["generate"]) == ("one of the arguments --model --preset --from-image --settings is "
                                            "required (see guidance-rt generate --help)")
    assert _error(capsys, ["bench", "--seed", "-1"], "bench") == (
        "argument --seed: must be >= 0, got -1 (see guidance-rt bench --help)")
    assert _error(capsys, ["bench", "--seed", str(2**63)], "bench").startswith(
        "argument --seed: must be below 2**63")
    assert _error(capsys, ["bench", "--threads", "0"], "bench").startswith("argument --threads: must be >= 1")
    assert _error(capsys, ["layers", "--preset", "tiny-flux", "--top", "0"], "layers").startswith(
        "argument --top: must be >= 1")
    assert main(["frobnicate"]) == 2
    assert capsys.readouterr().err.startswith("guidance-rt: argument command: invalid choice: 'frobnicate'")


# ---------------------------------------------------------------------------------------- model folders

@pytest.fixture
def sd3_folder(tmp_path):
    """A pipeline folder with configs only: everything before the build reads nothing else."""
    root = tmp_path / "sd3"
    (root / "transformer").mkdir(parents=True)
    (root / "vae").mkdir()
    index = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (root / "model_index.json").write_text(json.dumps(index))
    config = dict(presets.get_preset("tiny-sd3").config, _class_name="SD3Transformer2DModel")
    (root / "transformer" / "config.json").write_text(json.dumps(config))
    (root / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [8, 8, 8, 8]}))
    return root


def test_model_folder_checked_from_its_configs(sd3_folder, no_build, capsys):
    folder = str(sd3_folder)
    assert _error(capsys, ["generate", "--model", folder, "--guidance", "cfg=4 slg@30"]).startswith(
        f"guidance 'cfg=4 slg=2.8@30' does not fit {folder}: SLG: layer 30 matches no block")
    assert _error(capsys, ["generate", "--model", folder, "--size", "136x128"]).startswith(
        f"size 136x128 does not fit {folder} (StableDiffusion3Pipeline): width and height must be multiples of 16")
    # tiny-sd3's position embedding covers 32 patches of 2 latent pixels of 8 image pixels
    assert _error(capsys, ["generate", "--model", folder, "--size", "528x512"]) == (
        f"size 528x512 does not fit {folder}: its position embedding covers at most 512 pixels a side")
    assert _error(capsys, ["spec", "pag=3@mid", "--model", folder], "spec").startswith(
        f"guidance 'pag=3@mid' does not fit {folder}: PAG: layer 'mid' matches no block")
    (sd3_folder / "transformer" / "config.json").write_text('{"num_layers": "many"}')
    assert _error(capsys, ["generate", "--model", folder]).startswith(
        f"{folder}: transformer/config.json does not build a SD3Transformer2DModel: ")
    (sd3_folder / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    assert _error(capsys, ["generate", "--model", folder]).startswith(
        f"{folder} is a 'KandinskyPipeline' pipeline, which guided() does not support")
    (sd3_folder / "model_index.json").unlink()
    assert _error(capsys, ["generate", "--model", folder]).startswith(
        f"{folder} is not a diffusers pipeline folder (no model_index.json)")


def test_model_folder_that_fits_reaches_the_build(sd3_folder, reaches_build):
    s = _reached(["generate", "--model", str(sd3_folder), "--guidance", "cfg=4 slg@7,8,9", "--size", "512x256"])
    assert s.guidance == "cfg=4 slg=2.8@7,8,9" and (s.width, s.height) == (512, 256)


# ---------------------------------------------------------------------------------------- spec

def test_spec_errors_are_reported_without_a_traceback(capsys):
    assert main(["spec", "pag=" + "9" * 400]) == 2
    lines = capsys.readouterr().err.splitlines()
    # the documented form: the message, then the spec with the offending token underlined
    assert lines[0] == "guidance-rt spec: pag: scale: int too large to convert to float (default scale=3)"
    assert len(lines) == 3 and lines[2].strip() == "^" * 400
    assert _error(capsys, ["spec", "[" * 5000], "spec") == "guidance JSON: nested too deeply"
    assert main(["spec", "scfg=7:clamp=2"]) == 2
    assert capsys.readouterr().err.startswith("guidance-rt spec: scfg: clamp: 'int' object is not iterable")
    assert _error(capsys, ["spec", '{"terms": [{"type": "PAG", "layers": "a b"}]}'], "spec").startswith(
        "value 'a b' has no spec string form")


def test_spec_checks_against_a_preset(capsys):
    assert _error(capsys, ["spec", "pag=3@mdi", "--preset", "tiny-sdxl"], "spec").startswith(
        "guidance 'pag=3@mdi' does not fit tiny-sdxl: PAG: layer 'mdi' matches no block")
    assert _error(capsys, ["spec", "slg@40", "--preset", "sd3-medium"], "spec").startswith(
        "guidance 'slg=2.8@40' does not fit sd3-medium: SLG: layer 40")
    assert main(["spec", "pag=3@mid", "--preset", "tiny-sdxl"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "pag=3@mid"
    assert _error(capsys, ["spec", "cfg", "--preset", "tiny-nothing"], "spec").startswith(
        "argument --preset: unknown preset 'tiny-nothing'; known: sd15, sdxl")
    assert _error(capsys, ["spec", "cfg", "--model", "org/not-here"], "spec").startswith(
        "model 'org/not-here' is not on this machine (guidance-rt spec does not download)")


def test_fuzzed_specs_on_the_command_line(capsys):
    """The spec fuzz cases through `guidance-rt spec`: exit 0 with output, or 2 with the error."""
    for text in _fuzz_cases(n=150, seed=5):
        rc = main(["spec", "--", text])
        out, err = capsys.readouterr()
        assert (rc, bool(out), err.startswith("guidance-rt spec: ")) in {(0, True, False), (2, False, True)}, text


# ---------------------------------------------------------------------------------------- NAG

def test_nag_needs_an_explicit_negative_prompt(no_build, capsys, png):
    flag = ('NAG needs a negative prompt to guide away from: pass --nag-negative-prompt TEXT '
            '(--nag-negative-prompt "" for an empty one), or --negative-prompt TEXT to use that')
    assert _error(capsys, ["generate", "--preset", "tiny-sd15", "--guidance", "cfg=5 nag=3"]) == flag
    assert _error(capsys, ["generate", "--preset", "tiny-sd15", "--grid", "nag=1,3"]) == flag
    # a PNG's negative prompt was not given for NAG
    path = png.tamper(_edit(negative_prompt="blur"))
    assert _error(capsys, ["generate", "--from-image", path, "--guidance", "cfg=5 nag=3"]) == flag


def test_nag_negative_prompt_sources(reaches_build):
    base = ["generate", "--preset", "tiny-sd15", "--guidance", "cfg=5 nag=3"]
    assert _reached([*base, "--negative-prompt", "blur"]).nag_negative_prompt == "blur"
    both = _reached([*base, "--negative-prompt", "blur", "--nag-negative-prompt", "dark"])
    assert both.nag_negative_prompt == "dark"
    assert _reached([*base, "--nag-negative-prompt", ""]).nag_negative_prompt == ""
    assert _reached(["generate", "--preset", "tiny-sd15"]).nag_negative_prompt is None   # no NAG: none needed


def test_explicit_empty_nag_negative_runs_and_a_new_batch_writes_every_image(tmp_path, capsys):
    out = tmp_path / "nag.png"
    assert main(["generate", "--preset", "tiny-sd15", "--guidance", "cfg=5 nag=3", "--nag-negative-prompt", "",
                 "--steps", "1", "--size", "64x64", "--out", str(out)]) == 0
    s = generate.read_settings(str(out))
    assert s.nag_negative_prompt == "" and s.guidance == "cfg=5 nag=3"
    # --from-image with --batch asks for a new batch of that size: every image is written
    assert main(["generate", "--from-image", str(out), "--batch", "2"]) == 0
    again = [tmp_path / "nag-again-0.png", tmp_path / "nag-again-1.png"]
    assert all(p.exists() for p in again)
    assert [generate.read_settings(str(p)).index for p in again] == [0, 1]
