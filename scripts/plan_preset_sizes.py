"""Planning time per env step of variants of a PETS preset, as `mbrl-bilevel bench plan` times a
preset: what a smaller `cpu` preset would cost, and how far from its floating-point bound.

    python scripts/plan_preset_sizes.py "particles=3,population=80" "iterations=2,horizon=10"

Each variant is the `--preset` (default cpu) with the given PETSConfig fields changed; the preset
itself is timed first. Prints ms per step (median and best of --steps), model GFLOP per step and
the ratio to the lower bound (bench plan's definition, HalfCheetah-v5 sizes, 1 torch thread).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from agents.pets import PRESETS
from agents.plan_bench import plan_row
from mbrl_bilevel.bench import PlanBenchConfig


def parse_variant(text: str) -> dict:
    """'particles=3,hidden=200;200' -> {'particles': 3, 'hidden': (200, 200)}."""
    fields = {}
    for item in filter(None, text.split(",")):
        name, value = item.split("=")
        numbers = tuple(int(v) for v in value.split(";"))
        fields[name.strip()] = numbers if name.strip() == "hidden" else numbers[0]
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", help="field=value,... (hidden as 200;200)")
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench = PlanBenchConfig(steps=args.steps)
    for text in ["", *args.variants]:
        config = dataclasses.replace(PRESETS[args.preset], **parse_variant(text))
        row = plan_row(text or args.preset, config, "float32", bench)
        print(
            f"{row['preset']:32s} {row['ms_per_step']:7.1f} ms (best {row['best_ms']:.1f})  "
            f"{row['model_gflop']:5.2f} GFLOP  ratio {row['ratio']:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
