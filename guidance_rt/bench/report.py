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
        lines.append(f"{preset}  batch {batch}  latent {latent[0]}x{latent[1]}  "
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
