"""The output of a run: the table the command line prints (one block per preset and batch), the
closing summary of guidance-rt's speed-up over each peer, and the strict-JSON report (environment,
options, columns and rows).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .environment import environment
from .rows import COLUMNS, PEERS
from .runner import Options, cpu_threads
from .timing import NOISY_IQR


def _fmt(v, spec: str, missing: str = "-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return missing
    return format(v, spec)


def format_table(rows: list[dict]) -> str:
    """The bench table: one block per (preset, batch)."""
    shown = [r for r in rows if r["status"] != "unsupported"]
    head = ("configuration", "implementation", "ms/step", "IQR", "ratio", "floor", "eff",
            "peak MiB", "img/s", "vs ref", "vs peer", "note")
    lines = []
    groups: dict[tuple, list[dict]] = {}
    for r in shown:
        groups.setdefault((r["preset"], r["batch"]), []).append(r)
    for (preset, batch), group in groups.items():
        latent = group[0].get("latent") or ["?", "?"]
        lines.append(f"{preset}  batch {batch}  size {group[0].get('size') or '?'}  latent {latent[0]}x{latent[1]}  "
                     f"step {group[0]['step']} of {group[0]['steps']}")
        table = [head]
        last = None
        for r in group:
            note = r["reason"] if r["status"] == "ok" else f"{r['status'].upper()}: {r['reason']}"
            if r["noisy"]:
                noise = f"NOISY: IQR {r['iqr_ms'] / r['median_ms']:.0%} of the median after re-timing"
                note = f"{noise}; {note}" if note else noise
            label = r["config"] if r["step"] == group[0]["step"] else f"{r['config']} (step {r['step']})"
            table.append((label if r["config"] != last else "", r["implementation"],
                          _fmt(r["median_ms"], ".2f"), _fmt(r["iqr_ms"], ".2f"), _fmt(r["ratio"], ".2f"),
                          _fmt(r["floor"], ".2f"), _fmt(r["efficiency"], ".2f"),
                          _fmt(r["peak_memory_mib"], ".1f"), _fmt(r["images_per_s"], ".3g"),
                          _fmt(r["rel_vs_reference"], ".0e"), _fmt(r["vs_peer"], ".2f"), note))
            last = r["config"]
        widths = [max(len(str(row[i])) for row in table) for i in range(len(head) - 1)]
        for k, row in enumerate(table):
            cells = [str(c).ljust(widths[i]) if i < 2 else str(c).rjust(widths[i])
                     for i, c in enumerate(row[:-1])]
            lines.append("  " + "  ".join(cells) + ("  " + row[-1] if row[-1] else ""))
            if k == 0:
                lines.append("  " + "  ".join("-" * wd for wd in widths))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def summary(rows: list[dict]) -> str:
    """One line per (preset, batch, configuration): guidance-rt's speed-up over each working peer
    (peer ms / guidance-rt ms), and what each other peer does (applies nothing, crashed, differs,
    has no such method)."""
    lines = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["preset"], r["batch"], r["config"]), []).append(r)
    for (preset, batch, config), group in groups.items():
        parts = []
        for r in group:
            impl = r["implementation"]
            if impl not in PEERS:
                continue
            if r["vs_peer"] is not None:
                parts.append(f"{r['vs_peer']:.2f}x {impl}" + (" (noisy)" if r["noisy"] else ""))
            elif r["status"] == "unsupported":
                parts.append(f"{impl} has no such method")
            elif r["status"] == "missing" and r["reason"].startswith("applies nothing"):
                parts.append(f"{impl} applies nothing")
            elif r["status"] in ("missing", "differs"):
                parts.append(f"{impl} {r['reason'].split(':')[0]}")
        if parts:
            lines.append(f"  {preset} b{batch} {config}: " + ", ".join(parts))
    if not lines:
        return ""
    return "guidance-rt's speed-up over each peer (peer ms / guidance-rt ms):\n" + "\n".join(lines) + "\n"


def to_json_ready(value):
    """Strict-JSON form: non-finite floats become strings, tuples lists, dtypes names."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): to_json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_ready(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def report(rows: list[dict], options: Options, device=None) -> dict:
    o = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options)
    env = environment(device or options.device)
    if env["device_type"] == "cpu":
        env["threads"] = cpu_threads(options)   # what the run used
    return to_json_ready({"environment": env, "options": o,
                          "columns": list(COLUMNS), "results": rows})


def _ms(v) -> str:
    if v is None or isinstance(v, str):
        return "-"
    return format(v, ".1f" if v >= 100 else ".2f" if v >= 1 else ".3f")


