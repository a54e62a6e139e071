"""Localisation benchmark: ESD, causal tracing and cross-attention maps on the toy model (and the SD
1.4-shaped pipeline): wall time and peak memory per row, ESD's efficacy and preservation per preset,
and ESD through UNet FFNs, self-attention and cross-attention.

    python benchmarks/localisation.py                  # the timing table (each row in a fresh process)
    python benchmarks/localisation.py --quality        # ESD presets on 8 concepts, rates with 95% intervals
    python benchmarks/localisation.py --quality --presets esd-x --timestep reached   # t where sampling stopped
    python benchmarks/localisation.py --subsets        # ESD through UNet FFN / self- / cross-attention, 3 seeds
    python benchmarks/localisation.py --figures docs/gallery   # the README gallery's localisation figures
    python benchmarks/localisation.py --sd14           # the same timing rows on the SD 1.4-shaped pipeline
    python benchmarks/localisation.py --rows esd-x,trace   # some of the timing rows
    python benchmarks/localisation.py --threads 1      # torch threads (the machine's cores by default)

Peak memory is the row's process's maximum resident set size (the model loaded included). Rates are
shares of images in which the oracle still sees the erased concept, on held-out prompt wordings
(``ConceptSet.held_out``) and evaluation seeds no erasure draws from, with 95% intervals by bootstrap
over the erased concepts (:func:`workbench.stats.cluster_rate`).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import workbench
from workbench.toy.quality import MODELS as TOY_MODELS
from workbench.attnmaps import attention_maps
from workbench.methods import erase
from workbench.methods.esd import PRESETS, TIMESTEPS
from workbench.profile import profile_of
from workbench.sampling import generate
from workbench.stats import cluster_rate
from workbench.toy.profile import TOY_ESD_LR
from workbench.tracing import trace

CONCEPTS = ("apple", "car", "cat", "star", "dog", "boat", "van gogh", "seurat")
#: Evaluation seed of the quality table: no erasure in the workbench draws from it.
EVAL_SEED = 7000
TARGETS = {"esd": 60.0, "trace": 60.0, "attention": 5.0}


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def load(sd14: bool, model: str = "toy"):
    if not sd14:
        return workbench.load(model)
    from workbench.sd14 import sd14_pipeline
    return sd14_pipeline()


def sd_judge(pipe):
    """The SD rows' judge: a tiny random CLIP (timing only; nothing here judges a random-weight model)."""
    import tempfile

    from workbench.concepts import ConceptSet
    from workbench.judges import ClipJudge, tiny_clip
    return ClipJudge.load(tiny_clip(Path(tempfile.mkdtemp()) / "clip")), ConceptSet.of(objects=["apple", "car", "cat"])


def row(name: str, sd14: bool, model: str = "toy") -> dict:
    """Run one timing row in this process; returns seconds and peak memory (the model's load excluded
    from the seconds, included in the memory)."""
    pipe = load(sd14, model)
    judge, cs = sd_judge(pipe) if sd14 else (profile_of(pipe).judge(), None)
    sd = dict(iterations=2, sample_steps=2) if sd14 else {}
    t0 = time.perf_counter()
    if name.startswith("esd"):
        sd = sd or dict(lr=TOY_ESD_LR[name])
        edit = erase(pipe, "apple", "esd", preset=name, progress=False, **sd)
        info = f"{len(edit.parts)} parts, {edit.params['iterations']} iterations"
    elif name.startswith("trace"):
        tokens = name == "trace+tokens"
        opts = dict(n=1, steps=2, size=256) if sd14 else {}
        t = trace(pipe, "apple", "a photo of an apple" if sd14 else None, judge, concept_set=cs, tokens=tokens, **opts)
        info = f"{len(t.table)} restored runs of {t.n} images"
    else:
        maps = attention_maps(pipe, "an icon of an apple", "apple", steps=4 if sd14 else 20)
        info = f"{len(maps.layers)} layers"
    return {"row": name, "seconds": time.perf_counter() - t0, "peak_gb": peak_gb(), "what": info}


ROWS = (*PRESETS, "trace", "trace+tokens", "attention")


def timing(sd14: bool, threads: int | None, names: list[str], model: str = "toy") -> None:
    print(f"| row ({'SD 1.4-shaped' if sd14 else model}) | what | seconds | peak memory | target |")
    print("|---|---|---|---|---|")
    for name in names:
        cmd = [sys.executable, __file__, "--row", name, "--model", model] + (["--sd14"] if sd14 else []) + (
            ["--threads", str(threads)] if threads else [])
        out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        limit = TARGETS["esd" if name.startswith("esd") else name.split("+")[0]]
        verdict = "" if sd14 or name == "trace+tokens" else f"<= {limit:.0f} s: {'yes' if out['seconds'] <= limit else 'no'}"
        print(f"| {name} | {out['what']} | {out['seconds']:.1f} | {out['peak_gb']:.2f} GB | {verdict} |", flush=True)


def _seen(pipe, judge, cs, concept: str, n: int) -> tuple[int, int]:
    """How many of ``n`` images of the concept's held-out prompts the judge calls the concept."""
    prompts = cs.held_out(concept, n)
    prompts = [prompts[i % len(prompts)] for i in range(n)]
    labels = judge.choose(generate(pipe, prompts, EVAL_SEED), cs.labels(cs.kind(concept)))
    return sum(label == concept for label in labels), n


def _others(pipe, judge, cs, concept: str, n: int) -> dict[str, int]:
    return {o: _seen(pipe, judge, cs, o, n)[0] for o in cs.names if o != concept}


