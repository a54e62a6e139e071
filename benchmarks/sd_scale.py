"""Time and memory of the workbench's operations at Stable Diffusion 1.4's size (random weights).

    python benchmarks/sd_scale.py --quick          # 10 and 100 prompts only
    python benchmarks/sd_scale.py                  # also 1,000 prompts
    python benchmarks/sd_scale.py --device cuda --dtype float16
    python benchmarks/sd_scale.py --device cuda --dtype float16 --rows encode --quick --profile  # UCE/RECE by operator
    python benchmarks/sd_scale.py --quick --rows encode,uce,rece,fewshot,umap   # no lens

On 2 shared CPU cores ``--quick`` took 37 minutes, 27 of them the lens (12 layers at 512 px with
guidance: 48 UNet passes and 12 VAE decodes) and 5 few-shot; without the lens, 10 minutes.

The pipeline is :func:`workbench.sd14.sd14_pipeline` (built once into ``$WORKBENCH_CACHE``, about a
minute). Rows: one batched encode of N prompts, the embeddings kept on the text encoder's device (as
UCE and RECE keep them); UCE and RECE (3 epochs) with N preserve prompts; few-shot
unlearning at 512 px (2 steps; 8 on a GPU); a UMAP of 2,000 CLIP-L embeddings; the text-encoder lens.
On CUDA each row runs once untimed (the first run, in its own column: kernel selection for new shapes)
and then ``--repeats`` times (default 9); its seconds are the median. Memory, in GiB: on the CPU,
*peak* is the process's largest resident set while the row ran (sampled every 10 ms), *growth* that
peak less the resident set when it started, *max RSS* the process's maximum so far
(``getrusage``; it never goes down). On CUDA, peak and growth are ``torch.cuda.max_memory_allocated``.
Targets: UCE within 1.2x and RECE within 1.6x of the encode of the same prompts; on a GPU RECE <= 1 s
and few-shot (8 steps) <= 5 s; few-shot's CPU peak <= 12 GiB.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from workbench import sd14
from workbench.embed import encode, lens
from workbench.methods import fewshot, rece, uce
from workbench.project import LandingMap

GB = 1024 ** 3  # GiB
PAGE = os.sysconf("SC_PAGE_SIZE")
ROWS = ("encode", "uce", "rece", "fewshot", "fewshot-8", "umap", "lens")
TEMPLATES = ("a photo of a {}", "a painting of a {}", "a {} in the city", "a close-up of a {}", "{}")


def words(n: int) -> list[str]:
    """``n`` English words: CLIP's whole-word tokens of 4+ letters, in vocabulary (merge) order."""
    vocab = json.loads((sd14.clip_tokenizer_files() / "vocab.json").read_text(encoding="utf-8"))
    out = [t[:-4] for t in vocab if t.endswith("</w>") and t[:-4].isalpha() and t[:-4].isascii() and len(t) >= 8]
    return out[:n]


def prompts(n: int) -> list[str]:
    """``n`` distinct prompts, templates x words."""
    ws = words(n // len(TEMPLATES) + 1)
    return [t.format(w) for w in ws for t in TEMPLATES][:n]


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Sampler:
    """Largest resident set seen, read from /proc/self/statm every ``every`` seconds on a thread."""

    def __init__(self, every: float = 0.01) -> None:
        self.every, self._stop = every, threading.Event()
        self.start = self.peak = rss()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, rss())

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


@dataclass
class Row:
    name: str
    seconds: float  # the median of the timed runs
    peak: int  # bytes
    growth: int  # bytes
    max_rss: int  # bytes
    first: float  # the first run's seconds (the warm-up, when there were several)
    runs: int  # timed runs
    target: str = ""


def measure(name: str, fn: Callable[[], object], device: str, rows: list[Row], repeats: int = 1) -> None:
    """Run ``fn`` and append its row: once, or (``repeats`` > 1) once untimed to warm up, then
    ``repeats`` timed runs whose median is the row's seconds."""
    gc.collect()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    times = []
    with Sampler() as sampler:
        for _ in range(1 + repeats if repeats > 1 else 1):
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        growth = peak - start
    else:
        peak, growth = sampler.peak, sampler.peak - sampler.start
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    timed = times[1:] if repeats > 1 else times
    seconds = float(np.median(timed))
    rows.append(Row(name, seconds, peak, growth, max_rss, times[0], len(timed)))
    print(f"  {name}: {seconds:.3f} s (median of {len(timed)}; first {times[0]:.3f} s), peak {peak / GB:.2f} GiB "
          f"(+{growth / GB:.2f} GiB)", flush=True)


def edits(pipe, preserve: list[str]) -> dict[str, Callable[[], object]]:
    """The UCE and RECE rows' erasures of "church" with ``preserve``."""
    return {"uce": lambda: uce(pipe, "a photo of a church", preserve=preserve),
            "rece": lambda: rece(pipe, "church", preserve=preserve, epochs=3)}


