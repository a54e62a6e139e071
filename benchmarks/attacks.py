"""Attack benchmark on the toy model: does each erased concept come back, per method and attack?

    python benchmarks/attacks.py                       # 3 methods x 8 concepts x 4 attacks x 4 seeds
    python benchmarks/attacks.py --seeds 7000 7001 7002   # the README's table: 30.5 min on 2 quiet cores
    python benchmarks/attacks.py --concepts apple car --methods uce rece --attacks derived
    python benchmarks/attacks.py --from data/results/attacks_toy.csv   # tables and figure from a saved run

Every edit is made by ``erase`` with the toy defaults (seed 0); every attack runs at one budget for all
methods (inversion 100 steps, UnlearnDiffAtk 40 steps, concept vector 6 eta values) with seed 0, and is
judged by the oracle on each concept's held-out probe prompts (3 per object, 4 per style) on the
evaluation seeds 7000-7003. Prints Markdown tables: success rate per method x attack with 95% intervals
(bootstrap over concept x seed), paired differences between methods, seconds and peak memory per attack;
writes the image rows (``--out``) and the figure (``--figure``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

import workbench
from workbench import plots
from workbench.attacks import ATTACKS, EVAL_SEEDS
from workbench.attacks.table import compare_methods, peak_gb, success_table, summary
from workbench.profile import profile_of

CONCEPTS = ("apple", "van gogh", "car", "cat", "seurat", "star", "dog", "boat")
METHODS = ("uce", "rece", "fewshot")
#: One budget per attack, the same for every method.
BUDGETS = {"inversion": 100, "unlearndiff": 40, "concept_vector": 6}


def rate_cell(row) -> str:
    return f"{row['rate']:.0%} [{row['lo'] * 100:.0f}, {row['hi'] * 100:.0f}]"


def rates_table(table: pd.DataFrame) -> str:
    s = summary(table)
    wide = s.assign(cell=s.apply(rate_cell, axis=1)).pivot(index="attack", columns="method", values="cell")
    wide = wide.reindex(index=list(dict.fromkeys(s["attack"])), columns=list(dict.fromkeys(s["method"])))
    n = s.groupby("attack", sort=False)["n"].first()
    lines = ["| attack | " + " | ".join(wide.columns) + " | n per cell |", "|---" * (len(wide.columns) + 2) + "|"]
    lines += [f"| {a} | " + " | ".join(wide.loc[a]) + f" | {n[a]} |" for a in wide.index]
    return "\n".join(lines)


def comparisons(table: pd.DataFrame) -> str:
    """Per attack, each pair of methods, paired by concept x seed."""
    c = compare_methods(table)
    lines = ["| attack | a - b | difference [95% interval] | p (two-sided) | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {r.attack} | {r.a} - {r.b} | {r.difference:+.0%} [{r.lo * 100:+.0f}, {r.hi * 100:+.0f}] | {r.p:.2g} | "
              f"{r.verdict} |" for r in c.itertuples()]
    return "\n".join(lines)


def timing(table: pd.DataFrame) -> str:
    per = table.drop_duplicates(["method", "concept", "attack"])
    lines = ["| attack | seconds per concept (median, max) | peak memory (GB, process) |", "|---|---|---|"]
    for attack, g in per[per["attack"].isin(list(ATTACKS))].groupby("attack", sort=False):
        lines.append(f"| {attack} | {g['attack_seconds'].median():.1f}, {g['attack_seconds'].max():.1f} | "
                     f"{g['peak_gb'].max():.2f} |")
    edits = per.drop_duplicates(["method", "concept"])
    lines.append(f"| (erasure) | {edits['edit_seconds'].median():.1f}, {edits['edit_seconds'].max():.1f} | |")
    return "\n".join(lines)


def report(table: pd.DataFrame, figure: Path | None, wall: float | None) -> None:
    print("### Attack success rate (share of held-out images in which the oracle sees the concept)\n")
    print(rates_table(table) + "\n")
    print("### Differences between methods (paired bootstrap over concept x seed)\n")
    print(comparisons(table) + "\n")
    print("### Time and memory\n")
    print(timing(table) + "\n")
    if wall is not None:
        print(f"Wall time {wall / 60:.1f} min; peak memory {peak_gb():.2f} GB.")
    if figure is not None:
        print(f"Figure: {plots.save(plots.attack_rates(summary(table)), figure)}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concepts", nargs="+", default=list(CONCEPTS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    ap.add_argument("--seeds", nargs="+", type=int, default=list(EVAL_SEEDS))
    ap.add_argument("--out", type=Path, default=Path("out/attacks_toy.csv"))
    ap.add_argument("--figure", type=Path, default=Path("out/attacks_toy.png"))
    ap.add_argument("--from", dest="saved", type=Path, help="report on a saved run instead of running")
    args = ap.parse_args(argv)
    if args.saved is not None:
        report(pd.read_csv(args.saved), args.figure, None)
        return
    pipe = workbench.load("toy")
    judge = profile_of(pipe).judge()
    start = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    parts = []
    for concept in args.concepts:  # the rows are saved after each concept, so a stopped run keeps them
        parts.append(success_table(pipe, judge, [concept], args.methods, args.attacks, BUDGETS, args.seeds,
                                   progress=False))
        pd.concat(parts, ignore_index=True).to_csv(args.out, index=False)
        print(f"{concept}: {time.perf_counter() - start:.0f} s", flush=True)
    table = pd.concat(parts, ignore_index=True)
    print(f"Image rows: {args.out}\n")
    report(table, args.figure, time.perf_counter() - start)


if __name__ == "__main__":
    main()
