"""The benchmark harness: rows with every column, FLOP floors from a real FLOP count, peers that
fail or silently apply nothing reported as missing with the reason, and the memory tracker."""
import pytest
import torch

from guidance_rt import bench, presets, spec

from .conftest import model_state
from .tolerance import MODEL_ULPS, assert_close

FAST = dict(repeats=2, warmup=0, steps=30)


def _by(rows, config, impl):
    found = [r for r in rows if r["config"] == config and r["implementation"] == impl]
    assert len(found) == 1, (config, impl, [(r["config"], r["implementation"]) for r in rows])
    return found[0]


@pytest.fixture(scope="module")
def unet_rows():
    return bench.run(presets=["tiny-sdxl"], guidance=["CFG+PAG(mid)", "CFG+SEG(mid,inf)"], **FAST)


def test_rows_have_every_column_and_the_cfg_baseline(unet_rows):
    assert all(set(bench.COLUMNS) <= set(r) for r in unet_rows)
    # the CFG-only step is measured first even though it was not asked for
    assert unet_rows[0]["config"] == "CFG"
    for impl in ("guidance-rt", "reference", "diffusers-pipelines", "diffusers-guiders"):
        base = _by(unet_rows, "CFG", impl)
        assert base["status"] == "ok" and base["ratio"] == 1.0 and base["floor"] == 1.0
    ours = _by(unet_rows, "CFG+PAG(mid)", "guidance-rt")
    assert ours["status"] == "ok"
    assert ours["median_ms"] > 0 and len(ours["times_ms"]) == 2 and ours["iqr_ms"] >= 0
    assert ours["ratio"] == pytest.approx(ours["median_ms"] / _by(unet_rows, "CFG", "guidance-rt")["median_ms"])
    assert ours["efficiency"] == pytest.approx(ours["floor"] / ours["ratio"])
    assert ours["images_per_s"] == pytest.approx(1000 / (ours["median_ms"] * 30))
    assert ours["peak_memory_mib"] > 0 and ours["rel_vs_reference"] < 1e-4
    assert ours["block_rows"] < 3 * 70        # prefix sharing: fewer than 3 rows x 70 blocks


def test_peers_side_by_side(unet_rows):
    pag = _by(unet_rows, "CFG+PAG(mid)", "diffusers-pipelines")       # the PAG pipeline's packed call
    assert pag["status"] == "ok" and pag["rel_vs_reference"] < 1e-4
    assert _by(unet_rows, "CFG+PAG(mid)", "diffusers-guiders")["status"] == "ok"
    # no diffusers pipeline does SEG: no row to show; the SEG guider installs no hook (peers.md)
    assert _by(unet_rows, "CFG+SEG(mid,inf)", "diffusers-pipelines")["status"] == "unsupported"
    seg = _by(unet_rows, "CFG+SEG(mid,inf)", "diffusers-guiders")
    assert seg["status"] == "missing" and "applies nothing" in seg["reason"]
    assert seg["median_ms"] is None and seg["ratio"] is None
    table = bench.format_table(unet_rows)
    assert "MISSING: applies nothing" in table and "unsupported" not in table.lower()
    for head in ("ms/step", "IQR", "ratio", "floor", "eff", "peak MiB", "img/s", "vs ref"):
        assert head in table


def test_vs_peer_and_the_summary(unet_rows):
    """vs peer = the peer's ms / guidance-rt's ms; guidance-rt's row shows the fastest working peer."""
    ours = _by(unet_rows, "CFG+PAG(mid)", "guidance-rt")
    peers = [_by(unet_rows, "CFG+PAG(mid)", p) for p in ("diffusers-pipelines", "diffusers-guiders")]
    for p in peers:
        assert p["vs_peer"] == pytest.approx(p["median_ms"] / ours["median_ms"])
    fastest = min(peers, key=lambda p: p["median_ms"])
    assert (ours["vs_peer"], ours["vs_peer_impl"]) == (fastest["vs_peer"], fastest["implementation"])
    assert _by(unet_rows, "CFG+SEG(mid,inf)", "diffusers-guiders")["vs_peer"] is None   # applies nothing
    text = bench.summary(unet_rows)
    pag = next(line for line in text.splitlines() if "CFG+PAG(mid):" in line)
    assert f"{peers[0]['vs_peer']:.2f}x diffusers-pipelines" in pag and "x diffusers-guiders" in pag
    seg = next(line for line in text.splitlines() if "CFG+SEG(mid,inf):" in line)
    assert "diffusers-guiders applies nothing" in seg and "diffusers-pipelines has no such method" in seg
    assert "vs peer" in bench.format_table(unet_rows)


