"""guidance-rt bench / generate / spec on tiny presets: in-process, and as a subprocess where a
fresh process is what is tested."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from guidance_rt import bench, generate, presets, spec
from guidance_rt.cli import main

QUICK = ["--repeats", "1", "--warmup", "0", "--no-progress"]   # timing is not what these test


def _run(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "guidance_rt", *args], capture_output=True, text=True,
                          timeout=timeout)


def _strict_json(path):
    with open(path) as f:
        return json.load(f, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


# ---------------------------------------------------------------------------------------- bench

def test_bench_prints_table_and_writes_json_with_every_column(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--preset", "tiny-sd3", "--guidance", "CFG+SLG[7,8,9]", *QUICK, "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "configuration" in text and "CFG+SLG[7,8,9]" in text and "guidance-rt" in text
    data = _strict_json(out)
    assert {"environment", "options", "columns", "results"} <= set(data)
    assert data["environment"]["torch"] and data["environment"]["device"]["name"]
    rows = data["results"]
    assert rows and all(set(bench.COLUMNS) <= set(r) for r in rows)
    by = {(r["config"], r["implementation"]): r for r in rows}
    assert by[("CFG+SLG[7,8,9]", "guidance-rt")]["status"] == "ok"
    # the SD3 pipeline's SLG (a second call with skip_layers) is an oracle for ours
    sd3 = by[("CFG+SLG[7,8,9]", "diffusers-pipelines")]
    assert sd3["status"] == "ok" and sd3["rel_vs_reference"] < 1e-4
    # diffusers' SLG guider crashes on SD3 blocks (peers.md): missing, with the reason, in both
    guider = by[("CFG+SLG[7,8,9]", "diffusers-guiders")]
    assert guider["status"] == "missing" and guider["reason"].startswith("crashed: ")
    assert "MISSING: crashed" in text
    # the legend says what vs peer and NOISY mean; the summary after it answers "how much faster?"
    assert "vs peer: the peer's ms / guidance-rt's ms (guidance-rt's row: the fastest working peer)" in text
    assert "NOISY: IQR above 20% of the median after re-timing" in text
    summary = text[text.index("guidance-rt's speed-up over each peer (peer ms / guidance-rt ms):"):]
    assert re.search(r"tiny-sd3 b1 CFG\+SLG\[7,8,9\]: \d+\.\d\dx diffusers-pipelines", summary), summary
    assert "diffusers-guiders crashed" in summary


def test_bench_runs_the_chosen_implementations(capsys):
    assert main(["bench", "--preset", "tiny-sd15", "--guidance", "cfg=5 seg=3@mid:sigma=2", "--impl", "guidance-rt",
                 "--impl", "reference", "--repeats", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "cfg=5 seg=3@mid:sigma=2" in out and "reference" in out and "floor" in out


def test_bench_errors(capsys):
    # a bad spec: exit 2, the offending token underlined, the valid choices listed
    assert main(["bench", "--guidance", "cfg=5 pgg=3@mid"]) == 2
    err = capsys.readouterr().err
    assert "unknown guidance term 'pgg'" in err and "^^^" in err and "valid terms" in err
    assert main(["bench", "--preset", "tiny-sd3", "--guidance", "cfg=4 pag=3@mid", *QUICK]) == 2
    err = capsys.readouterr().err
    assert "mid" in err and "valid layers" in err
    assert main(["bench", "--preset", "tiny-nothing", *QUICK]) == 2
    assert "unknown preset 'tiny-nothing'" in capsys.readouterr().err
    # neither a standard name nor a spec: the standard names of the preset's family are listed
    assert main(["bench", "--preset", "tiny-sd3", "--guidance", "CFG+SLG[7,8]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("guidance-rt bench: configuration 'CFG+SLG[7,8]' is neither a standard name "
                          "(sd3: CFG, CFG+SLG[7,8,9], CFG+NAG) nor a guidance spec: unknown guidance term"), err


def test_bench_size_reaches_the_inputs_the_floors_the_json_the_table_and_the_markdown(tmp_path, capsys, monkeypatch):
    from guidance_rt.bench import runner

    samples = []
    make_inputs = presets.example_inputs

    def recording_inputs(*a, **kw):
        out = make_inputs(*a, **kw)
        samples.append(tuple(out["sample"].shape))
        return out

    monkeypatch.setattr(presets, "example_inputs", recording_inputs)
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    assert main(["bench", "--preset", "tiny-sdxl", "--size", "64x48", "--guidance", "CFG+PAG(mid)",
                 "--impl", "guidance-rt", "--impl", "diffusers-pipelines", *QUICK,
                 "--json", str(out), "--markdown", str(md)]) == 0
    text = capsys.readouterr().out
    assert samples and all(s[-2:] == (6, 8) for s in samples), samples          # 48 x 64 pixels / 8
    assert "tiny-sdxl  batch 1  size 64x48  latent 6x8" in text
    data = _strict_json(out)
    assert data["options"]["size"] == [64, 48]
    rows = {(r["config"], r["implementation"]): r for r in data["results"]}
    assert all(r["size"] == "64x48" and r["latent"] == [6, 8] for r in rows.values())
    # the floor's FLOPs are those of the benched size, not of the preset's default (16 x 16 latent)
    ours = rows[("CFG+PAG(mid)", "guidance-rt")]
    g, model = spec.parse_spec(ours["spec"]), presets.build_model("tiny-sdxl")
    at = {hw: bench.count_flops(model, g, make_inputs("tiny-sdxl", height=hw[0], width=hw[1]), ours["step"], 30)
          for hw in [(6, 8), (16, 16)]}
    assert ours["flops"] == at[(6, 8)] != at[(16, 16)]
    # the markdown: commit, environment, one table with every column, guidance-rt's speed-up
    doc = md.read_text()
    commit = data["environment"]["commit"]
    assert f"`{commit.removesuffix('+dirty')}`" in doc and "Environment: CPU " in doc
    assert "## tiny-sdxl: 64x48 pixels (latent 6x8), batch 1, step 1 of 30" in doc
    assert ("| configuration | implementation | median ms | IQR ms | min-max ms | ratio to its CFG step | floor "
            "| efficiency | speed-up vs diffusers-pipelines | noisy | note |") in doc
    peer = rows[("CFG+PAG(mid)", "diffusers-pipelines")]
    line = next(x for x in doc.splitlines() if x.startswith("| CFG+PAG(mid) | guidance-rt |"))
    assert f"| {ours['floor']:.3f} | {ours['efficiency']:.2f} | {peer['median_ms'] / ours['median_ms']:.2f}x" in line


def test_bench_size_reaches_the_meta_device_flop_count(monkeypatch):
    """Full-size models count FLOPs on a meta-device copy with meta inputs: those are at --size too."""
    from guidance_rt.bench import runner

    counted = []

    def recording_count(model, g, inp, step, steps):
        counted.append((next(model.parameters()).device.type, inp["sample"].device.type, tuple(inp["sample"].shape)))
        return 1

    monkeypatch.setattr(runner, "META_FLOPS_PARAMS", 0)   # tiny-sdxl counted as a full-size model is
    monkeypatch.setattr(runner, "count_flops", recording_count)
    rows = bench.run(presets=["tiny-sdxl"], size=(64, 48), guidance=["CFG"], implementations=("guidance-rt",),
                     repeats=1, warmup=0, progress=False)
    assert rows[0]["size"] == "64x48" and rows[0]["latent"] == [6, 8]
    assert counted and all(c == ("meta", "meta", (1, 4, 6, 8)) for c in counted), counted


def test_bench_size_errors_name_the_valid_multiples_before_any_model_is_built(capsys, monkeypatch):
    def no_model(*a, **kw):
        raise AssertionError("a model was built for a bad size")

    monkeypatch.setattr(presets, "build_model", no_model)
    for preset, size, message in [
            ("tiny-sdxl", "250x256", "size 250x256 does not fit tiny-sdxl (StableDiffusionXLPipeline): width and "
                                     "height must be multiples of 8; nearest: 248x256"),
            ("tiny-sd3", "100x128", "size 100x128 does not fit tiny-sd3 (StableDiffusion3Pipeline): width and "
                                    "height must be multiples of 16; nearest: 96x128"),
            ("tiny-sd3", "528x64", "size 528x64 does not fit tiny-sd3: its position embedding covers at most "
                                   "512 pixels a side"),
            ("tiny-sdxl", "64", "--size '64': expected WxH in pixels, e.g. 1024x768"),
            ("tiny-sdxl", "0x64", "--size width: must be between 1 and 16384, got 0")]:
        assert main(["bench", "--preset", preset, "--size", size, *QUICK]) == 2, size
        assert capsys.readouterr().err == f"guidance-rt bench: {message}\n"


def test_bench_markdown_table_columns_and_cells():
    def row(config, impl, ms=None, status="ok", reason="", noisy=False):
        return dict.fromkeys(bench.COLUMNS) | dict(
            preset="p", batch=1, latent=[32, 32], size="256x256", config=config, implementation=impl,
            status=status, reason=reason, step=1, steps=30, median_ms=ms, iqr_ms=ms and ms / 10,
            min_ms=ms and ms - 1, max_ms=ms and ms + 1, ratio=ms and 1.0, floor=1.25, efficiency=ms and 1.25,
            noisy=noisy, times_ms=[ms] * 7 if ms else [])

    rows = [row("CFG", "guidance-rt", 10.0), row("CFG", "reference", 20.0),
            row("CFG", "diffusers-pipelines", 25.0, noisy=True), row("CFG", "diffusers-guiders", 40.0),
            row("CFG+X", "guidance-rt", 12.0),
            row("CFG+X", "diffusers-pipelines", status="unsupported", reason="no such method"),
            row("CFG+X", "diffusers-guiders", status="missing", reason="crashed: a | b")]
    doc = bench.markdown({"environment": {"commit": "abc123+dirty", "device_type": "cpu", "torch": "2.13",
                                          "threads": 2, "device": {"name": "Some CPU", "cores": 2}},
                          "options": {"dtype": "float32"}, "results": rows})
    assert "Commit: `abc123`, dirty" in doc and "Environment: CPU Some CPU, 2 of 2 threads; torch 2.13; float32" in doc
    assert "median of 7 timed calls, interleaved" in doc
    lines = doc.splitlines()
    assert "| CFG | guidance-rt | 10.00 | 1.00 | 9.00-11.00 | 1.000 | 1.250 | 1.25 | 2.50x (noisy) | 4.00x |  |  |" in lines
    assert "|  | diffusers-pipelines | 25.00 | 2.50 | 24.00-26.00 | 1.000 | 1.250 | 1.25 |  |  | NOISY |  |" in lines
    assert "| CFG+X | guidance-rt | 12.00 | 1.20 | 11.00-13.00 | 1.000 | 1.250 | 1.25 | n/a | MISSING |  |  |" in lines
    assert "|  | diffusers-guiders | - | - | - | - | 1.250 | - |  |  |  | MISSING: crashed: a \\| b |" in lines
    assert not any("no such method" in x for x in lines if x.startswith("|"))   # unsupported: no row


# ---------------------------------------------------------------------------------------- generate

def test_generate_writes_pngs_that_reproduce_themselves(tmp_path, capsys):
    out = tmp_path / "img.png"
    rc = main(["generate", "--preset", "tiny-sdxl", "--prompt", "a red cat", "--negative-prompt", "blur",
               "--guidance", "cfg=5 pag=3@mid tpg=2@d6-d23", "--steps", "2", "--size", "64x48",
               "--seed", "11", "--batch", "2", "--out", str(out)])
    assert rc == 0
    assert capsys.readouterr().err == ""          # no progress bar: stderr is not a terminal
    paths = [tmp_path / "img-0.png", tmp_path / "img-1.png"]
    assert all(p.exists() for p in paths)
    assert Image.open(paths[1]).size == (64, 48)
    s = generate.read_settings(str(paths[1]))
    assert (s.prompt, s.negative_prompt, s.steps, s.seed, s.batch, s.index) == ("a red cat", "blur", 2, 11, 2, 1)
    assert s.guidance == "cfg=5 pag=3@mid tpg=2@d6-d23" and s.guidance_json["terms"][1]["type"] == "PAG"
    assert s.preset == "tiny-sdxl" and s.scheduler["class"] == "EulerDiscreteScheduler"
    assert s.versions["torch"] and s.versions["diffusers"]
    assert Image.open(paths[1]).text["prompt"] == "a red cat"
    assert not np.array_equal(_pixels(paths[0]), _pixels(paths[1]))
    # a fresh process re-makes image 1 of the batch from its own metadata, bit for bit; its
    # stderr has the progress bar asked for and not transformers' notice about torchvision
    again = tmp_path / "again.png"
    r = _run("generate", "--from-image", str(paths[1]), "--out", str(again), "--progress")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(_pixels(again), _pixels(paths[1]))
    assert re.search(r"steps: +\d+%\|.*\| [0-2]/2 \[", r.stderr), r.stderr
    assert "torchvision" not in r.stderr, r.stderr
    # options given with --from-image override the stored ones
    other = tmp_path / "other.png"
    assert main(["generate", "--from-image", str(paths[1]), "--guidance", "cfg=5", "--out", str(other)]) == 0
    assert generate.read_settings(str(other)).guidance == "cfg=5"
    assert not np.array_equal(_pixels(other), _pixels(paths[1]))


def test_generate_grid_cells_and_labels(tmp_path, capsys):
    out = tmp_path / "grid.png"
    rc = main(["generate", "--preset", "tiny-sd15", "--guidance", "cfg=5", "--steps", "2", "--seed", "4",
               "--grid", "pag.scale=0,3", "seg.sigma=2,inf", "--out", str(out)])
    assert rc == 0
    assert "4 cells in 4 packed batch(es)" in capsys.readouterr().out
    cells = [tmp_path / f"grid-cell{k}.png" for k in range(4)]
    assert all(c.exists() for c in cells) and not (tmp_path / "grid-cell4.png").exists()
    labels = [generate.read_settings(str(c)).label for c in cells]
    assert labels == ["pag.scale=0 seg.sigma=2", "pag.scale=0 seg.sigma=inf",
                      "pag.scale=3 seg.sigma=2", "pag.scale=3 seg.sigma=inf"]
    settings = [generate.read_settings(str(c)) for c in cells]
    assert {s.seed for s in settings} == {4}                       # every cell in the same seed
    assert settings[3].guidance == "cfg=5 pag=3 seg=3"             # the added terms, defaults
    grid = Image.open(out)
    w, h = Image.open(cells[0]).size
    assert grid.size[0] == 2 * w and grid.size[1] > 2 * h           # 2 columns, labels above rows
    assert generate.read_settings(str(out)).grid == ["pag.scale=0,3", "seg.sigma=2,inf"]
    # cells keep their own settings: one re-made from its PNG is the same picture
    again = tmp_path / "cell3.png"
    assert main(["generate", "--from-image", str(cells[3]), "--out", str(again)]) == 0
    assert np.array_equal(_pixels(again), _pixels(cells[3]))


def test_grid_cells_sharing_a_step_configuration_run_as_one_packed_batch(tmp_path, capsys, monkeypatch):
    calls = []
    real = generate.generate
    monkeypatch.setattr(generate, "generate", lambda pipe, s, g: (calls.append(s.batch), real(pipe, s, g))[1])
    out = tmp_path / "grid.png"
    assert main(["generate", "--preset", "tiny-sd15", "--guidance", "cfg=5 pag=2@mid", "--steps", "2",
                 "--seed", "3", "--grid", "cfg=3,6", "pag=1,4", "--out", str(out)]) == 0
    assert "4 cells in 1 packed batch(es)" in capsys.readouterr().out
    assert calls == [4]                                             # one pipeline call for the grid
    cells = [tmp_path / f"grid-cell{k}.png" for k in range(4)]
    settings = [generate.read_settings(str(c)) for c in cells]
    assert [s.guidance for s in settings] == ["cfg=3 pag=1@mid", "cfg=3 pag=4@mid", "cfg=6 pag=1@mid",
                                              "cfg=6 pag=4@mid"]
    assert all(s.pack == [x.guidance for x in settings] and s.index == k for k, s in enumerate(settings))
    pixels = [_pixels(c).astype(int) for c in cells]
    assert all(not np.array_equal(pixels[0], p) for p in pixels[1:])   # every cell its own scales
    # each cell is the picture its own guidance makes alone (same seed; batched numerics may
    # move a pixel by a level or two)
    alone = tmp_path / "alone.png"
    monkeypatch.setattr(generate, "generate", real)
    assert main(["generate", "--preset", "tiny-sd15", "--guidance", settings[2].guidance, "--steps", "2",
                 "--seed", "3", "--out", str(alone)]) == 0
    diff = np.abs(_pixels(alone).astype(int) - pixels[2])
    assert diff.max() <= 3 and diff.mean() < 0.5
    # a packed cell re-made from its PNG (the group again) is the same picture, bit for bit
    again = tmp_path / "again.png"
    assert main(["generate", "--from-image", str(cells[1]), "--out", str(again)]) == 0
    assert np.array_equal(_pixels(again), _pixels(cells[1]))
    assert generate.read_settings(str(again)).guidance == settings[1].guidance
    # and from its settings file: the group runs again and only that cell is written
    saved, from_file = tmp_path / "cell1.json", tmp_path / "from-file.png"
    assert main(["generate", "--from-image", str(cells[1]), "--dry-run", "--save-settings", str(saved)]) == 0
    assert main(["generate", "--settings", str(saved), "--out", str(from_file)]) == 0
    assert np.array_equal(_pixels(from_file), _pixels(cells[1]))
    assert not list(tmp_path.glob("from-file-*.png"))


def test_generate_progress_bars(tmp_path, capsys):
    """--progress: the pipeline's bar of each call's steps, and a bar of the images when a grid
    makes several calls; without it (stderr is not a terminal under pytest) nothing on stderr."""
    argv = ["generate", "--preset", "tiny-sd15", "--steps", "2", "--size", "64x64", "--grid", "pag=0,3",
            "--out", str(tmp_path / "grid.png")]
    assert main([*argv, "--progress"]) == 0
    out, err = capsys.readouterr()
    assert "2 cells in 2 packed batch(es)" in out
    assert re.search(r"images: +\d+%\|.*\| [0-2]/2 \[", err) and re.search(r"steps: +\d+%\|.*\| [0-2]/2 \[", err), err
    assert main(argv) == 0
    assert capsys.readouterr().err == ""
    assert main([*argv, "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_settings_file_round_trip(tmp_path, capsys):
    """--save-settings writes the JSON the PNG stores; --settings runs it again, bit for bit, with
    options given overriding it; --dry-run resolves and writes the same settings, and no image."""
    saved, first = tmp_path / "cat.json", tmp_path / "cat.png"
    assert main(["generate", "--preset", "tiny-sd15", "--prompt", "a red cat", "--guidance", "cfg=5 pag=2@mid",
                 "--steps", "2", "--size", "64x64", "--seed", "5", "--save-settings", str(saved),
                 "--out", str(first)]) == 0
    assert f"wrote {saved}" in capsys.readouterr().out
    assert json.loads(saved.read_text()) == json.loads(Image.open(first).text[generate.METADATA_KEY])
    again = tmp_path / "again.png"
    assert main(["generate", "--settings", str(saved), "--out", str(again)]) == 0
    assert np.array_equal(_pixels(again), _pixels(first))
    assert generate.read_settings(str(again)) == generate.read_settings(str(first))
    other = tmp_path / "other.png"
    assert main(["generate", "--settings", str(saved), "--steps", "1", "--out", str(other)]) == 0
    assert generate.read_settings(str(other)).steps == 1
    dry, none = tmp_path / "dry.json", tmp_path / "none.png"
    assert main(["generate", "--settings", str(saved), "--dry-run", "--save-settings", str(dry),
                 "--out", str(none)]) == 0
    assert "dry run: nothing generated" in capsys.readouterr().out
    assert json.loads(dry.read_text()) == json.loads(saved.read_text()) and not none.exists()


def test_grid_planning_groups_step_configurations():
    base = generate.Settings(steps=10)
    g = generate.spec_mod.parse_spec("cfg=5 pag=3@mid")
    cells = generate.plan_grid(base, g, generate.parse_grid(["cfg.scale=3,5,7", "pag=1,2"]))
    assert len(cells) == 6 and {c.group for c in cells} == {0}      # scales only: one configuration
    cells = generate.plan_grid(base, g, generate.parse_grid(["pag=0,2", "slg.layers=[u3,u4],[u5]"]))
    assert [c.label for c in cells][:2] == ["pag.scale=0 slg.layers=[u3,u4]", "pag.scale=0 slg.layers=[u5]"]
    assert len({c.group for c in cells}) == 4
    assert cells[0].guidance.terms[-1].layers == ("u3", "u4")
    # CFG at scale 1 is no CFG term at all
    one = generate.plan_grid(base, g, generate.parse_grid(["cfg=1"]))[0]
    assert one.guidance.cfg is None
    for bad, msg in [("pag.sclae=1", "no field 'sclae'"), ("pgg=1", "unknown term"),
                     ("seg.sigma=-1", "must be > 1/6"), ("pag", "expected PARAM=")]:
        with pytest.raises(ValueError, match=msg):
            generate.plan_grid(base, g, generate.parse_grid([bad]))


def test_generate_missing_model_says_what_to_do(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    # HF_HUB_OFFLINE=1 as a fresh process would read it when huggingface_hub is imported
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["generate", "--model", "stabilityai/stable-diffusion-xl-base-1.0", "--steps", "2",
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "stabilityai/stable-diffusion-xl-base-1.0" in err and "not on this machine" in err
    assert "HF_HUB_OFFLINE is set" in err and "local folder" in err and "--preset tiny-sdxl" in err
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------- folders

@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sdxl-pipeline")
    presets.build_pipeline("tiny-sdxl").save_pretrained(str(path))
    return path


def test_local_folders(pipeline_folder, tmp_path, capsys):
    # generate --model <pipeline folder>
    out = tmp_path / "f.png"
    assert main(["generate", "--model", str(pipeline_folder), "--steps", "1", "--size", "64x64", "--out", str(out)]) == 0
    assert generate.read_settings(str(out)).model == str(pipeline_folder)
    # the same images as the preset it was saved from
    ref = tmp_path / "p.png"
    assert main(["generate", "--preset", "tiny-sdxl", "--steps", "1", "--size", "64x64", "--out", str(ref)]) == 0
    assert np.array_equal(_pixels(out), _pixels(ref))
    # bench --preset <pipeline folder>, and a model folder (its unet/) loads too
    js = tmp_path / "b.json"
    assert main(["bench", "--preset", str(pipeline_folder), "--guidance", "CFG+PAG(mid)", "--impl", "guidance-rt",
                 "--impl", "diffusers-pipelines", *QUICK, "--json", str(js)]) == 0
    rows = _strict_json(js)["results"]
    assert {r["family"] for r in rows} == {"unet"} and all(r["status"] == "ok" for r in rows)
    target = bench.load_target(str(pipeline_folder / "unet"))
    assert target.family == "unet" and target.preset is None
    assert main(["generate", "--model", str(tmp_path / "nowhere" / "x"), "--steps", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- spec

def test_spec_command(capsys):
    assert main(["spec", "cfg=5", "seg=3@mid:sigma=inf", "slg=2.8@7,8,9:0.01-0.2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "cfg=5 seg=3@mid slg=2.8@7,8,9"
    assert json.loads("\n".join(out[1:]))["terms"][1]["sigma"] == "inf"
    assert main(["spec", "seg=3@mid:sigm=2"]) == 2
    err = capsys.readouterr().err
    assert "valid options: scale, start, stop, layers, sigma" in err and "^^^^^^" in err
