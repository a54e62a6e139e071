"""Erasure benchmark on the toy model: efficacy, preservation, time, and scaling with the preserve list.

    python benchmarks/erasure.py                 # prints two Markdown tables (about 10 minutes on CPU)
    python benchmarks/erasure.py --per-prompt 4  # quicker, noisier
    python benchmarks/erasure.py --all           # every object and style, not only the 8 named below
    python benchmarks/erasure.py --timing-only   # seconds per erasure and scaling only
    python benchmarks/erasure.py --bad-input-only

Efficacy: oracle accuracy on the erased concept's prompts (lower is stronger). Preservation: accuracy on
the other 19 concepts as a fraction of the unedited model's. After the first table, a second one says
what the oracle calls each erased concept's images and its floor for that concept: how often it gives
the concept's label to the other erased concepts' images. Peak memory is the process's maximum RSS.
"""
from __future__ import annotations

import argparse
import resource
import time
from collections import Counter

import numpy as np

import workbench
from workbench.toy.quality import MODELS as TOY_MODELS
from workbench.metrics import accuracy, hits, predictions, preservation
from workbench.methods import erase, fewshot, rece, uce
from workbench.toy import TOY_CONCEPTS
from workbench.toy.oracle import Oracle
from workbench.toy.world import all_captions

CONCEPTS = ("apple", "car", "cat", "star", "dog", "boat", "van gogh", "seurat")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def methods(pipe) -> dict:
    """Each method with the defaults ``erase`` uses on the toy model."""
    return {
        "rece": lambda c: erase(pipe, c, "rece"),
        "fewshot": lambda c: erase(pipe, c, "fewshot", progress=False),
    }


def run(per_prompt: int, erased: tuple[str, ...] = CONCEPTS, only: str | None = None, model: str = "toy") -> None:
    pipe, oracle = workbench.load(model), Oracle.load()
    concepts = TOY_CONCEPTS.names
    base = accuracy(pipe, oracle, concepts, per_prompt)
    print("| method | concept | accuracy on concept (before -> after) | preservation | seconds |")
    print("|---|---|---|---|---|")
    labels: dict[str, dict[str, list[str]]] = {}
    for name, fn in methods(pipe).items():
        if only not in (None, name):
            continue
        labels[name] = {}
        for c in erased:
            t0 = time.perf_counter()
            edit = fn(c)
            seconds = time.perf_counter() - t0
            with edit.apply(pipe):
                preds = predictions(pipe, oracle, concepts, per_prompt)
            after = hits(preds)
            labels[name][c] = [label for k, label in preds if k == c]
            others = [k for k in concepts if k != c]
            keep = preservation({k: after[k] for k in others}, {k: base[k] for k in others})
            print(f"| {name} | {c} | {base[c]:.0%} -> {after[c]:.0%} | {keep:.0%} | {seconds:.2f} |", flush=True)
    floors(labels)
    scaling(pipe)


def floors(labels: dict[str, dict[str, list[str]]]) -> None:
    """What the oracle calls each concept's images after erasing it, and its floor: the share of the *other*
    erased concepts' images (same kind) that it calls this concept. An accuracy near the floor is the
    oracle's bias, not a concept left in the model."""
    print("\n| method | concept | the oracle calls its erased images | floor |")
    print("|---|---|---|---|")
    for name, by_concept in labels.items():
        for c, seen in by_concept.items():
            kind = TOY_CONCEPTS.kind
            rest = [x for k, v in by_concept.items() if k != c and kind(k) == kind(c) for x in v]
            common = ", ".join(f"{label} {n}" for label, n in Counter(seen).most_common(3))
            floor = f"{np.mean([x == c for x in rest]):.0%} of {len(rest)}" if rest else "-"
            print(f"| {name} | {c} | {common} | {floor} |", flush=True)


def timing(pipe) -> None:
    """Seconds per erasure alone (median of 3), without generating images."""
    print("\n| method | " + " | ".join(CONCEPTS) + " |")
    print("|---|" + "---|" * len(CONCEPTS))
    for name, fn in methods(pipe).items():
        cells = []
        for c in CONCEPTS:
            runs = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn(c)
                runs.append(time.perf_counter() - t0)
            cells.append(f"{np.median(runs):.2f}")
        print(f"| {name} s | " + " | ".join(cells) + " |", flush=True)
    scaling(pipe)


