"""The ``workbench`` command.

    workbench generate --out samples.png                      # the toy model's sample grid
    workbench generate --model toy-dit --out samples-dit.png  # the toy DiT's
    workbench generate --prompt "a red apple" --prompt "a cat by seurat" --out two.png
    workbench generate --model ./my-sd-folder --prompt "a castle" --out castle.png
    workbench erase --concept apple --method rece --out apple.safetensors
    workbench generate --edit apple.safetensors --prompt "an apple" --out erased.png
    workbench demo --concept apple        # before/after grid, JSON report and figure in out/demo/
    workbench sweep data/grids/toy.yaml --out results/ [--cluster local:2 | tcp://host:8786] [--gpu]
    workbench sweep-status results/       # runs done, failed and left
    workbench encoders --model stabilityai/stable-diffusion-xl-base-1.0 --concept "van gogh" --style \
        --against "claude monet" --against picasso    # which text encoder carries the concept
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from .concepts import ConceptSet, a
from .edits import Edit
from .grid import run_grid
from .judges import CLIP_L14, ClipJudge
from .methods import METHODS, erase
from .models import load
from .plots import image_grid, save
from .report import before_after, erase_and_measure, showcase
from .sampling import GUIDANCE, STEPS, generate
from .store import load_results, status
from .toy import TOY_CONCEPTS
from .tracing import encoder_effects
from .toy.world import OBJECTS

#: Columns of the sample grid: how each object row is prompted.
SAMPLE_COLUMNS = ("{o}", "{o}", "a red {b}", "a blue {b}", "{o} by van gogh", "{o} by seurat",
                  "{o} by mondrian", "{o} by picasso")


def sample_grid(pipe, seed: int = 0, steps: int = STEPS, guidance: float = GUIDANCE):
    """One row per toy object, one column per prompt form (plain, colour, each painter)."""
    prompts = [col.format(o=a(o), b=o) for o in OBJECTS for col in SAMPLE_COLUMNS]
    images = generate(pipe, prompts, seed, steps, guidance)
    n = len(SAMPLE_COLUMNS)
    rows = [images[r * n:(r + 1) * n] for r in range(len(OBJECTS))]
    labels = [c.replace("{o} ", "").replace(" {b}", "").replace("{o}", "plain") for c in SAMPLE_COLUMNS]
    return image_grid(rows, list(OBJECTS), labels)


def _generate(args: argparse.Namespace) -> None:
    pipe = load(args.model)
    t0 = time.perf_counter()
    with Edit.load(args.edit).apply(pipe) if args.edit else nullcontext():
        _draw(args, pipe)
    print(f"wrote {args.out} ({time.perf_counter() - t0:.1f} s)")


def _draw(args: argparse.Namespace, pipe) -> None:
    if args.prompt:
        images = generate(pipe, args.prompt, args.seed, args.steps, args.guidance)
        fig = image_grid([images], [], args.prompt)
    elif args.model in ("toy", "toy-dit"):
        fig = sample_grid(pipe, args.seed, args.steps, args.guidance)
    else:
        sys.exit("give at least one --prompt for a model other than 'toy' or 'toy-dit'")
    save(fig, args.out)


def _erase_cmd(args: argparse.Namespace) -> None:
    pipe = load(args.model)
    edit = erase(pipe, args.concept, args.method, args.parts,
                 **({"preserve": args.preserve} if args.preserve else {}))
    edit.save(args.out)
    print(f"{args.method} erased {args.concept!r} in {edit.seconds:.2f} s -> {args.out}")
    print(edit.summary(pipe).to_string(index=False, float_format="%.4g"))


def _demo(args: argparse.Namespace) -> None:
    pipe = load("toy")
    out = Path(args.out)
    t0 = time.perf_counter()
    result = erase_and_measure(pipe, None, args.concept, args.method, args.parts,
                               concepts=TOY_CONCEPTS.names, per_prompt=args.per_prompt, seed=args.seed)
    save(before_after(pipe, result.edit, showcase(pipe, args.concept), seed=args.seed), out / "before_after.png")
    report = result.report()
    (out / "report.json").write_text(json.dumps(report, indent=1))
    save(result.figure(), out / "accuracy.png")
    result.edit.save(out / "edit.safetensors")
    print(f"erased {args.concept!r} with {args.method} in {result.edit.seconds:.2f} s: accuracy on it "
          f"{report['accuracy_on_concept']['before']:.0%} -> {result.after[args.concept]:.0%}, on the other "
          f"{len(result.others)} concepts {report['accuracy_on_others']['before']:.0%} -> "
          f"{report['accuracy_on_others']['after']:.0%} (preservation {result.preservation:.0%}); "
          f"wrote {out}/ ({time.perf_counter() - t0:.0f} s)")


def _sweep(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    table = run_grid(args.grid, args.out, cluster=args.cluster, resources={"GPU": 1} if args.gpu else None)
    print(f"{args.grid}: {len(table)} runs, {table.attrs['ran']} run now, {table.attrs['skipped']} already in "
          f"{args.out}, {table.attrs['failed']} failed ({time.perf_counter() - t0:.0f} s); "
          f"read them with workbench.store.load_results({str(args.out)!r})")
    _print_failures(table)


def _sweep_status(args: argparse.Namespace) -> None:
    counts = status(args.out)
    print(f"{args.out}: {counts['runs']} runs: {counts['done']} done, {counts['failed']} failed, "
          f"{counts['left']} left")
    _print_failures(load_results(args.out))


def _encoders(args: argparse.Namespace) -> None:
    gpu = torch.cuda.is_available()
    pipe = load(args.model, dtype=torch.float16 if gpu else None, device="cuda" if gpu else None)
    names = [args.concept, *args.against]
    concepts = ConceptSet.of(styles=names) if args.style else ConceptSet.of(objects=names)
    judge = ClipJudge.load(args.judge, device="cuda" if gpu else None)
    table = encoder_effects(pipe, args.concept, args.prompt, judge, concept_set=concepts, n=args.n, seed=args.seed)
    print(f"P({args.concept}) judged by CLIP among {', '.join(names)}, {args.n} images per row; drop = clean - "
          "corrupted: the encoder whose corruption alone takes the concept away carries it")
    print(table.to_string(index=False, float_format="%.3f"))


def _print_failures(table, shown: int = 5) -> None:
    failed = table[table["error"].notna()]
    for row in failed.head(shown).itertuples():
        print(f"  failed: {row.method} {row.concept!r} {row.part} (seed {row.seed}): {row.error}")
    if len(failed) > shown:
        print(f"  ... and {len(failed) - shown} more")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="workbench", description="Concept-erasure workbench.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate images (default: the toy model's sample grid)")
    g.add_argument("--model", default="toy", help="'toy', 'toy-dit', a diffusers folder, or a hub id")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=STEPS)
    g.add_argument("--guidance", type=float, default=GUIDANCE)
    g.add_argument("--edit", type=Path, help="an edit file (.safetensors) to apply first")
    g.add_argument("--out", type=Path, default=Path("out/samples.png"), help=".png, .pdf or .svg")
    g.set_defaults(run=_generate)
    e = sub.add_parser("erase", help="erase a concept and save the edit")
    e.add_argument("--model", default="toy")
    e.add_argument("--concept", required=True)
    e.add_argument("--method", choices=METHODS, default="rece")
    e.add_argument("--parts", help="parts to edit, a glob such as 'unet.*.xattn.v' or 'text.*.ffn'")
    e.add_argument("--preserve", action="append",
                   help="a prompt to preserve (repeatable; toy concepts default to the other concepts)")
    e.add_argument("--out", type=Path, required=True, help="the edit file (.safetensors)")
    e.set_defaults(run=_erase_cmd)
    d = sub.add_parser("demo", help="erase a toy concept: before/after grid, JSON report, figure")
    d.add_argument("--concept", default="apple")
    d.add_argument("--method", choices=METHODS, default="rece")
    d.add_argument("--parts")
    d.add_argument("--per-prompt", type=int, default=6, help="images per concept for the report")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", type=Path, default=Path("out/demo"))
    d.set_defaults(run=_demo)
    sw = sub.add_parser("sweep", help="run an experiment grid (YAML) into a resumable results folder")
    sw.add_argument("grid", type=Path, help="a grid file, e.g. data/grids/toy.yaml")
    sw.add_argument("--out", type=Path, required=True, help="the results folder (finished runs are skipped)")
    sw.add_argument("--cluster", help="local:N (N Dask worker processes here) or a scheduler address, "
                                     "tcp://host:8786; default: this process")
    sw.add_argument("--gpu", action="store_true", help="each run holds one GPU (workers started with "
                                                      "--resources GPU=1)")
    sw.set_defaults(run=_sweep)
    st = sub.add_parser("sweep-status", help="how many runs of a results folder are done, failed and left")
    st.add_argument("out", type=Path, help="the results folder")
    st.set_defaults(run=_sweep_status)
    en = sub.add_parser("encoders", help="which text encoder carries a concept (corrupt its tokens in each alone)")
    en.add_argument("--model", required=True, help="a diffusers folder or hub id (SDXL has two text encoders)")
    en.add_argument("--concept", required=True)
    en.add_argument("--prompt", help="the prompt to corrupt (default: 'a painting by <concept>' / 'a photo of a ...')")
    en.add_argument("--against", action="append", default=[], help="another label for the judge (repeatable)")
    en.add_argument("--style", action="store_true", help="the concept is a style (default: an object)")
    en.add_argument("--judge", default=CLIP_L14, help="a CLIP folder or cached hub id")
    en.add_argument("--n", type=int, default=8, help="images per row")
    en.add_argument("--seed", type=int, default=0)
    en.set_defaults(run=_encoders)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
