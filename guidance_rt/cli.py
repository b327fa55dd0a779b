"""Command line: `guidance-rt bench` (the main job)."""
from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guidance-rt")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time guided steps: packed runtime vs the sequential reference")
    b.add_argument("--preset", default="tiny-sdxl", help="model preset (default: tiny-sdxl, runs on CPU)")
    b.add_argument("--guidance", action="append", help="configuration name (repeatable; default: all for the family)")
    b.add_argument("--steps", type=int, default=3, help="timed steps per implementation")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--device", default=None)
    b.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    if args.command == "bench":
        from . import bench
        try:
            bench.run(args.preset, args.guidance, steps=args.steps, batch=args.batch, device=args.device,
                      dtype=getattr(torch, args.dtype))
        except (KeyError, ValueError) as e:
            print(f"guidance-rt bench: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
