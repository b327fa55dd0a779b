"""Wall time of the command line's quick answers (--help, spec), each run in a fresh process, as a
user types them; a script, not a test (timing is measured here, never asserted in the tests).

    python benchmarks/cli_startup.py [--runs 10] [--python PATH]

`--python` picks the interpreter of the installation to measure (default: this one), e.g. another
checkout's .venv/bin/python; its `guidance-rt` console script is the one next to it. Commands run
in a temporary folder, so that `-m guidance_rt` finds that installation, not a checkout in the
current folder. The first row is the interpreter starting and doing nothing, the floor of every
other row.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def commands(python: str) -> list[tuple[str, list[str]]]:
    script = os.path.join(os.path.dirname(python), "guidance-rt")
    return [
        ("python -c pass", [python, "-c", "pass"]),
        ("python -m guidance_rt --help", [python, "-m", "guidance_rt", "--help"]),
        ('guidance-rt spec "cfg=5 pag=3@mid"', [script, "spec", "cfg=5 pag=3@mid"]),
        ("guidance-rt generate --help", [script, "generate", "--help"]),
        ("guidance-rt bench --help", [script, "bench", "--help"]),
    ]


def run(argv: list[str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="fresh processes per command (default 10)")
    ap.add_argument("--python", default=sys.executable, help="interpreter to measure (default: this one)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as cwd:
        for name, argv in commands(args.python):
            run(argv, cwd)   # not timed: the first run reads the files into the page cache
            times = [run(argv, cwd) for _ in range(args.runs)]
            rows.append((name, statistics.median(times), min(times)))
    width = max(len(name) for name, _, _ in rows)
    print(f"{'command'.ljust(width)}  median s  min s   ({args.runs} runs each, {args.python})")
    for name, median, low in rows:
        print(f"{name.ljust(width)}  {median:8.3f}  {low:5.3f}")


if __name__ == "__main__":
    main()
