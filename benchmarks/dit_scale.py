"""Time and memory of the workbench's operations on a FLUX.1-dev-shaped pipeline (random weights, real width).

    python benchmarks/dit_scale.py                       # CPU: 1 double + 1 single block, 2 T5 layers, 512 px
    python benchmarks/dit_scale.py --size 256 --prompts 10
    python benchmarks/dit_scale.py --device cuda --double 19 --single 38 --t5-layers 24 --size 1024   # FLUX.1

The pipeline is :func:`workbench.flux_shaped.flux_pipeline`: FLUX.1-dev's shapes with ``--double`` /
``--single`` transformer blocks and ``--t5-layers`` T5-XXL layers (FLUX.1: 19, 38, 24), built in
memory (about 20 s for the CPU defaults). Rows, in this order:

* ``encode-N``: one batched encode of N prompts (CLIP's pooled vector, T5's 512 token rows), kept on
  the text encoder's device, as UCE and RECE keep them;
* ``forward@Spx``: one transformer forward at ``--size`` px (batch 1, distilled guidance), then the
  same forward 3 times more with forward hooks on the blocks: the median ``double-block`` and
  ``single-block`` and the rest (embedders, output); ``forward x19+38 (extrapolated)`` is rest + 19
  double + 38 single blocks, its memory the forward's peak plus the weights the full FLUX.1 pipeline
  has beyond the one built (the block rows show the whole forward's memory);
* ``uce-N``: UCE of "a photo of a church" with N preserve prompts on the default parts
  (``dit.context.proj`` and ``dit.pooled.in``); ``rece-N``: RECE, 3 epochs, the same parts;
* ``esd@Spx``: ESD (``esd-x``: every double block's text-stream attention), 2 iterations of 2 sampling steps;
* ``uce-text-kv-N``: UCE on ``dit.*.text.[kv]``, whose keys are captured in forward passes (N + 2
  prompts at 3 timesteps each, at ``--size``).

Seconds and memory are measured as in ``benchmarks/sd_scale.py`` (its ``measure``): on the CPU the
process's peak resident set while the row ran; on CUDA ``torch.cuda.max_memory_allocated``, each row
warmed up once and then timed ``--repeats`` times (default 3; the ESD and text k/v rows run once). A
row that fails prints its error and the others still run.
"""
from __future__ import annotations

import argparse
import gc
import math
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sd_scale import GB, Row, edits, measure, prompts, table, targets
from workbench import flux_shaped
from workbench.embed import conditioning
from workbench.families import family_of
from workbench.methods import esd, uce
from workbench.sampling import seeded

ROWS = ("encode", "forward", "uce", "rece", "esd", "uce-text-kv")
SPLITS = 3  # hooked forwards that time the blocks