def quality(per_concept: int, per_other: int, presets: list[str], timestep: str = TIMESTEPS[0], model: str = "toy") -> None:
    """ESD's four presets with the toy defaults and each preset's toy learning rate (TOY_ESD_LR), each
    concept erased with its own training seed; ``timestep`` as in :func:`workbench.methods.esd.esd`."""
    pipe = workbench.load(model)
    profile = profile_of(pipe)
    judge, cs = profile.judge(), profile.concept_set()
    base = {c: _seen(pipe, judge, cs, c, per_other)[0] for c in cs.names}
    base_concept = {c: _seen(pipe, judge, cs, c, per_concept)[0] for c in CONCEPTS}
    print("| preset | concept | seed | seconds | concept seen (before -> after) | others seen after / before |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for preset in presets:
        seen, kept, before_kept, seconds = [], [], [], []
        for seed, concept in enumerate(CONCEPTS):
            edit = erase(pipe, concept, "esd", preset=preset, lr=TOY_ESD_LR[preset], seed=seed, timestep=timestep,
                         progress=False)
            with edit.apply(pipe):
                k, n = _seen(pipe, judge, cs, concept, per_concept)
                others = _others(pipe, judge, cs, concept, per_other)
            before = sum(base[o] for o in others)
            seen.append(k), kept.append(sum(others.values())), before_kept.append(before), seconds.append(edit.seconds)
            print(f"| {preset} | {concept} | {seed} | {edit.seconds:.1f} | {base_concept[concept]}/{n} -> {k}/{n} | "
                  f"{sum(others.values())}/{before} |", flush=True)
        summary[preset] = (seen, kept, before_kept, seconds)
    print("\n| preset | parts | lr | seconds (median) | concept still seen, held-out prompts | others seen after | before |")
    print("|---|---|---|---|---|---|---|")
    for preset, (seen, kept, before_kept, seconds) in summary.items():
        others_n = per_other * (len(cs.names) - 1)
        print(f"| {preset} | {PRESETS[preset]} | {TOY_ESD_LR[preset]:.0e} | {sorted(seconds)[len(seconds) // 2]:.1f} | "
              f"{cluster_rate(seen, [per_concept] * len(seen))} | {cluster_rate(kept, [others_n] * len(kept))} | "
              f"{cluster_rate(before_kept, [others_n] * len(kept))} |")


def subsets(concepts: list[str], seeds: list[int], model: str = "toy") -> None:
    from workbench.sweep import subset_rates, unet_finding, unet_subsets
    pipe = workbench.load(model)
    table = unet_subsets(pipe, concepts, seeds=seeds, progress=False)
    table.drop(columns=["dW_by_layer", "parts_edited"]).to_csv(sys.stdout, index=False)
    rates = subset_rates(table)
    print("\n| subset | efficacy [95%] | k / n images | units | preservation (mean) |")
    print("|---|---|---|---|---|")
    for r in rates.itertuples():
        print(f"| {r.subset} | {r.efficacy:.0%} [{r.efficacy_lo:.0%}, {r.efficacy_hi:.0%}] | {r.k} / {r.n} | {r.units} | "
              f"{r.preservation:.2f} |")
    print("\n" + unet_finding(table))


def figures(folder: Path, model: str = "toy") -> None:
    """Tracing and attention maps of "apple" before and after RECE and few-shot unlearning."""
    from workbench.attnmaps import attention_maps as maps_of
    from workbench.plots import attention_grid, save, trace_sites, trace_tokens
    pipe = workbench.load(model)
    judge = profile_of(pipe).judge()
    edits = {"RECE": erase(pipe, "apple", "rece"), "few-shot": erase(pipe, "apple", "fewshot", progress=False)}
    prompt = "an icon of an apple"
    traces, maps = {"before": trace(pipe, "apple", prompt, judge, tokens=True)}, {"before": maps_of(pipe, prompt, "apple")}
    for name, edit in edits.items():
        with edit.apply(pipe):
            traces[f"after {name}"] = trace(pipe, "apple", prompt, judge)
            maps[f"after {name}"] = maps_of(pipe, prompt, "apple")
    save(trace_sites(list(traces.values()), list(traces)), folder / "08_causal_trace.png")
    save(trace_tokens(traces["before"]), folder / "08_causal_trace_tokens.png")
    save(attention_grid(list(maps.values()), list(maps)), folder / "08_attention_maps.png")
    print(f"wrote {folder}/08_causal_trace.png, 08_causal_trace_tokens.png, 08_attention_maps.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--sd14", action="store_true")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--rows", default=",".join(ROWS), help="timing rows to run, comma-separated")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--per-concept", type=int, default=8)
    ap.add_argument("--per-other", type=int, default=2)
    ap.add_argument("--presets", default=",".join(PRESETS), help="the quality table's presets, comma-separated")
    ap.add_argument("--timestep", default=TIMESTEPS[0], choices=TIMESTEPS, help="the quality table's ESD timestep choice")
    ap.add_argument("--subsets", action="store_true")
    ap.add_argument("--concepts", default="apple,car,cat")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--figures", type=Path)
    ap.add_argument("--model", choices=TOY_MODELS, default="toy", help="the toy UNet or the toy DiT")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.row:
        print(json.dumps(row(args.row, args.sd14, args.model)))
    elif args.quality:
        quality(args.per_concept, args.per_other, args.presets.split(","), args.timestep, args.model)
    elif args.subsets:
        subsets(args.concepts.split(","), [int(s) for s in args.seeds.split(",")], args.model)
    elif args.figures:
        figures(args.figures, args.model)
    else:
        timing(args.sd14, args.threads, args.rows.split(","), args.model)


if __name__ == "__main__":
    main()
