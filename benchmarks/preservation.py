"""Preservation on the toy model, in and out of the preserve list.

    python benchmarks/preservation.py          # 3 concepts x UCE and RECE (about 5 minutes on CPU)

Each concept is erased with ``erase``'s toy defaults except that every other concept of the concept
set, in turn, is left out of the preserve list (``HELD_OUT``: half of the other concepts, related and
unrelated). Preservation (accuracy after over before, same prompts and seeds) is then measured on the
concepts the erasure preserved in the wordings it preserved them in ("in list"), on the same concepts in
probe wordings it never saw ("held-out wording"), and on the left-out concepts ("held-out concept"): one
prompt per concept and set, seed 1234 (few-shot unlearning has no preserve list, so only UCE and RECE).
Intervals: paired bootstrap over concepts.
"""
from __future__ import annotations

import argparse
import time

import pandas as pd

import workbench
from workbench.attacks.table import peak_gb
from workbench.methods import erase
from workbench.metrics import preservation_sets, preservation_summary
from workbench.profile import profile_of

CONCEPTS = ("apple", "car", "van gogh")
METHODS = ("uce", "rece")


def held_out(names: list[str], concept: str) -> list[str]:
    """Every second concept other than ``concept``: a related and an unrelated half."""
    return [c for c in names if c != concept][1::2]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concepts", nargs="+", default=list(CONCEPTS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--out", default="out/preservation_toy.csv")
    args = ap.parse_args(argv)
    pipe = workbench.load("toy")
    profile = profile_of(pipe)
    judge, cs = profile.judge(), profile.concept_set()
    start, parts = time.perf_counter(), []
    for method in args.methods:
        for concept in args.concepts:
            out = held_out(cs.names, concept)
            keep = [p for c in cs.names if c not in (concept, *out) for p in cs.prompts(c)]
            knobs = {"progress": False} if method == "fewshot" else {"preserve": keep}
            edit = erase(pipe, concept, method, **knobs)
            rows = preservation_sets(pipe, judge, edit, concept, out, per_concept=1, seeds=(1234,), concept_set=cs)
            parts.append(rows.assign(method=method, erased=concept))
            print(f"{method} {concept}: {time.perf_counter() - start:.0f} s", flush=True)
    table = pd.concat(parts, ignore_index=True)
    table.to_csv(args.out, index=False)
    s = preservation_summary(table, ("method", "set"))
    print("\n| method | set | preservation [95% interval] | accuracy before -> after | n images |")
    print("|---|---|---|---|---|")
    for r in s.itertuples():
        print(f"| {r.method} | {r.set} | {r.preservation:.0%} [{r.lo * 100:.0f}, {r.hi * 100:.0f}] | "
              f"{r.before:.0%} -> {r.after:.0%} | {r.n} |")
    print(f"\nWall time {(time.perf_counter() - start) / 60:.1f} min; peak memory {peak_gb():.2f} GB.")


if __name__ == "__main__":
    main()