def split_forward(pipe, forward: Callable[[], object], cuda: bool) -> tuple[float, list[float], list[float]]:
    """One call of ``forward`` timed whole and block by block (forward hooks on the transformer's
    blocks): its seconds, and those of each double and each single block."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    started: dict[str, float] = {}
    took: dict[str, list[float]] = {"double": [], "single": []}

    def before(name: str) -> Callable:
        def hook(module, args) -> None:
            sync()
            started[name] = time.perf_counter()
        return hook

    def after(name: str) -> Callable:
        def hook(module, args, output) -> None:
            sync()
            took["single" if ".single." in name else "double"].append(time.perf_counter() - started[name])
        return hook

    handles = []
    for name, block in family_of(pipe).blocks(pipe).items():
        handles += [block.register_forward_pre_hook(before(name)), block.register_forward_hook(after(name))]
    try:
        sync()
        t0 = time.perf_counter()
        forward()
        sync()
        total = time.perf_counter() - t0
    finally:
        for handle in handles:
            handle.remove()
    return total, took["double"], took["single"]


def missing_bytes(args: argparse.Namespace, dtype: torch.dtype) -> int:
    """Bytes of the weights the full FLUX.1 pipeline has beyond the one built."""
    built = flux_shaped.parameter_counts(args.double, args.single, args.t5_layers)
    full = flux_shaped.parameter_counts()
    return (sum(full.values()) - sum(built.values())) * torch.finfo(dtype).bits // 8


def forward_rows(pipe, args: argparse.Namespace, dtype: torch.dtype, rows: list[Row], repeats: int,
                 notes: dict[str, str]) -> None:
    """The forward row, the median double and single block, and the extrapolation to FLUX.1's depth."""
    family = family_of(pipe)
    cond = conditioning(pipe, ["a photo of a church"], device=None)
    noise = family.noise(pipe, seeded(0))

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return family.denoise(pipe, noise, torch.tensor(500.0), cond)

    at = f"@{args.size}px"
    measure("forward" + at, forward, args.device, rows, repeats)
    whole = rows[-1]
    runs = [split_forward(pipe, forward, args.device == "cuda") for _ in range(SPLITS)]
    total = float(np.median([r[0] for r in runs]))
    double, single = ([x for r in runs for x in r[i]] for i in (1, 2))
    median = lambda xs: float(np.median(xs)) if xs else math.nan  # noqa: E731
    rest = median([r[0] - sum(r[1]) - sum(r[2]) for r in runs])
    for kind, times in (("double", double), ("single", single)):
        name = f"{kind}-block{at}"
        rows.append(Row(name, median(times), whole.peak, whole.growth, whole.max_rss,
                        times[0] if times else math.nan, len(times)))
        notes[name] = f"median of {len(times)} block passes ({SPLITS} hooked forwards); memory: the whole forward's"
    name = f"forward{at} x{flux_shaped.DOUBLE}+{flux_shaped.SINGLE} (extrapolated)"
    seconds = rest + flux_shaped.DOUBLE * median(double) + flux_shaped.SINGLE * median(single)
    extra = missing_bytes(args, dtype)
    rows.append(Row(name, seconds, whole.peak + extra, whole.growth, whole.max_rss, math.nan, 0))
    notes[name] = (f"EXTRAPOLATED from the hooked forwards (median {total:.3f} s): rest {rest:.3f} s + "
                   f"{flux_shaped.DOUBLE} x double + {flux_shaped.SINGLE} x single; "
                   f"peak + {extra / GB:.1f} GiB of missing weights")
    print(f"  {name}: {seconds:.3f} s, peak {(whole.peak + extra) / GB:.2f} GiB", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="bfloat16")
    parser.add_argument("--double", type=int, default=1, help="double-stream blocks (FLUX.1: 19)")
    parser.add_argument("--single", type=int, default=1, help="single-stream blocks (FLUX.1: 38)")
    parser.add_argument("--t5-layers", type=int, default=2, help="T5-XXL encoder layers (FLUX.1: 24)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (FLUX.1: 1024)")
    parser.add_argument("--prompts", type=int, default=10, help="N: prompts encoded, preserved by UCE and RECE")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per row after an untimed warm-up, the median reported (default: 3 on "
                             "cuda, 1 on cpu: one run, no warm-up); the esd and uce-text-kv rows run once")
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) to this file")
    args = parser.parse_args(argv)
    wanted = args.rows.split(",")
    unknown = sorted(set(wanted) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if args.size <= 0 or args.size % 16:
        parser.error("--size must be a positive multiple of 16 (the VAE's 8x, then 2x2 patches)")
    repeats = args.repeats or (3 if args.device == "cuda" else 1)
    dtype = getattr(torch, args.dtype)
    n = args.prompts

    t0 = time.perf_counter()
    pipe = flux_shaped.flux_pipeline(args.double, args.single, args.t5_layers, dtype=dtype, device=args.device)
    pipe.vae.register_to_config(sample_size=args.size)  # the family draws, captures keys and trains at this side
    counts = flux_shaped.parameter_counts(args.double, args.single, args.t5_layers)
    print(f"FLUX.1-dev-shaped pipeline, {args.double} double + {args.single} single blocks, {args.t5_layers} T5 layers "
          f"({', '.join(f'{k} {v / 1e6:.2f} M' for k, v in counts.items())}) ready in {time.perf_counter() - t0:.1f} s "
          f"on {args.device}, {args.dtype}, {args.size} px, {torch.get_num_threads()} torch threads", flush=True)
    conditioning(pipe, ["a warm-up prompt"], device=None)
    rows: list[Row] = []
    notes: dict[str, str] = {}

    def render() -> str:
        """The table so far (written to ``--out`` after every row, so a run cut short still leaves one)."""
        targets(rows, args.device, "flux")
        for r in rows:
            r.target = "; ".join(x for x in (notes.get(r.name, ""), r.target) if x)
        text = table(rows, args.device)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")
        return text

    def run(name: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as e:  # a failed row must not stop the others
            traceback.print_exc(limit=-4)
            rows.append(Row(name, math.nan, 0, 0, 0, math.nan, 0))
            notes[name] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            print(f"  {name}: {notes[name]}", flush=True)
        finally:
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
            render()

    measured = lambda name, fn, times=repeats: lambda: measure(name, fn, args.device, rows, times)  # noqa: E731
    preserve = prompts(n)
    at = f"@{args.size}px"
    if "encode" in wanted:
        run(f"encode-{n}", measured(f"encode-{n}", lambda: conditioning(pipe, preserve, device=None)))
    if "forward" in wanted:
        run("forward" + at, lambda: forward_rows(pipe, args, dtype, rows, repeats, notes))
    if "uce" in wanted:
        run(f"uce-{n}", measured(f"uce-{n}", edits(pipe, preserve)["uce"]))
    if "rece" in wanted:
        run(f"rece-{n}", measured(f"rece-{n}", edits(pipe, preserve)["rece"]))
    if "esd" in wanted:
        run("esd" + at, measured("esd" + at, lambda: esd(pipe, "church", iterations=2, sample_steps=2, progress=False),
                                 1))
    if "uce-text-kv" in wanted:
        name = f"uce-text-kv-{n}"
        notes[name] = f"keys captured in {(n + 2) * len(family_of(pipe).KEY_TIMESTEPS)} forwards at {args.size} px"
        run(name, measured(name, lambda: uce(pipe, "a photo of a church", preserve=preserve, parts="dit.*.text.[kv]"),
                           1))
    print()
    print(render())


if __name__ == "__main__":
    main()
