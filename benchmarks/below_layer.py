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
- ``heads``: head attribution (ablate one head at a time) per concept over every cross-attention head, and
  the overlap of concepts' top heads.
- ``sae``: the ``sae`` method per concept.
"""
from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workbench  # noqa: E402
from unet_vs_dit import MEASURE, Rows, _measurer  # noqa: E402
from workbench.anatomy import denoiser_prefix  # noqa: E402
from workbench.neurons import SHARE, TIMESTEPS, overlap, scores  # noqa: E402
from workbench.profile import profile_of  # noqa: E402
from workbench.stats import interval_text, mean_interval  # noqa: E402
from workbench.sweep import Planned, run_one  # noqa: E402
from workbench.toy.quality import MODELS  # noqa: E402

PARTS = ("neurons", "curve", "heads", "sae")
CURVE_CONCEPTS = ("apple", "car", "cat", "star", "van gogh", "seurat")
SHARES = (0.001, 0.01, 0.03, 0.1, 0.3, 1.0)
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
    out = []
    for a, b in itertools.combinations(cs.names, 2):
        for component in ("text", "denoiser"):
            pick = (lambda n: n.startswith("text")) if component == "text" else (lambda n: not n.startswith("text"))
            sa = {n: v for n, v in skilled[a].items() if pick(n)}
            sb = {n: v for n, v in skilled[b].items() if pick(n)}
            out.append(dict(model=model, a=a, b=b, component=component, related=cs.group(a) == cs.group(b),
                            kinds=f"{cs.kind(a)}/{cs.kind(b)}", jaccard=overlap(sa, sb)))
    pairs.add(out)


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
    for concept in profile_of(pipe).concept_set().names:
        if rows.done(model=model, concept=concept):
            continue
        t0 = time.perf_counter()
        result = attribute(pipe, concept, layers=f"{denoiser_prefix(pipe)}.*")
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
    ("SAE on one block", "import tempfile; from workbench.sae import train; "
     "train(pipe, None, path=tempfile.mkdtemp() + '/sae.safetensors')", 180),
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
    print(pd.DataFrame(rows).to_string(index=False))


def _mean(values) -> str:
    return interval_text(*mean_interval(list(values)))


def report() -> None:
    for model in MODELS:
        counts = _rows("neurons", model).table
        if not counts.empty:
            counts = counts.assign(side=counts["part"].str.startswith("text").map({True: "text", False: "denoiser"}))
            per = counts.groupby(["side", "concept"])["skilled"].mean().reset_index()
            print(f"\n{model}: skilled neurons per layer (share {SHARE:.0%}, first {TIMESTEPS} steps), "
                  "mean over concepts [95% interval]")
            for side, group in per.groupby("side"):
                print(f"  {side}: {_mean(group['skilled'])} per layer, n = {len(group)} concepts")
        pairs = _rows("overlap", model).table
        if not pairs.empty:
            print(f"{model}: overlap (Jaccard) of skilled neurons, pairs of objects")
            objects = pairs[pairs["kinds"] == "object/object"]
            for (component, related), group in objects.groupby(["component", "related"]):
                print(f"  {component} {'related' if related else 'unrelated'}: {_mean(group['jaccard'].dropna())}, "
                      f"n = {len(group)} pairs")
        curve_rows = _rows("curve", model).table
        if not curve_rows.empty:
            print(f"{model}: prune, efficacy and preservation against the share of neurons (mean over concepts)")
            for (where, share), group in curve_rows.groupby(["where", "share"]):
                print(f"  {where:8s} {share:6.1%}: efficacy {_mean(group['efficacy'])}, preservation "
                      f"{_mean(group['preservation'])}, n = {len(group)} concepts x {MEASURE['per_prompt']} images")


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
