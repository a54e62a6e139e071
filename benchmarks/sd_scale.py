"""Time and memory of the workbench's operations at Stable Diffusion 1.4's (or SDXL's) size (random weights).

    python benchmarks/sd_scale.py --quick          # 10 and 100 prompts only
    python benchmarks/sd_scale.py                  # also 1,000 prompts
    python benchmarks/sd_scale.py --device cuda --dtype float16
    python benchmarks/sd_scale.py --device cuda --dtype float16 --rows encode --quick --profile  # UCE/RECE by operator
    python benchmarks/sd_scale.py --quick --rows encode,uce,rece,fewshot,umap   # no lens
    python benchmarks/sd_scale.py --family sdxl --quick --dtype bfloat16 --size 512   # SDXL; few-shot, ESD at 512 px

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

``--family sdxl`` runs :func:`workbench.sdxl_shaped.sdxl_pipeline` instead (SDXL base 1.0's shapes: both
text encoders, the 2.57 B parameter UNet; built once in bfloat16, about a minute; the default dtype is
bfloat16 there). Its rows: the encode (one batched encode of N prompts through both text encoders, token
rows and pooled embeddings), UCE and RECE as above (70 cross-attention layers, 2,048-wide keys),
few-shot (2 steps; 8 on a GPU) and ESD (``esd-x``, 2 iterations of 2 sampling steps). ``--size`` draws
and trains few-shot and ESD at a smaller side than the model's own (1,024 px for SDXL is heavy for a
CPU); those rows then carry the size in their names (``fewshot@512px``). The ratio targets apply to both
families, the GPU-seconds and CPU-peak targets are SD 1.4's.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from workbench import sd14, sdxl_shaped
from workbench.embed import conditioning, encode, lens
from workbench.families import family_of
from workbench.methods import esd, fewshot, rece, uce
from workbench.project import LandingMap

GB = 1024 ** 3  # GiB
PAGE = os.sysconf("SC_PAGE_SIZE")
ROWS = ("encode", "uce", "rece", "fewshot", "fewshot-8", "umap", "lens")  # SD 1.4's rows
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


@dataclass(frozen=True)
class Model:
    """A model the benchmark runs at full size with random weights: how to get it, its parameter
    counts, the rows it has, and its encode row (N prompts encoded as UCE and RECE encode them, kept on
    the text encoder's device)."""

    title: str
    pipeline: Callable[..., object]  # (dtype=, device=) -> pipeline
    counts: Callable[[], dict[str, int]]
    rows: tuple[str, ...]
    encode: Callable[[object, list[str]], object]
    dtype: str  # the default --dtype
    unet: dict  # the UNet's config

    def size_step(self) -> int:
        """Image sides must be multiples of this: the VAE's 8x times the UNet's downsampling."""
        return 8 * 2 ** (len(self.unet["block_out_channels"]) - 1)


MODELS = {
    "sd14": Model("SD 1.4-shaped", sd14.sd14_pipeline, sd14.parameter_counts, ROWS,
                  lambda pipe, texts: encode(pipe, texts, device=None), "float32", sd14.SD14_UNET),
    "sdxl": Model("SDXL-shaped", sdxl_shaped.sdxl_pipeline, sdxl_shaped.parameter_counts,
                  ("encode", "uce", "rece", "fewshot", "fewshot-8", "esd"),
                  lambda pipe, texts: conditioning(pipe, texts, device=None), "bfloat16", sdxl_shaped.SDXL_UNET),
}


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


@contextmanager
def drawn_at(pipe, size: int | None) -> Iterator[str]:
    """Inside, ``pipe`` draws and trains at ``size`` pixels a side (its UNet's ``sample_size`` changed,
    put back on leaving; ``None``: the model's own); yields the suffix of the rows' names, ``"@512px"``,
    or ``""`` at the model's own size."""
    own = pipe.unet.config.sample_size
    if size is None or size == own * pipe.vae_scale_factor:
        yield ""
        return
    pipe.unet.register_to_config(sample_size=size // pipe.vae_scale_factor)
    try:
        yield f"@{size}px"
    finally:
        pipe.unet.register_to_config(sample_size=own)


def targets(rows: list[Row], device: str, model: str = "sd14") -> None:
    """Fill in each row's target and whether it is met (the seconds and peak targets are SD 1.4's)."""
    by_name = {r.name: r for r in rows}
    ok = lambda met: "yes" if met else "**no**"  # noqa: E731
    for r in rows:
        kind, _, n = r.name.partition("-")
        notes = []
        if kind in ("uce", "rece") and f"encode-{n}" in by_name:
            limit = 1.2 if kind == "uce" else 1.6
            ratio = r.seconds / by_name[f"encode-{n}"].seconds
            notes.append(f"<= {limit}x encode-{n}: {ratio:.2f}x {ok(ratio <= limit)}")
        if model == "sd14" and kind == "rece" and device == "cuda":
            notes.append(f"<= 1 s: {ok(r.seconds <= 1)}")
        if model == "sd14" and r.name == "fewshot-8" and device == "cuda":
            notes.append(f"<= 5 s: {ok(r.seconds <= 5)}")
        if model == "sd14" and kind == "fewshot" and device == "cpu":
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
    parser.add_argument("--family", choices=tuple(MODELS), default="sd14",
                        help="the model whose shapes are timed: SD 1.4 (default) or SDXL base 1.0")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="default: float32 for sd14, bfloat16 for sdxl")
    parser.add_argument("--rows", default=None,
                        help=f"comma-separated, from {', '.join(ROWS)} (sd14) or {', '.join(MODELS['sdxl'].rows)} "
                             "(sdxl) (default: all; fewshot-8 only on cuda)")
    parser.add_argument("--size", type=int, default=None,
                        help="image side in pixels for the few-shot and ESD rows (default: the model's own, 512 for "
                             "sd14, 1024 for sdxl); the rows' names then say it")
    parser.add_argument("--quick", action="store_true", help="10 and 100 prompts only, not 1,000")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's operators (host and device time) for UCE and RECE at the "
                             "smallest N")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per row after an untimed warm-up, the median reported (default: 9 on "
                             "cuda, 1 on cpu: one run, no warm-up); umap always runs once")
    args = parser.parse_args(argv)
    repeats = args.repeats or (9 if args.device == "cuda" else 1)
    model = MODELS[args.family]
    wanted = (args.rows.split(",") if args.rows
              else [r for r in model.rows if r != "fewshot-8" or args.device == "cuda"])
    unknown = sorted(set(wanted) - set(model.rows))
    if unknown:
        parser.error(f"unknown rows {unknown} for --family {args.family}; choose from {', '.join(model.rows)}")
    if args.size is not None and (args.size <= 0 or args.size % model.size_step()):
        parser.error(f"--size must be a positive multiple of {model.size_step()} for --family {args.family}")
    sizes = (10, 100) if args.quick else (10, 100, 1000)
    dtype_name = args.dtype or model.dtype
    dtype = getattr(torch, dtype_name)

    t0 = time.perf_counter()
    pipe = model.pipeline(dtype=dtype, device=args.device)
    counts = model.counts()
    print(f"{model.title} pipeline ({', '.join(f'{k} {v / 1e6:.2f} M' for k, v in counts.items())}) ready in "
          f"{time.perf_counter() - t0:.1f} s on {args.device}, {dtype_name}, {torch.get_num_threads()} torch "
          f"threads", flush=True)
    model.encode(pipe, ["a warm-up prompt"])  # first-call costs (kernel selection, allocator) stay out of the rows
    rows: list[Row] = []
    run = lambda name, fn, times=repeats: measure(name, fn, args.device, rows, times)  # noqa: E731
    for n in sizes:
        preserve = prompts(n)
        if "encode" in wanted:  # kept on the text encoder's device, as UCE and RECE keep it
            run(f"encode-{n}", lambda: model.encode(pipe, preserve))
        if "uce" in wanted:
            run(f"uce-{n}", lambda: edits(pipe, preserve)["uce"]())
        if "rece" in wanted:
            run(f"rece-{n}", lambda: edits(pipe, preserve)["rece"]())
    with drawn_at(pipe, args.size) as at:
        images = church_images(size=family_of(pipe).image_size(pipe))
        for name, steps in (("fewshot", 2), ("fewshot-8", 8)):
            if name in wanted:
                run(name + at, lambda: fewshot(pipe, "church", images=images, steps=steps, progress=False))
        if "esd" in wanted:
            run("esd" + at, lambda: esd(pipe, "church", iterations=2, sample_steps=2, progress=False))
    if "umap" in wanted:
        vocabulary = words(2000)
        run("umap", lambda: LandingMap.fit(pipe, vocabulary=vocabulary, space="text"), 1)
    if "lens" in wanted:
        run("lens", lambda: lens(pipe, "a painting by van gogh", steps=2))
    if args.profile:
        profile(pipe, prompts(sizes[0]), args.device)
    targets(rows, args.device, args.family)
    print()
    print(table(rows, args.device))


if __name__ == "__main__":
    main()