def _cell(text) -> str:
    """Text in a markdown table cell: no pipes, no line breaks."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _commit_line(commit: str | None) -> str:
    if not commit:
        return "Commit: unknown (not run from a git work tree)."
    if commit.endswith("+dirty"):
        return f"Commit: `{commit[:-len('+dirty')]}`, dirty (the work tree had uncommitted changes)."
    return f"Commit: `{commit}`."


def _environment_line(env: dict, options: dict) -> str:
    dev = env.get("device") or {}
    if env.get("device_type") == "cpu":
        where = f"CPU {dev.get('name')}, {env.get('threads')} of {dev.get('cores')} threads"
    else:
        extra = [f"{k} {dev[k]:g}" for k in ("sm_clock_mhz", "power_w", "power_limit_w") if
                 isinstance(dev.get(k), (int, float))]
        where = ", ".join([f"{env.get('device_type')} {dev.get('name')}", f"CUDA {dev.get('cuda')}", *extra])
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "diffusers", "transformers", "triton", "python")
                         if env.get(k))
    dtype = options.get("dtype") or "float32"
    return (f"Environment: {where}; {versions}; {dtype}{', compiled' if options.get('compile') else ''}; "
            f"{env.get('platform')}.")


def markdown(report_: dict) -> str:
    """The report (report()'s dict, or a JSON file of one read back) as markdown: the commit, the
    environment, and one table per preset and batch with, per configuration and implementation,
    the median and spread of the step, its ratio to the same implementation's CFG step, the FLOP
    floor, efficiency, guidance-rt's speed-up over each peer and the noisy flag."""
    env, options, rows = report_.get("environment") or {}, report_.get("options") or {}, report_["results"]
    lines = [f"# guidance-rt bench: {', '.join(dict.fromkeys(r['preset'] for r in rows))}, "
             f"{env.get('device_type', '?')}", "", _commit_line(env.get("commit")), "",
             _environment_line(env, options), ""]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] != "unsupported":
            groups.setdefault((r["preset"], r["batch"]), []).append(r)
    for (preset, batch), group in groups.items():
        peers = [p for p in PEERS if any(r["implementation"] == p for r in group)]
        first = group[0]
        latent = first.get("latent") or ["?", "?"]
        counts = sorted({len(r.get("times_ms") or []) for r in group if r.get("median_ms") is not None})
        timed = (f"median of {'/'.join(map(str, counts))} timed calls, interleaved" if counts else "not timed")
        lines += [f"## {preset}: {first.get('size') or '?'} pixels (latent {latent[0]}x{latent[1]}), "
                  f"batch {batch}, step {first['step']} of {first['steps']}", "",
                  f"ms per guided step, {timed}.", ""]
        head = ["configuration", "implementation", "median ms", "IQR ms", "min-max ms", "ratio to its CFG step",
                "floor", "efficiency", *[f"speed-up vs {p}" for p in peers], "noisy", "note"]
        lines += ["| " + " | ".join(head) + " |",
                  "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 4) + ["---", "---"]) + "|"]
        by = {(r["config"], r["implementation"]): r for r in group}
        last = None
        for r in group:
            ours = r["implementation"] == "guidance-rt" and r["status"] == "ok" and r.get("median_ms")
            speedups = []
            for p in peers:
                peer = by.get((r["config"], p))
                if not ours:
                    speedups.append("")
                elif peer is None or peer["status"] == "unsupported":
                    speedups.append("n/a")
                elif peer["status"] != "ok" or not peer.get("median_ms"):
                    speedups.append(peer["status"].upper())
                else:
                    noisy = " (noisy)" if peer.get("noisy") or r.get("noisy") else ""
                    speedups.append(f"{peer['median_ms'] / r['median_ms']:.2f}x{noisy}")
            note = r["reason"] if r["status"] == "ok" else f"{r['status'].upper()}: {r['reason']}"
            label = r["config"] if r["step"] == first["step"] else f"{r['config']} (step {r['step']})"
            spread = (f"{_ms(r['min_ms'])}-{_ms(r['max_ms'])}" if r.get("min_ms") is not None else "-")
            cells = [label if r["config"] != last else "", r["implementation"], _ms(r.get("median_ms")),
                     _ms(r.get("iqr_ms")), spread, _fmt(r.get("ratio"), ".3f"), _fmt(r.get("floor"), ".3f"),
                     _fmt(r.get("efficiency"), ".2f"), *speedups, "NOISY" if r.get("noisy") else "", note]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
            last = r["config"]
        lines.append("")
    lines += ["Ratio: the median over the CFG-only step's median of the same implementation (plain, no "
              "guidance, for a configuration without CFG). Floor: that ratio in FLOPs of the rows "
              "guidance-rt's packed forward runs, counted at the benched size. Efficiency = floor / ratio. "
              "Speed-up vs a peer (on guidance-rt's row): the peer's median / guidance-rt's median for the "
              "same configuration; MISSING: the peer crashed or applies nothing; DIFFERS: its output "
              "differs from the reference; n/a: it has no such method; (noisy): either side is NOISY. "
              f"NOISY: IQR above {NOISY_IQR:.0%} of the median after re-timing.", ""]
    return "\n".join(lines)
