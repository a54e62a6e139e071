"""Re-measure three of the README's analysis claims on the toy model, with n and intervals.

    python benchmarks/claims.py --part empty        # does an erased concept land next to the empty prompt? (1 min)
    python benchmarks/claims.py --part lens         # where does few-shot unlearning take hold in the lens? (5 min)
    python benchmarks/claims.py --part cumulative   # does UCE need the edit spread over all layers? (10 min)
    python benchmarks/claims.py --part drift        # do erased objects drift to related ones? (5 min)
    python benchmarks/claims.py --part drift --methods fewshot   # the same after few-shot unlearning only

empty: for each concept and method (UCE, RECE), the rank of "" among the toy vocabulary plus "" as the
erased concept's neighbour in the mid-block key space, after the edit (and before). lens: the share of
lens images (one per text-encoder layer) in which the oracle sees "car", before and after few-shot
unlearning of "car", over 4 prompts x 4 seeds per layer. cumulative: UCE on one cross-attention layer's
k or v, and on layers 0..i, efficacy on 8 probe images per run, for "car" x 2 evaluation seeds.
Intervals: Wilson, or bootstrap over concept x seed with 5 or more units (workbench.stats).
"""
from __future__ import annotations

import argparse
import time

import pandas as pd

import workbench
from workbench.toy.quality import MODELS as TOY_MODELS
from workbench.attacks.table import peak_gb
from workbench.anatomy import n_text_layers
from workbench.embed import lens
from workbench.methods import erase
from workbench.metrics import drift_test, judge_prompts
from workbench.profile import profile_of
from workbench.project import landing, vocabulary
from workbench.stats import cluster_rate
from workbench.sweep import layer_sweep

CONCEPTS = ("apple", "car", "cat", "star", "dog", "boat", "van gogh", "seurat")


def empty(pipe) -> None:
    words = vocabulary(profile_of(pipe).concept_set()).word.tolist() + [""]
    rows = []
    for method in ("uce", "rece"):
        for concept in CONCEPTS:
            t = landing(pipe, erase(pipe, concept, method), concept, k=len(words) - 1, vocabulary=words,
                        space="unet.mid.0.xattn.k")
            row = t[t["neighbour"] == ""].iloc[0]
            rows.append(dict(method=method, concept=concept, rank_after=int(row["rank"]),
                             rank_before=int(row["rank_before"]), distance=float(row["distance"])))
    t = pd.DataFrame(rows)
    print(f"Rank of the empty prompt among {len(words)} words as the erased concept's neighbour "
          "(unet.mid.0.xattn.k, cosine):\n")
    print("| method | " + " | ".join(CONCEPTS) + " |\n|---" * 1 + "|---" * len(CONCEPTS) + "|")
    for method, g in t.groupby("method", sort=False):
        print(f"| {method} | " + " | ".join(f"{a} (was {b})" for a, b in zip(g["rank_after"], g["rank_before"])) + " |")
    for method, g in t.groupby("method", sort=False):
        print(f"\n{method}: the empty prompt is the nearest word for {int((g['rank_after'] == 1).sum())} of {len(g)} "
              f"concepts (median rank after {g['rank_after'].median():.0f}, before {g['rank_before'].median():.0f}).")


def lens_part(pipe, judge) -> None:
    cs = profile_of(pipe).concept_set()
    prompts = ["an icon of a car", *cs.held_out("car", 3)]
    edit = erase(pipe, "car", "fewshot", progress=False)
    layers = list(range(n_text_layers(pipe)))
    rows = []
    for when in ("before", "after"):
        for prompt in prompts:
            for seed in range(4):
                if when == "after":
                    with edit.apply(pipe):
                        images = lens(pipe, prompt, seed=seed)
                else:
                    images = lens(pipe, prompt, seed=seed)
                labels = judge.choose(images, cs.labels("object"))
                rows += [dict(when=when, layer=i, prompt=prompt, seed=seed, hit=label == "car")
                         for i, label in zip(layers, labels)]
    t = pd.DataFrame(rows)
    print("Share of lens images showing a car (4 prompts x 4 seeds per cell; 95% interval, bootstrap over "
          "prompt x seed):\n")
    print("| layer | before | after few-shot unlearning of car |\n|---|---|---|")
    for i in layers:
        cells = []
        for when in ("before", "after"):
            g = t[(t["when"] == when) & (t["layer"] == i)].groupby(["prompt", "seed"])["hit"].agg(["sum", "count"])
            cells.append(str(cluster_rate(g["sum"].to_numpy(), g["count"].to_numpy())))
        print(f"| text.{i} | " + " | ".join(cells) + " |")
    print(f"\nPrompts: {', '.join(prompts)}")


