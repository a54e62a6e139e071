"""Below the layer on the toy models: neurons, heads and sparse features, measured.

    python benchmarks/below_layer.py --part neurons curve        # both toys
    python benchmarks/below_layer.py --model toy --part heads
    python benchmarks/below_layer.py --timing                    # the targets: wall time and peak memory
    python benchmarks/below_layer.py --report                    # the tables from the saved rows

Each part writes its rows to ``data/results/below_<part>_<model>.csv`` as each run finishes and resumes
where it stopped. Erasures are judged by the oracle on each concept's held-out probe prompts and
evaluation seed 1234; neuron scores, head attributions and SAE features come from the erase prompts on
other seeds.

- ``neurons``: every concept's skilled neurons (ConceptPrune: top 1% per step by WANDA among those the
  concept drives harder than the other concepts' prompts, the first 4 of 20 steps united) per layer, text
  encoder and denoiser; and each pair of concepts' overlap (Jaccard) of them, related (one group) or not.
- ``curve``: ``prune`` at shares from 0.1% to 100%, through the denoiser's FFNs and the text encoder's.
- ``heads``: head attribution per concept (the corrupted run with one head's clean output restored, every
  text-encoder and cross-attention head), and the overlap of concepts' top heads.
- ``sae``: the ``sae`` method per concept.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workbench  # noqa: E402
from unet_vs_dit import MEASURE, Rows, _measurer  # noqa: E402
from workbench.anatomy import denoiser_prefix  # noqa: E402
from workbench import sharing  # noqa: E402
from workbench.neurons import SHARE, TIMESTEPS, per_side, scores  # noqa: E402
from workbench.profile import profile_of  # noqa: E402
from workbench.stats import interval_text  # noqa: E402
from workbench.sweep import Planned, run_one, subset_rates  # noqa: E402
from workbench.toy.quality import MODELS  # noqa: E402

PARTS = ("neurons", "curve", "heads", "sae")
CURVE_CONCEPTS = ("apple", "car", "cat", "star", "van gogh", "seurat")
SHARES = (0.001, 0.01, 0.03, 0.1, 0.3, 1.0)
#: Head attribution (restoring one head at a time, every text-encoder and cross-attention head): four
#: fruits, two vehicles, two sky objects: 8 related and 20 unrelated pairs.
HEAD_CONCEPTS = ("apple", "cherry", "pear", "banana", "car", "truck", "sun", "moon")
#: Where ``prune`` cuts in the curve: the denoiser's FFNs (its default) or the text encoders'.
WHERE = {"denoiser": (), "text": ("text*",)}


def _rows(part: str, model: str) -> Rows:
    return Rows(part, model, prefix="below")


def neurons(pipe, model: str) -> None:
    cs = profile_of(pipe).concept_set()
    rows, pairs = _rows("neurons", model), _rows("overlap", model)
    skilled = {}
    for concept in cs.names:
        s = scores(pipe, concept, parts="*")
        skilled[concept] = s.skilled(SHARE, TIMESTEPS)
        if not rows.done(model=model, concept=concept):
            rows.add(s.counts(SHARE, TIMESTEPS).assign(model=model, concept=concept).to_dict("records"))
            print(f"{model} neurons {concept}: {int(s.counts(SHARE, TIMESTEPS)['skilled'].sum())} skilled", flush=True)
    if pairs.done(model=model):
        return
    for component in ("text", "denoiser"):
        mine = {c: {(n, int(i)) for n, idx in chosen.items() if n.startswith("text") == (component == "text")
                    for i in idx} for c, chosen in skilled.items()}
        pairs.add(sharing.pairs(mine, cs).assign(model=model, component=component).to_dict("records"))


def curve(pipe, model: str) -> None:
    rows, measure = _rows("curve", model), _measurer(pipe)
    for concept, (where, selectors), share in itertools.product(CURVE_CONCEPTS, WHERE.items(), SHARES):
        if rows.done(model=model, concept=concept, where=where, share=share):
            continue
        t0 = time.perf_counter()
        knobs = dict(share=share, timesteps=TIMESTEPS)
        row = run_one(pipe, Planned(concept, where, selectors, None, "all", where, False, 0), "prune", measure, knobs)
        rows.add([row | {"model": model, "where": where, "share": share, "wall_seconds": time.perf_counter() - t0}])
        print(f"{model} prune {where} {share:.1%} {concept}: efficacy {row['efficacy']:.2f}, "
              f"preservation {row['preservation']:.2f}", flush=True)


def heads(pipe, model: str) -> None:
    from workbench.heads import attribute
    rows = _rows("heads", model)
    for concept in HEAD_CONCEPTS:
        if rows.done(model=model, concept=concept):
            continue
        t0 = time.perf_counter()
        result = attribute(pipe, concept, mode="restore")
        rows.add(result.table.assign(model=model, concept=concept, baseline=result.baseline, n=result.n,
                                     wall_seconds=time.perf_counter() - t0).to_dict("records"))
        print(f"{model} heads {concept}: {time.perf_counter() - t0:.0f} s", flush=True)


def sae(pipe, model: str) -> None:
    rows, measure = _rows("sae", model), _measurer(pipe)
    for concept in CURVE_CONCEPTS:
        if rows.done(model=model, concept=concept):
            continue
        t0 = time.perf_counter()
        row = run_one(pipe, Planned(concept, "sae", (), None, "all", "sae", False, 0), "sae", measure, {})
        rows.add([row | {"model": model, "wall_seconds": time.perf_counter() - t0}])
        print(f"{model} sae {concept}: efficacy {row['efficacy']:.2f}, preservation {row['preservation']:.2f}",
              flush=True)


RUN = {"neurons": neurons, "curve": curve, "heads": heads, "sae": sae}

#: The issue's targets, each run in a fresh process: ``(name, code, target seconds)``.
TIMINGS = (
    ("neuron scores, every FFN (text + denoiser), one concept", "from workbench.neurons import scores; "
     "scores(pipe, 'apple', parts='*')", 30),
    ("head attribution, every cross-attention head", "from workbench.heads import attribute; "
     "attribute(pipe, 'apple', layers=workbench.anatomy.denoiser_prefix(pipe) + '.*')", 60),
    ("SAE on one block (trained from scratch)", "import tempfile; from workbench.sae import default_block, train; "
     "train(pipe, default_block(pipe), path=tempfile.mkdtemp() + '/sae.safetensors', progress=False)", 180),
)


def timing(models: list[str]) -> None:
    rows = []
    for model, (name, code, target) in itertools.product(models, TIMINGS):
        script = (f"import json, resource, time, workbench; pipe = workbench.load({model!r}); t0 = time.perf_counter(); "
                  f"{code}; print(json.dumps([time.perf_counter() - t0, "
                  "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20]))")
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        if done.returncode:
            rows.append(dict(model=model, what=name, seconds=float("nan"), peak_gb=float("nan"), target_s=target))
            print(done.stderr[-800:], file=sys.stderr)
            continue
        seconds, peak = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(dict(model=model, what=name, seconds=round(seconds, 1), peak_gb=round(peak, 2), target_s=target))
        print(f"{model}: {name}: {seconds:.1f} s, peak {peak:.2f} GB (target {target} s)", flush=True)
    print(pd.DataFrame(rows).to_string(index=False))


def report() -> None:
    cs = workbench.toy.TOY_CONCEPTS
    for model in MODELS:
        counts = _rows("neurons", model).table
        if not counts.empty:
            print(f"\n{model}: skilled neurons per layer (share {SHARE:.0%} per step, first {TIMESTEPS} steps united), "
                  "mean over concepts [95% interval]")
            for r in per_side(counts).itertuples():
                print(f"  {r.side}: {r.skilled:.1f} [{r.lo:.1f}, {r.hi:.1f}] of {r.neurons} per layer ({r.share:.1%}), "
                      f"n = {r.concepts} concepts")
        pairs = _rows("overlap", model).table
        if not pairs.empty:
            objects = pairs[pairs["kinds"] == "object/object"]
            for component, group in objects.groupby("component"):
                print(f"  {component}: " + sharing.in_words(sharing.related_vs_unrelated(group), "skilled neurons"))
        heads = _rows("heads", model).table
        if not heads.empty:
            objects = [c for c in heads["concept"].unique() if cs.kind(c) == "object"]
            top = sharing.top_units(heads[heads["concept"].isin(objects)], 10)
            best = heads.loc[heads.groupby("concept")["effect"].idxmax()]
            print(f"{model}: heads (restoring one at a time, {heads['n'].iloc[0]} image per run, {len(top)} objects): "
                  "each concept's strongest head " + ", ".join(f"{r.concept} {r.layer}/h{r.head} {r.effect:+.2f}"
                                                               for r in best.itertuples()))
            print("  " + sharing.in_words(sharing.related_vs_unrelated(sharing.pairs(top, cs)), "top-10 heads"))
        curve_rows = _rows("curve", model).table
        if not curve_rows.empty:
            print(f"{model}: prune against the share of neurons per step (first {TIMESTEPS} steps united)")
            rates = subset_rates(curve_rows, ["where", "share"])
            for r in rates.itertuples():
                print(f"  {r.where:8s} {r.share:6.1%}: efficacy {interval_text(r.efficacy, r.efficacy_lo, r.efficacy_hi)}"
                      f" (n = {r.n} images, {r.units} concepts), preservation {r.preservation:.0%}")
        sae_rows = _rows("sae", model).table
        if not sae_rows.empty:
            r = subset_rates(sae_rows.assign(subset="sae"), "subset").iloc[0]
            print(f"{model}: sae, efficacy {interval_text(r.efficacy, r.efficacy_lo, r.efficacy_hi)} (n = {r.n} images, "
                  f"{r.units} concepts), preservation {r.preservation:.0%}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=MODELS, nargs="+", default=list(MODELS))
    ap.add_argument("--part", choices=PARTS, nargs="+", default=list(PARTS))
    ap.add_argument("--report", action="store_true", help="only print the tables from the saved rows")
    ap.add_argument("--timing", action="store_true", help="time the targets in fresh processes")
    args = ap.parse_args(argv)
    if args.timing:
        timing(args.model)
        return
    if not args.report:
        for model in args.model:
            pipe = workbench.load(model)
            for part in args.part:
                RUN[part](pipe, model)
    report()


if __name__ == "__main__":
    main()