@pytest.mark.parametrize("second_round,flagged", [([10.0, 10.1, 10.0, 10.2], False),
                                                  ([10.0, 30.0, 5.0, 20.0], True)])
def test_noisy_rows_are_retimed_then_flagged(monkeypatch, second_round, flagged):
    """A timing whose IQR exceeds 20% of its median is timed again with its baseline; if still
    that noisy, the table flags it instead of presenting the figure as a result."""
    times = {"base": iter([10.0] * 8), "noisy": iter([10.0, 40.0, 5.0, 25.0] + second_round)}
    monkeypatch.setattr(bench.timing, "time_calls", lambda fn, inputs, **kw: [next(times[fn])])
    rows = [dict(dict.fromkeys(bench.COLUMNS), implementation=impl, batch=1, steps=30, status="ok", reason="",
                 _baseline=("guidance-rt", "g0")) for impl in ("guidance-rt", "reference")]
    baselines = {("guidance-rt", "g0"): rows[0]}
    timed = [(rows[0], bench.Prepared(None), "base"), (rows[1], bench.Prepared(None), "noisy")]
    bench._time_interleaved(timed, [{}], 4, "cpu")
    assert rows[1]["noisy"] and not rows[0]["noisy"]
    bench._retime_noisy(timed, baselines, [{}], 4, "cpu")
    assert rows[1]["times_ms"] == second_round and rows[0]["times_ms"] == [10.0] * 4   # both re-timed
    assert rows[1]["noisy"] is flagged


def test_failing_and_noop_peers_are_missing(monkeypatch):
    def crashing(ctx, g):
        def fn(inp):
            raise RuntimeError("boom")
        return bench.Prepared(fn)

    def noop(ctx, g):   # a "PAG" that applies nothing: plain CFG
        return bench.prepare_packed(ctx, bench.baseline_guidance(g))

    monkeypatch.setitem(bench.PREPARE, "diffusers-pipelines", crashing)
    monkeypatch.setitem(bench.PREPARE, "diffusers-guiders", noop)
    rows = bench.run(presets=["tiny-sd15"], guidance=["cfg=5 pag=3@mid"], **FAST)
    crashed = _by(rows, "cfg=5 pag=3@mid", "diffusers-pipelines")
    assert crashed["status"] == "missing" and crashed["reason"] == "crashed: RuntimeError: boom"
    assert _by(rows, "cfg=5 pag=3@mid", "diffusers-guiders")["status"] == "missing"
    assert "applies nothing" in _by(rows, "cfg=5 pag=3@mid", "diffusers-guiders")["reason"]
    assert _by(rows, "cfg=5 pag=3@mid", "guidance-rt")["status"] == "ok"


def test_flop_floor_counts_the_rows_that_run(tiny_model):
    model = tiny_model("tiny-sdxl")
    inp = presets.example_inputs("tiny-sdxl")

    def flops(text, m=model, i=inp):
        return bench.count_flops(m, spec.parse_spec(text), i, 0, 1)

    cfg = flops("cfg=5")
    assert 1.2 < flops("cfg=5 pag=3@mid") / cfg < 1.45      # forks at mid: < the naive 1.5
    assert 1.35 < flops("cfg=5 tpg=3@d6-d23") / cfg < 1.5
    # the CPU SDPA kernel is counted with the SDPA formula: the same count as on the meta device
    meta = presets.build_model("tiny-sdxl", device="meta")
    meta_inp = presets.example_inputs("tiny-sdxl", device="meta")
    assert flops("cfg=5", meta, meta_inp) == cfg


def test_tensor_memory_tracker():
    base = torch.randn(1000)
    with bench.TensorMemory() as m:
        a = torch.empty(1000)            # 4000 bytes
        v = base[10:]                    # a view: no new memory
        b = torch.ones(500) * 2          # 2000 + 2000, the first freed at once
        del a
        c = torch.empty(250)             # 1000
    assert m.peak == 4000 + 2000 + 2000
    assert m.live == 2000 + 1000
    del v, b, c