def cumulative(pipe, judge) -> None:
    parts = []
    for concept in ("car",):
        for eval_seed in (1234, 4321):
            for cum in (False, True):
                t = layer_sweep(pipe, concept, "uce", cumulative=cum, judge=judge, per_prompt=8, per_other=1,
                                others=[profile_of(pipe).concept_set().related(concept)[0]], eval_seed=eval_seed,
                                progress=False)
                parts.append(t.assign(eval_seed=eval_seed))
    t = pd.concat(parts, ignore_index=True)
    t["erased"] = (t["efficacy"] * t["n_images"]).round().astype(int)
    print("UCE scoped to one cross-attention layer's k or v (single) or to layers 0..i (cumulative); efficacy "
          "for car over 2 evaluation seeds x 8 images per cell (95% interval):\n")
    print("| layer | single k | single v | cumulative k | cumulative v |\n|---|---|---|---|---|")
    for layer, g in t.groupby("layer_name", sort=False):
        cells = []
        for cum in (False, True):
            for comp in ("xattn.k", "xattn.v"):
                r = g[(g["cumulative"] == cum) & (g["component"] == comp)]
                cells.append(str(cluster_rate(r["erased"].to_numpy(), r["n_images"].to_numpy())))
        print(f"| {layer} | " + " | ".join(cells) + " |")


def drift(pipe, judge, methods: tuple[str, ...] = ("rece", "fewshot")) -> None:
    cs = profile_of(pipe).concept_set()
    objects = [c for c in cs.names if cs.kind(c) == "object"]
    for method in methods:
        parts = []
        for concept in objects:
            edit = erase(pipe, concept, method, progress=False) if method == "fewshot" else erase(pipe, concept, method)
            prompts = cs.probe(concept, 4)
            with edit.apply(pipe):
                _, rows = judge_prompts(pipe, judge, prompts, [concept] * len(prompts), (1234, 1235, 1236), cs)
            parts.append(rows)
        t = drift_test(pd.concat(parts, ignore_index=True), cs)
        print(f"{method}: images of each erased object that no longer show it (moved), the share called an object "
              "of its group (observed), and the null: the share of other groups' erased objects' moved images "
              "called one of those objects (16 objects x 3 evaluation seeds x 4 probe prompts):\n")
        print("| concept | moved | observed | null | difference [95% interval] | one-sided p |\n|---|---|---|---|---|---|")
        for r in t.itertuples():
            obs = "" if pd.isna(r.observed) else f"{r.observed:.0%}"
            print(f"| {r.concept} | {r.moved} | {obs} | {r.null:.0%} | {r.difference:+.0%} [{r.lo * 100:+.0f}, "
                  f"{r.hi * 100:+.0f}] | {r.p:.2g} |")
        print()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["empty", "lens", "cumulative", "drift", "all"], default="all")
    ap.add_argument("--methods", nargs="+", default=["rece", "fewshot"], choices=["rece", "fewshot"],
                    help="the drift part's methods")
    ap.add_argument("--model", choices=TOY_MODELS, default="toy", help="the toy UNet or the toy DiT")
    args = ap.parse_args(argv)
    pipe = workbench.load(args.model)
    judge = profile_of(pipe).judge()
    start = time.perf_counter()
    for name, fn in (("empty", lambda: empty(pipe)), ("lens", lambda: lens_part(pipe, judge)),
                     ("cumulative", lambda: cumulative(pipe, judge)), ("drift", lambda: drift(pipe, judge, tuple(args.methods)))):
        if args.part in (name, "all"):
            print(f"### {name}\n")
            fn()
            print()
    print(f"Wall time {(time.perf_counter() - start) / 60:.1f} min; peak memory {peak_gb():.2f} GB.")


if __name__ == "__main__":
    main()