def profile(pipe, preserve: list[str], device: str) -> None:
    """Print where UCE's and RECE's time goes, operator by operator, after a warm-up run of each."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for name, fn in edits(pipe, preserve).items():
        fn()
        with profiler(activities=activities) as prof:
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
        print(f"\n{name}-{len(preserve)}: operators by host time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=45))


def church_images(n: int = 4, size: int = 512, seed: int = 0) -> list[Image.Image]:
    """``n`` smooth random RGB images (stand-ins: the weights are random, so any image will do)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        out.append(Image.fromarray(small).resize((size, size), Image.BICUBIC))
    return out


def targets(rows: list[Row], device: str) -> None:
    """Fill in each row's target and whether it is met."""
    by_name = {r.name: r for r in rows}
    ok = lambda met: "yes" if met else "**no**"  # noqa: E731
    for r in rows:
        kind, _, n = r.name.partition("-")
        notes = []
        if kind in ("uce", "rece") and f"encode-{n}" in by_name:
            limit = 1.2 if kind == "uce" else 1.6
            ratio = r.seconds / by_name[f"encode-{n}"].seconds
            notes.append(f"<= {limit}x encode-{n}: {ratio:.2f}x {ok(ratio <= limit)}")
        if kind == "rece" and device == "cuda":
            notes.append(f"<= 1 s: {ok(r.seconds <= 1)}")
        if r.name == "fewshot-8" and device == "cuda":
            notes.append(f"<= 5 s: {ok(r.seconds <= 5)}")
        if kind == "fewshot" and device == "cpu":
            notes.append(f"peak <= 12 GiB: {ok(r.peak <= 12 * GB)}")
        r.target = "; ".join(notes)


def table(rows: list[Row], device: str) -> str:
    mem = "GPU" if device == "cuda" else "RSS"
    lines = [f"| row | seconds | runs | first run (s) | peak {mem} (GiB) | growth (GiB) | max RSS (GiB) | target |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r.name} | {r.seconds:.3f} | {r.runs} | {r.first:.3f} | {r.peak / GB:.2f} | {r.growth / GB:.2f} | "
              f"{r.max_rss / GB:.2f} | {r.target} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--rows", default=None,
                        help=f"comma-separated, from {', '.join(ROWS)} (default: all; fewshot-8 only on cuda)")
    parser.add_argument("--quick", action="store_true", help="10 and 100 prompts only, not 1,000")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's operators (host and device time) for UCE and RECE at the "
                             "smallest N")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per row after an untimed warm-up, the median reported (default: 9 on "
                             "cuda, 1 on cpu: one run, no warm-up); umap always runs once")
    args = parser.parse_args(argv)
    repeats = args.repeats or (9 if args.device == "cuda" else 1)
    wanted = args.rows.split(",") if args.rows else [r for r in ROWS if r != "fewshot-8" or args.device == "cuda"]
    unknown = sorted(set(wanted) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    sizes = (10, 100) if args.quick else (10, 100, 1000)
    dtype = getattr(torch, args.dtype)

    t0 = time.perf_counter()
    pipe = sd14.sd14_pipeline(dtype=dtype, device=args.device)
    counts = sd14.parameter_counts()
    print(f"SD 1.4-shaped pipeline ({', '.join(f'{k} {v / 1e6:.2f} M' for k, v in counts.items())}) ready in "
          f"{time.perf_counter() - t0:.1f} s on {args.device}, {args.dtype}, {torch.get_num_threads()} torch "
          f"threads", flush=True)
    encode(pipe, ["a warm-up prompt"])  # first-call costs (kernel selection, allocator) stay out of the rows
    rows: list[Row] = []
    run = lambda name, fn, times=repeats: measure(name, fn, args.device, rows, times)  # noqa: E731
    for n in sizes:
        preserve = prompts(n)
        if "encode" in wanted:  # kept on the text encoder's device, as UCE and RECE keep it
            run(f"encode-{n}", lambda: encode(pipe, preserve, device=None))
        if "uce" in wanted:
            run(f"uce-{n}", lambda: edits(pipe, preserve)["uce"]())
        if "rece" in wanted:
            run(f"rece-{n}", lambda: edits(pipe, preserve)["rece"]())
    images = church_images(size=pipe.unet.config.sample_size * pipe.vae_scale_factor)
    for name, steps in (("fewshot", 2), ("fewshot-8", 8)):
        if name in wanted:
            run(name, lambda: fewshot(pipe, "church", images=images, steps=steps, progress=False))
    if "umap" in wanted:
        vocabulary = words(2000)
        run("umap", lambda: LandingMap.fit(pipe, vocabulary=vocabulary, space="text"), 1)
    if "lens" in wanted:
        run("lens", lambda: lens(pipe, "a painting by van gogh", steps=2))
    if args.profile:
        profile(pipe, prompts(sizes[0]), args.device)
    targets(rows, args.device)
    print()
    print(table(rows, args.device))


if __name__ == "__main__":
    main()