def test_probe_step_and_baselines():
    g = spec.parse_spec("cfg=5 slg=2.8@7,8,9:0.01-0.2")
    assert bench.probe_step(g, 30) == 1                       # 1/30 >= 0.01, inside the window
    assert bench.probe_step(spec.parse_spec("cfg=5"), 1) == 0
    assert bench.baseline_guidance(g) == spec.parse_spec("cfg=5")
    assert bench.baseline_guidance(spec.parse_spec("slg@7")) == spec.parse_spec("")
    configs = bench.resolve_configs(["CFG+TPG(d6-d23)", "cfg=5 pag=3@mid"], "unet")
    names = [c.name for c in bench.ordered_configs(configs)]
    assert names == ["CFG", "CFG+TPG(d6-d23)", "cfg=5 pag=3@mid"]
    # several families in one run: each takes its own standard names
    both = {"unet", "sd3"}
    assert [c.name for c in bench.resolve_configs(["CFG+PAG(mid)", "CFG+SLG[7,8,9]"], "sd3", both)] == ["CFG+SLG[7,8,9]"]
    with pytest.raises(ValueError, match="standard configuration of sd3 models"):
        bench.resolve_configs(["CFG+SLG[7,8,9]"], "unet")
    with pytest.raises(ValueError, match="no configuration given is one of unet models"):
        bench.resolve_configs(["CFG+SLG[7,8,9]"], "unet", both)
    assert bench.default_presets(None)[:2] == ["tiny-sdxl", "tiny-sd3"]
    assert bench.default_presets(["CFG+SLG[7,8,9]"]) == ["tiny-sd3"]
    assert bench.default_presets(["cfg=5 pag=3"]) == ["tiny-sdxl"]
    # past CFG-Zero*'s zero steps (nothing runs there); APG's baseline is CFG at its scale
    assert bench.probe_step(spec.parse_spec("cfgzero=4:zero_init_steps=3"), 30) == 3
    assert bench.baseline_guidance(spec.parse_spec("apg=6:eta=0.5 pag=3")) == spec.parse_spec("cfg=6")


@pytest.mark.parametrize("impl", ["diffusers-pipelines", "diffusers-guiders"])
def test_peers_leave_the_model_as_it_was(tiny_model, impl):
    """PAG processors are restored, guider hooks removed, also when the peer crashes."""
    model = tiny_model("tiny-sdxl")
    target = bench.Target("tiny-sdxl", "unet", model, "tiny-sdxl")
    inp = presets.example_inputs("tiny-sdxl")
    ctx = bench.Ctx(target, 30, 1, 0, torch.float32, torch.device("cpu"))
    before = model_state(model)
    prepared = bench.PREPARE[impl](ctx, spec.parse_spec("cfg=5 pag=3@mid"))
    with prepared.active(), torch.no_grad():
        out = prepared.fn(inp)
        with pytest.raises(Exception):
            prepared.fn({**inp, "sample": inp["sample"][:, :2]})   # a crash inside the call
    assert model_state(model) == before
    ours = bench.prepare_packed(ctx, spec.parse_spec("cfg=5 pag=3@mid")).fn(inp)
    assert bench._rel(out, ours) < 1e-4


@pytest.mark.parametrize("text", ["apg=6:eta=0.3:norm_threshold=4:momentum=-0.5",
                                  "apg=6:norm_threshold=4:formulation=diffusers", "cfgzero=4"])
def test_guiders_peer_offers_apg_and_cfg_zero_star_alone(tiny_model, text):
    """diffusers' AdaptiveProjectedGuidance / ClassifierFreeZeroStarGuidance as the peer of the
    same step; with a perturbation term too no diffusers guider or pipeline offers it."""
    model = tiny_model("tiny-sd15")
    target = bench.Target("tiny-sd15", "unet", model, "tiny-sd15")
    inp = presets.example_inputs("tiny-sd15", height=8, width=6)
    ctx = bench.Ctx(target, 30, 1, 0, torch.float32, torch.device("cpu"))
    g = spec.parse_spec(text)
    prepared = bench.PREPARE["diffusers-guiders"](ctx, g)
    with prepared.active(), torch.no_grad():
        theirs = prepared.fn(inp)
    ours = bench.prepare_packed(ctx, g).fn(inp)
    cfg = bench.prepare_packed(ctx, bench.baseline_guidance(g)).fn(inp)
    assert_close(ours, theirs, ulps=MODEL_ULPS, effect=ours - cfg)
    for impl, guidance in [("diffusers-guiders", text + " pag=3@mid"), ("diffusers-pipelines", text)]:
        with pytest.raises(bench.Unsupported):
            bench.PREPARE[impl](ctx, spec.parse_spec(guidance))
