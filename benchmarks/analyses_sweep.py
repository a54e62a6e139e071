"""Layer sweeps and the FFN-versus-attention experiment on the toy model, as Markdown tables.

    python benchmarks/analyses_sweep.py                       # all three parts
    python benchmarks/analyses_sweep.py --part layers         # only the timed few-shot layer sweep
    python benchmarks/analyses_sweep.py --threads 1           # on a CPU shared with other jobs

1. The full few-shot layer sweep of the toy text encoder (6 layers x {FFN, attention} = 12 runs), with
   its wall time (baseline and evaluation included) and the process's peak RSS.
2. A UCE layer sweep over the UNet's cross-attention layers, k and v separately.
3. Few-shot unlearning through FFN only, attention only, FFN + last attention and everything, for several
   concepts and seeds (mean +- std over seeds), and the verdict on the paper's two findings.

Figures go to ``out/sweep/`` (PDF). Evaluation per run: 8 images of the concept's probe prompts and
``--per-other`` images of each of 6 other concepts (3 related, 3 unrelated), 20 steps, one seeded batch.
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import pandas as pd
import torch

import workbench
from workbench.toy.quality import MODELS as TOY_MODELS
from workbench import plots
from workbench.profile import profile_of
from workbench.sweep import aggregate, ffn_vs_attention, finding, layer_sweep
from workbench.toy import TOY_FEWSHOT_LR
from workbench.toy.oracle import Oracle

OUT = Path("out/sweep")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def markdown(table: pd.DataFrame, floats: str = "{:.2f}") -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table.itertuples(index=False):
        cells = [floats.format(v) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pm(agg: pd.DataFrame, value: str, fmt: str = "{:.2f}") -> pd.Series:
    return [f"{fmt.format(m)} ± {fmt.format(s)}" if pd.notna(s) else fmt.format(m)
            for m, s in zip(agg[value], agg[f"{value}_std"])]


LAYER_COLS = ["part", "efficacy", "preservation", "preservation_related", "drift", "drift_chance", "dW",
              "seconds", "eval_seconds"]


def layers_part(pipe, oracle, concept: str, per_other: int) -> None:
    t0 = time.perf_counter()
    table = layer_sweep(pipe, concept, "fewshot", judge=oracle, per_other=per_other, progress=False,
                        lr=TOY_FEWSHOT_LR)
    wall = time.perf_counter() - t0
    print(f"## Few-shot layer sweep: {concept!r}, {len(table)} runs, lr {TOY_FEWSHOT_LR:g}, 8 steps\n")
    base = table.attrs["baselines"][concept]
    print(f"Unedited: accuracy on {concept!r} {base['accuracy']:.0%}; baseline measured once in "
          f"{table.attrs['base_seconds']:.1f} s.\n")
    print(markdown(table[LAYER_COLS]))
    print(f"\nTotal wall time (baseline, 12 edits, 12 evaluations): {wall:.0f} s; peak RSS {peak_mb():.0f} MB.\n",
          flush=True)
    plots.save(plots.sweep_heatmap(table, title=f"few-shot, {concept}"), OUT / "fewshot_layers_efficacy.pdf")
    plots.save(plots.sweep_heatmap(table, "preservation", title=f"few-shot, {concept}"),
               OUT / "fewshot_layers_preservation.pdf")


def uce_part(pipe, oracle, concept: str, per_other: int) -> None:
    t0 = time.perf_counter()
    table = layer_sweep(pipe, concept, "uce", judge=oracle, per_other=per_other, progress=False)
    wall = time.perf_counter() - t0
    print(f"## UCE layer sweep: {concept!r}, cross-attention k and v separately, {len(table)} runs\n")
    print(markdown(table[LAYER_COLS], "{:.3g}"))
    print(f"\nTotal wall time: {wall:.0f} s; peak RSS {peak_mb():.0f} MB.\n", flush=True)
    plots.save(plots.sweep_heatmap(table, title=f"UCE, {concept}"), OUT / "uce_layers_efficacy.pdf")


def subsets_part(pipe, oracle, concepts: list[str], seeds: list[int], per_other: int) -> None:
    t0 = time.perf_counter()
    table = ffn_vs_attention(pipe, concepts, seeds=seeds, judge=oracle, per_other=per_other, progress=False,
                             lr=TOY_FEWSHOT_LR)
    wall = time.perf_counter() - t0
    print(f"## FFN versus attention: {', '.join(concepts)}; seeds {', '.join(map(str, seeds))}; "
          f"{len(table)} runs, mean ± std over seeds\n")
    agg = aggregate(table, by=["concept", "subset"],
                    values=["efficacy", "preservation", "drift", "drift_chance", "dW", "seconds"])
    shown = pd.DataFrame({"concept": agg["concept"], "subset": agg["subset"], "efficacy": pm(agg, "efficacy"),
                          "preservation": pm(agg, "preservation"), "drift": pm(agg, "drift"),
                          "drift chance": pm(agg, "drift_chance"), "‖ΔW‖": pm(agg, "dW"),
                          "seconds": pm(agg, "seconds")})
    print(markdown(shown))
    pooled = aggregate(table, by="subset", values=["efficacy", "preservation", "dW", "seconds"])
    print("\nAll concepts pooled:\n")
    print(markdown(pd.DataFrame({"subset": pooled["subset"], "efficacy": pm(pooled, "efficacy"),
                                 "preservation": pm(pooled, "preservation"), "‖ΔW‖": pm(pooled, "dW"),
                                 "seconds": pm(pooled, "seconds"), "runs": pooled["n"]})))
    layer_dw = {s: g["dW_by_layer"].apply(pd.Series).mean() for s, g in table.groupby("subset", sort=False)}
    print("\n‖ΔW‖ per text-encoder layer (mean over runs):\n")
    print(markdown(pd.DataFrame(layer_dw).T.fillna(0.0).rename_axis("subset").reset_index(), "{:.3f}"))
    print(f"\nWall time {wall:.0f} s; peak RSS {peak_mb():.0f} MB.\n")
    print("### Finding\n")
    print(finding(table, profile_of(pipe).concept_set()), flush=True)
    plots.save(plots.subset_bars(table), OUT / "ffn_vs_attention.pdf")
    plots.save(plots.dw_per_layer(table), OUT / "ffn_vs_attention_dw.pdf")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["all", "layers", "uce", "subsets"], default="all")
    p.add_argument("--concept", default="apple", help="concept of the two layer sweeps")
    p.add_argument("--concepts", default="apple,car,cat", help="comma-separated, for FFN versus attention")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--per-other", type=int, default=4, help="images per other concept in each evaluation")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--model", choices=TOY_MODELS, default="toy", help="the toy UNet or the toy DiT")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}\n")
    pipe, oracle = workbench.load(args.model), Oracle.load()
    if args.part in ("all", "layers"):
        layers_part(pipe, oracle, args.concept, args.per_other)
    if args.part in ("all", "uce"):
        uce_part(pipe, oracle, args.concept, args.per_other)
    if args.part in ("all", "subsets"):
        subsets_part(pipe, oracle, args.concepts.split(","), [int(s) for s in args.seeds.split(",")],
                     args.per_other)


if __name__ == "__main__":
    main()
