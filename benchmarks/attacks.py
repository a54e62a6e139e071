"""Attack benchmark on the toy model: does each erased concept come back, per method, attack and budget?

    python benchmarks/attacks.py                        # the README's table: 20 concepts x 4 methods, 2 workers
    python benchmarks/attacks.py --grid data/grids/attack_budgets_toy.yaml     # the budget curves
    python benchmarks/attacks.py --concepts apple car --workers 0   # a subset, in this process
    python benchmarks/attacks.py --from data/results/attacks_toy.csv    # tables and figures from saved rows

The table is an experiment grid (``data/grids/attacks_toy.yaml``, :mod:`workbench.grid`): one run per
concept and method erases with the toy defaults (seed 0) and attacks the edit with every attack at one
budget for all methods (inversion 100 steps, UnlearnDiffAtk 40, concept vector 6 eta values; seed 0),
judged by the oracle on the concept's held-out probe prompts (3 per object, 4 per style) and the
evaluation seeds 7000-7002. Runs are stored as they finish (``--store``; a stopped run resumes) and
spread over a Dask ``LocalCluster`` of ``--workers`` one-thread processes. Writes the image rows
(``--out``) and figures beside them; prints Markdown tables: success rates with 95% intervals over all
concepts, objects and styles; paired differences between methods; per-concept differences and the
estimate pooled over concepts (bootstrap over concepts); budget curves; time and memory.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from workbench import plots
from workbench.attacks import table as tables
from workbench.attacks.table import compare_methods, grid_images, peak_gb, summary
from workbench.grid import Grid, run_grid
from workbench import stats
from workbench.toy.quality import MODELS as TOY_MODELS
from workbench.paths import GRIDS
from workbench.store import load_results
from workbench.toy import TOY_CONCEPTS


def markdown(frame: pd.DataFrame, index: str) -> str:
    """``frame`` (its index named ``index``) as a Markdown table."""
    lines = [f"| {index} | " + " | ".join(frame.columns) + " |", "|---" * (len(frame.columns) + 1) + "|"]
    lines += [f"| {i} | " + " | ".join(map(str, row)) + " |" for i, row in zip(frame.index, frame.values)]
    return "\n".join(lines)


def rates_table(table: pd.DataFrame, by: str = "attack") -> str:
    return markdown(tables.rates_wide(table, by).rename(columns={"n": "n per cell"}), by)


def comparisons(table: pd.DataFrame) -> str:
    """Per attack, each pair of methods, paired by concept x seed."""
    c = compare_methods(table)
    lines = ["| attack | a - b | difference [95% interval] | p (two-sided) | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {r.attack} | {r.a} - {r.b} | {r.difference:+.0%} [{r.lo * 100:+.0f}, {r.hi * 100:+.0f}] | {r.p:.2g} | "
              f"{r.verdict} |" for r in c.itertuples()]
    return "\n".join(lines)


def heterogeneity(table: pd.DataFrame) -> str:
    """Per pair of methods and attack: the difference pooled over concepts (bootstrap over concepts), how
    many concepts go each way, and the verdict."""
    methods = list(dict.fromkeys(table["method"]))
    lines = ["| attack | a - b | pooled over concepts | p | concepts a higher / b higher / neither | verdict |",
             "|---|---|---|---|---|---|"]
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            for r in tables.across_concepts(table, a, b).itertuples():
                budget = "" if pd.isna(r.budget) else f" {r.budget}"
                lines.append(f"| {r.attack}{budget} | {a} - {b} | {stats.interval_text(r.difference, r.lo, r.hi, True)} | "
                             f"{r.p:.2g} | {r.a_higher} / {r.b_higher} / {r.neither} | {r.verdict} |")
    return "\n".join(lines)


def timing(table: pd.DataFrame) -> str:
    per = table[~table["attack"].isin(["unedited", "none"])].drop_duplicates(["method", "concept", "attack", "budget"])
    lines = ["| attack | budget | seconds per concept (median, max) | peak memory (GB, process) |", "|---|---|---|---|"]
    for (attack, budget), g in per.groupby(["attack", "budget"], sort=False, dropna=False):
        lines.append(f"| {attack} | {'' if pd.isna(budget) else budget} | {g['attack_seconds'].median():.1f}, "
                     f"{g['attack_seconds'].max():.1f} | {g['peak_gb'].max():.2f} |")
    for method, g in table.drop_duplicates(["method", "concept"]).groupby("method", sort=False):
        lines.append(f"| (erasure: {method}) | | {g['edit_seconds'].median():.1f}, {g['edit_seconds'].max():.1f} | |")
    return "\n".join(lines)


def report(table: pd.DataFrame, out: Path, wall: dict[str, float] | None = None) -> None:
    budgets = table.groupby("attack", sort=False)["budget"].nunique()
    curved = [a for a in budgets.index if budgets[a] > 1]
    concepts = table["concept"].nunique()
    if curved:
        print(f"### Success rate against budget over {concepts} concepts (bootstrap over concept x seed)\n")
        for attack in curved:
            rows = table[table["attack"] == attack]
            print(f"#### {attack}\n")
            print(rates_table(rows, "budget") + "\n")
        print("UCE - RECE per budget over concepts (bootstrap over concepts):\n")
        print(heterogeneity(table[table["attack"].isin(curved)]) + "\n")
        figure = plots.budget_curves(summary(table, ("method", "attack", "budget")))
        print(f"Figure: {plots.save(figure, out.with_suffix('.png'))}")
    else:
        print(f"### Attack success rate over {concepts} concepts (share of held-out images in which the oracle "
              "sees the concept)\n")
        print(rates_table(table) + "\n")
        for kind, rows in table.groupby(table["concept"].map(TOY_CONCEPTS.kind), sort=False):
            print(f"#### {kind}s ({rows['concept'].nunique()})\n")
            print(rates_table(rows) + "\n")
        print("### Differences between methods (paired bootstrap over concept x seed)\n")
        print(comparisons(table) + "\n")
        print("### Each pair of methods over concepts (bootstrap over concepts; per-concept Newcombe intervals)\n")
        print(heterogeneity(table) + "\n")
        print(f"Figure: {plots.save(plots.attack_rates(summary(table)), out.with_suffix('.png'))}")
        forest = pd.concat([tables.concept_differences(table, "uce", "rece", a).assign(attack=a)
                            for a in ("inversion", "unlearndiff", "concept_vector")], ignore_index=True)
        print(f"Figure: {plots.save(plots.forest(forest, 'UCE - RECE'), out.with_name(out.stem + '_forest.png'))}")
    print("\n### Time and memory\n")
    print(timing(table) + "\n")
    if wall:
        print("; ".join(f"{k} {v / 60:.1f} min" for k, v in wall.items()) + f"; peak memory here {peak_gb():.2f} GB.")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", type=Path, default=GRIDS / "attacks_toy.yaml")
    ap.add_argument("--concepts", nargs="+", help="a subset of the grid's concepts")
    ap.add_argument("--methods", nargs="+", help="a subset of the grid's methods")
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (0: this process)")
    ap.add_argument("--store", type=Path, help="the grid's results folder (default results/<grid name>)")
    ap.add_argument("--out", type=Path, help="the image rows as CSV (default out/<grid name>.csv)")
    ap.add_argument("--from", dest="saved", type=Path, help="report on saved rows (a CSV or a results folder)")
    ap.add_argument("--model", choices=TOY_MODELS, help="run the grid on this toy model instead of the grid's")
    args = ap.parse_args(argv)
    out = args.out or Path("out") / f"{args.grid.stem}.csv"
    if args.saved is not None:
        table = pd.read_csv(args.saved) if args.saved.suffix == ".csv" else grid_images(load_results(args.saved))
        table["budget"] = table["budget"].astype("Int64") if "budget" in table else pd.NA
        report(table, out)
        return
    spec = Grid.load(args.grid).to_dict()
    spec |= {k: v for k, v in (("concepts", args.concepts), ("methods", args.methods), ("model", args.model)) if v}
    start = time.perf_counter()
    runs = run_grid(spec, args.store or Path("results") / args.grid.stem,
                    cluster=f"local:{args.workers}" if args.workers else None)
    wall = {"wall time with the cluster's start": time.perf_counter() - start}
    table = grid_images(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.drop(columns=["key"]).to_csv(out, index=False)
    print(f"{len(runs)} runs ({runs.attrs['ran']} run now, {runs.attrs['failed']} failed); image rows: {out}\n")
    report(table, out, wall)


if __name__ == "__main__":
    main()
