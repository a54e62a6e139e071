"""The ``workbench`` command.

    workbench generate --out samples.png                      # the toy model's sample grid
    workbench generate --prompt "a red apple" --prompt "a cat by seurat" --out two.png
    workbench generate --model ./my-sd-folder --prompt "a castle" --out castle.png
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .models import load, seeded
from .plots import image_grid, save
from .toy.world import OBJECTS, a

#: Columns of the sample grid: how each object row is prompted.
SAMPLE_COLUMNS = ("{o}", "{o}", "a red {b}", "a blue {b}", "{o} by van gogh", "{o} by seurat",
                  "{o} by mondrian", "{o} by picasso")


def sample_grid(pipe, seed: int = 0, steps: int = 20, guidance: float = 5.0):
    """One row per toy object, one column per prompt form (plain, colour, each painter)."""
    prompts = [col.format(o=a(o), b=o) for o in OBJECTS for col in SAMPLE_COLUMNS]
    images = []
    for i in range(0, len(prompts), 32):
        images += pipe(prompts[i:i + 32], num_inference_steps=steps, guidance_scale=guidance,
                       generator=seeded(seed + i)).images
    n = len(SAMPLE_COLUMNS)
    rows = [images[r * n:(r + 1) * n] for r in range(len(OBJECTS))]
    labels = [c.replace("{o} ", "").replace(" {b}", "").replace("{o}", "plain") for c in SAMPLE_COLUMNS]
    return image_grid(rows, list(OBJECTS), labels)


def _generate(args: argparse.Namespace) -> None:
    pipe = load(args.model)
    t0 = time.perf_counter()
    if args.prompt:
        images = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      generator=seeded(args.seed)).images
        fig = image_grid([images], [], args.prompt)
    elif args.model == "toy":
        fig = sample_grid(pipe, args.seed, args.steps, args.guidance)
    else:
        sys.exit("give at least one --prompt for a model other than 'toy'")
    save(fig, args.out)
    print(f"wrote {args.out} ({time.perf_counter() - t0:.1f} s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="workbench", description="Concept-erasure workbench.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate images (default: the toy model's sample grid)")
    g.add_argument("--model", default="toy", help="'toy', a diffusers folder, or a hub id")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--guidance", type=float, default=5.0)
    g.add_argument("--out", type=Path, default=Path("out/samples.png"), help=".png, .pdf or .svg")
    g.set_defaults(run=_generate)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