def scaling(pipe) -> None:
    print("\n| preserve prompts | UCE s | RECE s | peak MB |")
    print("|---|---|---|---|")
    pool = [c for c in all_captions() if "apple" not in c]
    for n in (10, 100, 1000):
        preserve = pool[:: max(1, len(pool) // n)][:n]
        t = {}
        for name, fn in (("uce", uce), ("rece", rece)):
            runs = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn(pipe, "apple", preserve=preserve)
                runs.append(time.perf_counter() - t0)
            t[name] = float(np.median(runs))
        print(f"| {n} | {t['uce']:.2f} | {t['rece']:.2f} | {peak_mb():.0f} |", flush=True)


def bad_input(pipe) -> None:
    """Each bad input: the error it raises, and whether every weight of the model is unchanged after it."""
    import json
    import tempfile
    import warnings
    from pathlib import Path

    import torch
    from PIL import Image

    from workbench.anatomy import parts
    from workbench.edits import Edit

    tmp = Path(tempfile.mkdtemp())
    (tmp / "empty").mkdir()
    mixed = tmp / "mixed"
    mixed.mkdir()
    Image.new("RGB", (57, 31), "red").save(mixed / "odd-size.png")
    (mixed / "notes.txt").write_text("not an image")
    tiny = workbench.load(workbench.build_tiny_sd(tmp / "tiny-sd"))
    uce(tiny, "apple").save(tmp / "other-model.safetensors")
    sdxl = tmp / "sdxl"
    sdxl.mkdir()
    index = json.loads((tmp / "tiny-sd" / "model_index.json").read_text())
    (sdxl / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline",
                                                        "text_encoder_2": index["text_encoder"]}))
    cases = {
        "concept that tokenizes to nothing": lambda: rece(pipe, "   "),
        "missing image folder": lambda: fewshot(pipe, "apple", images=tmp / "missing", progress=False),
        "an SDXL-shaped pipeline folder": lambda: workbench.load(sdxl),
        "empty image folder": lambda: fewshot(pipe, "apple", images=tmp / "empty", progress=False),
        "non-image file and odd-sized image": lambda: fewshot(pipe, "apple", images=mixed, steps=1, progress=False),
        "selector matching nothing": lambda: uce(pipe, "apple", parts="unet.*.xattn.z"),
        "edit file for another model": lambda: Edit.load(tmp / "other-model.safetensors").apply(pipe).__enter__(),
        "NaN in a result": lambda: uce(pipe, "apple", erase_scale=float("nan")),
    }
    base = {n: p.weight.detach().clone() for n, p in parts(pipe).items()}
    print("\n| bad input | outcome | message | model unchanged |")
    print("|---|---|---|---|")
    for name, fn in cases.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                fn()
                outcome, message = "ran", "; ".join(str(c.message) for c in caught) or "-"
            except Exception as exc:  # the row shows what the user would read
                outcome, message = type(exc).__name__, str(exc)
        unchanged = all(torch.equal(base[n], p.weight) for n, p in parts(pipe).items())
        short = message if len(message) < 150 else message[:147] + "..."
        print(f"| {name} | {outcome} | {short.replace('|', '/')} | {unchanged} |", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-prompt", type=int, default=8)
    p.add_argument("--all", action="store_true", help="erase each of the 20 concepts, not only the 8 above")
    p.add_argument("--method", choices=["rece", "fewshot"], help="only this method")
    p.add_argument("--bad-input-only", action="store_true", help="only the bad-input table (seconds)")
    p.add_argument("--timing-only", action="store_true",
                   help="only seconds per erasure and the scaling table (about a minute)")
    p.add_argument("--model", choices=TOY_MODELS, default="toy", help="the toy UNet or the toy DiT")
    args = p.parse_args()
    if args.timing_only:
        timing(workbench.load(args.model))
    elif args.bad_input_only:
        bad_input(workbench.load(args.model))
    else:
        run(args.per_prompt, tuple(TOY_CONCEPTS.names) if args.all else CONCEPTS, args.method, args.model)
        bad_input(workbench.load(args.model))
