"""Where erased concepts land: UMAP timings on 2,000 embeddings and landing tables, printed as Markdown.

    python benchmarks/analyses_project.py [--concepts apple car "van gogh"] [--out out/project]

UMAP is fitted twice on the same 2,000 text embeddings (the default vocabulary plus toy captions): the
first fit includes numba's compile (or loading it from its on-disk cache), the second does not; both
must give the same coordinates. Landing tables: RECE (UNet cross-attention keys) and few-shot
unlearning (text encoder), neighbours measured in each space itself.
"""
from __future__ import annotations

import argparse
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import workbench
from workbench.toy.quality import MODELS as TOY_MODELS
from workbench import plots
from workbench.embed import embed
from workbench.methods import erase
from workbench.project import LandingMap, vocabulary
from workbench.toy import TOY_CONCEPTS
from workbench.toy.world import all_captions

UNET_SPACE = "unet.mid.0.xattn.k"


def markdown(table) -> str:
    """A DataFrame as a Markdown table, floats to 3 decimals."""
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concepts", nargs="+", default=["apple", "car", "van gogh"])
    ap.add_argument("--n", type=int, default=2000, help="embeddings for the UMAP timing")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="folder for landing-map figures (PNG)")
    ap.add_argument("--model", choices=TOY_MODELS, default="toy", help="the toy UNet or the toy DiT")
    args = ap.parse_args()

    pipe = workbench.load(args.model)
    vocab = vocabulary(TOY_CONCEPTS).word.tolist()
    captions = all_captions()
    random.Random(0).shuffle(captions)
    words = (vocab + [c for c in captions if c not in set(vocab)])[:args.n]
    _, t_embed = timed(lambda: embed(pipe, words))
    _, t_cached = timed(lambda: embed(pipe, words))
    first, t_fit1 = timed(lambda: LandingMap.fit(pipe, words, seed=0))
    second, t_fit2 = timed(lambda: LandingMap.fit(pipe, words, seed=0))
    probe = first.embeddings[:20] + np.float32(0.01)
    _, t_tr1 = timed(lambda: first.transform(probe))
    _, t_tr2 = timed(lambda: first.transform(probe))

    rows, figures = [], []
    for concept in args.concepts:
        edit, t_rece = timed(erase, pipe, concept, "rece")
        rows.append(("RECE", concept, UNET_SPACE, edit, t_rece))
        edit, t_fs = timed(erase, pipe, concept, "fewshot", progress=False)
        rows.append(("few-shot", concept, "text", edit, t_fs))
    maps = {}
    tables = []
    for method, concept, space, edit, seconds in rows:
        if space not in maps:
            maps[space] = LandingMap.fit(pipe, space=space, seed=0)
        m = maps[space]
        tables.append((method, concept, space, seconds, m.landing(pipe, edit, concept, k=args.k),
                       m.derived(pipe, edit)))
        if args.out:
            figures.append(plots.save(m.figure(pipe, edit),
                                      args.out / f"{method.split(',')[0].lower()}-{concept.replace(' ', '-')}.png"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB on Linux -> GiB

    print(f"## UMAP on {len(words)} text embeddings (toy model, {len(vocab)} vocabulary words + captions)\n")
    print("| step | seconds |\n|---|---|")
    print(f"| embed {len(words)} prompts (text encoder, mean-pooled) | {t_embed:.2f} |")
    print(f"| embed again (in-memory cache) | {t_cached:.4f} |")
    print(f"| UMAP fit, first in this process (numba compile or its disk cache) | {t_fit1:.2f} |")
    print(f"| UMAP fit, second (compiled) | {t_fit2:.2f} |")
    print(f"| UMAP transform of 20 vectors, first | {t_tr1:.2f} |")
    print(f"| UMAP transform of 20 vectors, second | {t_tr2:.2f} |")
    print(f"\nSame seed, same coordinates: {np.array_equal(first.coords, second.coords)}. "
          f"Peak RSS: {peak:.2f} GB.\n")
    print(f"## Where erased concepts land ({args.k} nearest vocabulary words after the edit)\n")
    print("Distances are cosine distances in the space itself; `distance_before` and `rank_before` are the "
          "unedited concept's.\n")
    for method, concept, space, seconds, table, derived in tables:
        print(f"### {method}: {concept} (space `{space}`, erasure {seconds:.2f} s)\n")
        print(markdown(table.drop(columns=["concept"])))
        if len(derived):
            print("\nRECE's derived embeddings, projected with the edited weights: "
                  + "; ".join(f"epoch {r.epoch} nearest {r.nearest!r} ({r.distance:.3f})"
                              for r in derived.itertuples()))
        print()
    for path in figures:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
