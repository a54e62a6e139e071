"""Quality benchmark of the toy model, measured by the oracle on seeds never used in training.

    python -m workbench.toy.quality            # prints a table (a few minutes on a laptop CPU)
    python -m workbench.toy.quality --json out/quality.json
    python -m workbench.toy.quality --model toy-dit   # the toy DiT

Rows: oracle accuracy on fresh renders; object accuracy of "a/an {object}" images (mean and worst
object); colour accuracy of "a {colour} {object}"; style accuracy of "{object} by {painter}";
seconds to generate 4 images; the recorded training time.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from ..sampling import GUIDANCE, STEPS, generate
from .model import load_toy, load_toy_dit
from .oracle import Oracle
from .paths import TOY_DIR, TOY_DIT_DIR
from .render import render
from .world import COLOURS, OBJECTS, PAINTERS, a, sample_scene

#: The toy models by name: their loader and folder.
MODELS = {"toy": (load_toy, TOY_DIR), "toy-dit": (load_toy_dit, TOY_DIT_DIR)}
#: Render seeds at or above this were never used to train the model or the oracle.
FRESH_SEED = 3_000_000_000


def oracle_accuracy(oracle: Oracle, n: int = 1000, seed: int = FRESH_SEED) -> dict[str, float]:
    """Per-head accuracy of the oracle on ``n`` fresh renders."""
    scenes = [sample_scene(random.Random(seed + i)) for i in range(n)]
    preds = oracle.predict([render(s, seed=seed + i) for i, s in enumerate(scenes)])
    return {h: float(np.mean([p[h] == getattr(s, h) for p, s in zip(preds, scenes)]))
            for h in ("object", "colour", "style")}


def measure(per_prompt: int = 12, seed: int = 10_000, guidance: float = GUIDANCE, pipe=None,
            model: str = "toy") -> dict:
    """Every number of the benchmark, as a dict, for ``pipe`` (default: the bundled toy ``model``,
    ``"toy"`` or ``"toy-dit"``)."""
    if model not in MODELS:
        raise ValueError(f"unknown toy model {model!r}; choose one of {', '.join(MODELS)}")
    torch.manual_seed(seed)
    loader, folder = MODELS[model]
    pipe, oracle = pipe if pipe is not None else loader(), Oracle.load()
    result: dict = {"oracle_on_renders": oracle_accuracy(oracle)}

    prompts = [a(o) for o in OBJECTS for _ in range(per_prompt)]
    preds = oracle.predict(generate(pipe, prompts, seed, guidance=guidance))
    per_object = {o: float(np.mean([p["object"] == o for p in preds[k * per_prompt:(k + 1) * per_prompt]]))
                  for k, o in enumerate(OBJECTS)}
    result["object"] = {"mean": float(np.mean(list(per_object.values()))), "per_object": per_object}

    pairs = [(c, o) for c in COLOURS for o in OBJECTS]
    preds = oracle.predict(generate(pipe, [f"{a(c)} {o}" for c, o in pairs], seed + 1, guidance=guidance))
    result["colour"] = float(np.mean([p["colour"] == c for p, (c, _) in zip(preds, pairs)]))

    pairs = [(p, o) for p in PAINTERS for o in OBJECTS for _ in range(2)]
    preds = oracle.predict(generate(pipe, [f"{a(o)} by {p}" for p, o in pairs], seed + 2, guidance=guidance))
    per_style = {p: float(np.mean([q["style"] == p for q, (pp, _) in zip(preds, pairs) if pp == p]))
                 for p in PAINTERS}
    result["style"] = {"mean": float(np.mean(list(per_style.values()))), "per_style": per_style}

    four = ["a red apple", "a blue car", "a cat by van gogh", "a star by seurat"]
    generate(pipe, four, 0, guidance=guidance)  # warm-up
    times = []
    for k in range(3):
        t0 = time.perf_counter()
        generate(pipe, four, k, guidance=guidance)
        times.append(time.perf_counter() - t0)
    result["seconds_for_4_images"] = float(np.median(times))
    log = folder / "training.json"
    result["training_minutes"] = json.loads(log.read_text())["total_seconds"] / 60 if log.exists() else None
    result["settings"] = {"steps": STEPS, "guidance": guidance, "per_prompt": per_prompt, "seed": seed,
                          "threads": torch.get_num_threads()}
    return result


def table(r: dict) -> str:
    """The benchmark as a Markdown table, with the target each number must meet."""
    o = r["oracle_on_renders"]
    worst = min(r["object"]["per_object"].items(), key=lambda kv: kv[1])
    rows = [
        ("oracle accuracy on fresh renders (object / colour / style)",
         f"{o['object']:.1%} / {o['colour']:.1%} / {o['style']:.1%}", ">= 97% each"),
        ('"a/an {object}": object accuracy, mean', f"{r['object']['mean']:.1%}", ">= 80%"),
        ('"a/an {object}": object accuracy, worst object', f"{worst[1]:.1%} ({worst[0]})", ">= 60%"),
        ('"a {colour} {object}": colour accuracy', f"{r['colour']:.1%}", ">= 80%"),
        ('"{object} by {painter}": style accuracy', f"{r['style']['mean']:.1%}", ">= 70%"),
        ("time to generate 4 images (CPU, 20 steps)", f"{r['seconds_for_4_images']:.2f} s", "<= 3 s"),
        ("training time", f"{r['training_minutes']:.0f} min" if r["training_minutes"] else "n/a",
         "<= 90 min"),
    ]
    lines = ["| measure | value | target |", "|---|---|---|"]
    lines += [f"| {m} | {v} | {t} |" for m, v, t in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-prompt", type=int, default=12, help="images per object prompt")
    p.add_argument("--guidance", type=float, default=GUIDANCE)
    p.add_argument("--json", type=Path, help="also write every number here")
    p.add_argument("--model", choices=tuple(MODELS), default="toy")
    args = p.parse_args(argv)
    r = measure(args.per_prompt, guidance=args.guidance, model=args.model)
    print(table(r))
    print("per object:", ", ".join(f"{k} {v:.0%}" for k, v in r["object"]["per_object"].items()))
    print("per style:", ", ".join(f"{k} {v:.0%}" for k, v in r["style"]["per_style"].items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
