"""The ``workbench`` command.

    workbench generate --out samples.png                      # the toy model's sample grid
    workbench generate --prompt "a red apple" --prompt "a cat by seurat" --out two.png
    workbench generate --model ./my-sd-folder --prompt "a castle" --out castle.png
    workbench erase --concept apple --method rece --out apple.safetensors
    workbench generate --edit apple.safetensors --prompt "an apple" --out erased.png
    workbench demo --concept apple        # before/after grid, JSON report and figure in out/demo/
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from .models import load, seeded
from .plots import image_grid, save
from .toy.world import OBJECTS, PAINTERS, a

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


def _erase(pipe, concept: str, method: str, parts: str | None, preserve: list[str] | None = None):
    from .methods import fewshot, rece, uce
    from .metrics import kind_of, preserve_prompts

    toy = concept in (*OBJECTS, *PAINTERS)
    extra = {"parts": parts} if parts else {}
    if method == "fewshot":
        return fewshot(pipe, concept, kind=kind_of(concept) if toy else "object", **extra)
    if preserve is None:
        preserve = preserve_prompts(concept) if toy else []
    return {"uce": uce, "rece": rece}[method](pipe, concept, preserve=preserve, **extra)


def _generate(args: argparse.Namespace) -> None:
    from .edits import Edit

    pipe = load(args.model)
    t0 = time.perf_counter()
    with Edit.load(args.edit).apply(pipe) if args.edit else nullcontext():
        _draw(args, pipe)
    print(f"wrote {args.out} ({time.perf_counter() - t0:.1f} s)")


def _draw(args: argparse.Namespace, pipe) -> None:
    if args.prompt:
        images = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      generator=seeded(args.seed)).images
        fig = image_grid([images], [], args.prompt)
    elif args.model == "toy":
        fig = sample_grid(pipe, args.seed, args.steps, args.guidance)
    else:
        sys.exit("give at least one --prompt for a model other than 'toy'")
    save(fig, args.out)


def _erase_cmd(args: argparse.Namespace) -> None:
    pipe = load(args.model)
    edit = _erase(pipe, args.concept, args.method, args.parts, args.preserve)
    edit.save(args.out)
    print(f"{args.method} erased {args.concept!r} in {edit.seconds:.2f} s -> {args.out}")
    print(edit.summary(pipe).to_string(index=False, float_format="%.4g"))


def _demo(args: argparse.Namespace) -> None:
    from .metrics import accuracy, kind_of, preservation
    from .plots import accuracy_bars
    from .toy.oracle import Oracle
    from .toy.world import GROUP_OF, GROUPS

    pipe, oracle = load("toy"), Oracle.load()
    out = Path(args.out)
    concepts = [*OBJECTS, *PAINTERS]
    t0 = time.perf_counter()
    before = accuracy(pipe, oracle, concepts, args.per_prompt, args.seed)
    edit = _erase(pipe, args.concept, args.method, args.parts)
    with edit.apply(pipe):
        after = accuracy(pipe, oracle, concepts, args.per_prompt, args.seed)
    if kind_of(args.concept) == "object":  # the concept, two of its group, one from another group
        group = GROUP_OF[args.concept]
        shown = [args.concept, *[o for o in GROUPS[group] if o != args.concept][:2],
                 "car" if group != "vehicle" else "cat"]
        rows = [f"an icon of {a(c)}" for c in shown]
    else:  # the style on two objects, the plain object, and another style
        other = next(p for p in PAINTERS if p != args.concept)
        rows = [f"a cat by {args.concept}", f"a boat by {args.concept}", "a cat", f"a cat by {other}"]
    grid_rows = []
    for prompt in rows:
        imgs = pipe([prompt] * 4, num_inference_steps=20, guidance_scale=5.0, generator=seeded(args.seed)).images
        with edit.apply(pipe):
            imgs += pipe([prompt] * 4, num_inference_steps=20, guidance_scale=5.0, generator=seeded(args.seed)).images
        grid_rows.append(imgs)
    save(image_grid(grid_rows, rows, ["before"] * 4 + ["after"] * 4), out / "before_after.png")
    others = [c for c in concepts if c != args.concept]
    report = {
        "concept": args.concept, "method": args.method, "edit_seconds": edit.seconds,
        "accuracy_on_concept": {"before": before[args.concept], "after": after[args.concept]},
        "accuracy_on_others": {"before": sum(before[c] for c in others) / len(others),
                               "after": sum(after[c] for c in others) / len(others)},
        "preservation": preservation({c: after[c] for c in others}, {c: before[c] for c in others}),
        "per_concept": {"before": before, "after": after}, "images_per_concept": args.per_prompt,
        "seed": args.seed, "params": {k: v for k, v in edit.params.items() if k != "scores"},
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    save(accuracy_bars(before, after, f"{args.method} erases {args.concept!r}"), out / "accuracy.png")
    edit.save(out / "edit.safetensors")
    print(f"erased {args.concept!r} with {args.method} in {edit.seconds:.2f} s: accuracy on it "
          f"{before[args.concept]:.0%} -> {after[args.concept]:.0%}, on the other {len(others)} concepts "
          f"{report['accuracy_on_others']['before']:.0%} -> {report['accuracy_on_others']['after']:.0%} "
          f"(preservation {report['preservation']:.0%}); wrote {out}/ ({time.perf_counter() - t0:.0f} s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="workbench", description="Concept-erasure workbench.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate images (default: the toy model's sample grid)")
    g.add_argument("--model", default="toy", help="'toy', a diffusers folder, or a hub id")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--guidance", type=float, default=5.0)
    g.add_argument("--edit", type=Path, help="an edit file (.safetensors) to apply first")
    g.add_argument("--out", type=Path, default=Path("out/samples.png"), help=".png, .pdf or .svg")
    g.set_defaults(run=_generate)
    e = sub.add_parser("erase", help="erase a concept and save the edit")
    e.add_argument("--model", default="toy")
    e.add_argument("--concept", required=True)
    e.add_argument("--method", choices=("rece", "uce", "fewshot"), default="rece")
    e.add_argument("--parts", help="parts to edit, a glob such as 'unet.*.xattn.v' or 'text.*.ffn'")
    e.add_argument("--preserve", action="append",
                   help="a prompt to preserve (repeatable; toy concepts default to the other concepts)")
    e.add_argument("--out", type=Path, required=True, help="the edit file (.safetensors)")
    e.set_defaults(run=_erase_cmd)
    d = sub.add_parser("demo", help="erase a toy concept: before/after grid, JSON report, figure")
    d.add_argument("--concept", default="apple")
    d.add_argument("--method", choices=("rece", "uce", "fewshot"), default="rece")
    d.add_argument("--parts")
    d.add_argument("--per-prompt", type=int, default=6, help="images per concept for the report")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", type=Path, default=Path("out/demo"))
    d.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
