"""Timing: milliseconds per call after warm-up (CUDA events on a GPU, perf_counter elsewhere), in
rounds that each time one call of every row of a preset and batch, so that a burst of load on a
shared machine lands on all of them alike; then rows whose IQR exceeds NOISY_IQR of the median are
timed once more with their baselines, and flagged if still that noisy.
"""
from __future__ import annotations

import statistics
import time

import torch

from .rows import _fail, _short


NOISY_IQR = 0.2   # a timing whose IQR exceeds this fraction of its median is re-timed, then flagged


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, inputs: list[dict], *, warmup: int, repeats: int, device) -> list[float]:
    """Milliseconds per call, after warm-up, rotating over the input sets."""
    with torch.no_grad():
        for k in range(warmup):
            fn(inputs[k % len(inputs)])
        _sync(device)
        if device.type == "cuda":
            events = []
            for k in range(repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn(inputs[k % len(inputs)])
                b.record()
                events.append((a, b))
            torch.cuda.synchronize(device)
            return [a.elapsed_time(b) for a, b in events]
        times = []
        for k in range(repeats):
            t0 = time.perf_counter()
            fn(inputs[k % len(inputs)])
            times.append((time.perf_counter() - t0) * 1e3)
        return times


def _time_interleaved(entries, inputs, repeats: int, device, bar=None) -> None:
    """`repeats` rounds; each round times one call of every entry (inputs rotate per round)."""
    times: dict[int, list[float]] = {id(row): [] for row, _, _ in entries}
    failed: set[int] = set()
    if bar is not None and entries:
        bar.set_description(f"timing {entries[0][0]['preset']} b{entries[0][0]['batch']}")
        bar.total += repeats
        bar.refresh()
    for r in range(repeats):
        if bar is not None and entries:
            bar.update(1)
        for row, prepared, fn in entries:
            if id(row) in failed:
                continue
            try:
                with prepared.active():
                    times[id(row)] += time_calls(fn, [inputs[r % len(inputs)]], warmup=0, repeats=1,
                                                 device=device)
            except Exception as e:
                failed.add(id(row))
                _fail(row, f"crashed while timed: {_short(e)}")
    for row, _, _ in entries:
        t = times[id(row)]
        if id(row) in failed or not t:
            continue
        q = statistics.quantiles(t, n=4) if len(t) >= 2 else [t[0]] * 3
        med = statistics.median(t)
        row.update(median_ms=med, iqr_ms=q[2] - q[0], min_ms=min(t), max_ms=max(t), times_ms=t,
                   images_per_s=row["batch"] * 1000.0 / (med * row["steps"]))
        row["noisy"] = _noisy(row)


def _noisy(row: dict) -> bool:
    return row["median_ms"] is not None and row["iqr_ms"] > NOISY_IQR * row["median_ms"]


def _retime_noisy(timed, baselines: dict, inputs, repeats: int, device, bar=None) -> None:
    """Time the rows whose IQR exceeds NOISY_IQR of the median once more (with the baselines their
    ratios divide by, interleaved as before) and keep the new times; rows still that noisy are
    flagged, so the table says the figure is noise instead of showing it as a result."""
    noisy = {id(row) for row, _, _ in timed if row["noisy"]}
    if not noisy:
        return
    partners = {id(baselines[row["_baseline"]]) for row, _, _ in timed
                if id(row) in noisy and row["_baseline"] in baselines}
    again = [entry for entry in timed if id(entry[0]) in noisy | partners]
    _time_interleaved(again, inputs, repeats, device, bar)
