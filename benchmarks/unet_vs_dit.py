"""The toy UNet and the toy DiT side by side: which methods erase, where concepts live, layer by layer.

    python benchmarks/unet_vs_dit.py                         # every part, both models (about an hour of CPU)
    python benchmarks/unet_vs_dit.py --model toy-dit --part methods
    python benchmarks/unet_vs_dit.py --report                # the tables from the saved rows

Each part writes its rows to ``data/results/unet_vs_dit_<part>_<model>.csv`` (read them with
``workbench.store.saved("unet_vs_dit_<part>_toy-dit")``) as each run finishes; a stopped run resumes
where it stopped, and the two models can run in two processes at once. Every measurement is the oracle's on the concept's held-out probe prompts
and evaluation seed 1234 (no erasure trains on either), with the preservation set of the toy world.

- ``methods``: every method at the model's defaults, and on the DiT UCE and RECE also through every double
  block's text-stream keys and values (``dit.*.text.[kv]``) instead of ``dit.context.proj`` + the pooled
  projection; ESD with the presets ``esd-x`` and ``esd-u`` at each model's rate for them.
- ``subsets``: ESD through one kind of part at a time, at one rate (1e-4) on both models: the UNet's FFNs, self-attention and
  cross-attention; the DiT's image- and text-stream attention and FFNs and its single blocks.
- ``sweep``: UCE one layer's keys or values at a time (UNet cross-attention, DiT text stream).
- ``tracing``: causal tracing over every text-encoder layer and denoiser block (each stream of a DiT block).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

import workbench
from workbench.paths import RESULTS
from workbench.profile import profile_of
from workbench.sweep import Measurer, Planned, layer_sweep, run_one, subset_rates
from workbench.toy.profile import TOY_DIT_ESD_LR, TOY_ESD_LR
from workbench.toy.quality import MODELS
from workbench.tracing import sites, trace

PARTS = ("tracing", "sweep", "methods", "subsets")
CONCEPTS = ("apple", "car", "cat", "star", "van gogh", "seurat")
SUBSET_CONCEPTS = ("apple", "car", "van gogh")
SWEEP_CONCEPTS = ("apple", "van gogh")
TRACE_CONCEPTS = ("apple", "car", "cat", "van gogh")
MEASURE = dict(per_prompt=4, per_other=2, eval_seed=1234)
ESD_LR = {"toy": TOY_ESD_LR, "toy-dit": TOY_DIT_ESD_LR}
#: ESD's rate through one kind of part, the same on both models: the UNet's for its cross-attention
#: (esd-x) and the DiT's for all its parts but the text stream's attention (esd-u).
SUBSET_LR = TOY_ESD_LR["esd-x"]
assert SUBSET_LR == TOY_DIT_ESD_LR["esd-u"]

#: What the ESD subsets train, per model: one kind of part at a time.
SUBSETS = {
    "toy": {"ffn": ("unet.*.ffn",), "self-attention": ("unet.*.attn",), "cross-attention": ("unet.*.xattn",)},
    "toy-dit": {"image attention": ("dit.*.img.[qkv]", "dit.*.img.out"),
                "text attention": ("dit.*.text.[qkv]", "dit.*.text.out"),
                "image ffn": ("dit.*.img.ffn",), "text ffn": ("dit.*.text.ffn",), "single blocks": ("dit.single.*",)},
}


def variants(model: str) -> list[tuple[str, str, tuple[str, ...], dict]]:
    """``(label, method, selectors, knobs)`` of the methods part on ``model`` (empty selectors: the defaults)."""
    rows = [("uce", "uce", (), {}), ("rece", "rece", (), {}), ("fewshot", "fewshot", (), {})]
    if model == "toy-dit":
        rows[2:2] = [("uce @ text k/v", "uce", ("dit.*.text.[kv]",), {}),
                     ("rece @ text k/v", "rece", ("dit.*.text.[kv]",), {})]
    rows += [(f"esd ({p})", "esd", (), dict(preset=p, lr=ESD_LR[model][p])) for p in ("esd-x", "esd-u")]
    return rows


class Rows:
    """A part's CSV in data/results: the rows already there, and appending one as it finishes."""

    def __init__(self, part: str, model: str, prefix: str = "unet_vs_dit") -> None:
        self.path = RESULTS / f"{prefix}_{part}_{model}.csv"
        self.table = pd.read_csv(self.path) if self.path.exists() else pd.DataFrame()

    def done(self, **key) -> bool:
        if self.table.empty:
            return False
        mask = pd.Series(True, index=self.table.index)
        for k, v in key.items():
            mask &= self.table[k].astype(str) == str(v)
        return bool(mask.any())

    def add(self, rows: list[dict]) -> None:
        frame = pd.DataFrame(rows)
        keep = [c for c in frame.columns if not c.startswith("dW_by") and c not in ("parts_edited", "labels")]
        self.table = pd.concat([self.table, frame[keep]], ignore_index=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.table.to_csv(self.path, index=False)


def _measurer(pipe) -> Measurer:
    return Measurer.make(pipe, None, None, True, None, MEASURE["per_prompt"], MEASURE["per_other"], MEASURE["eval_seed"])


def _measured(pipe, model: str, part: str, plan: list[tuple[str, str, str, tuple[str, ...], dict]]) -> None:
    """Erase and measure each planned ``(concept, label, method, selectors, knobs)`` the part's rows lack;
    ``label`` goes in the part's own column (``variant`` or ``subset``)."""
    column = {"methods": "variant", "subsets": "subset"}[part]
    rows, measure = Rows(part, model), _measurer(pipe)
    for concept, label, method, selectors, knobs in plan:
        if rows.done(model=model, concept=concept, **{column: label}):
            continue
        t0 = time.perf_counter()
        row = run_one(pipe, Planned(concept, label, selectors, None, "all", label, False, 0), method, measure, knobs)
        rows.add([row | {"model": model, column: label, "wall_seconds": time.perf_counter() - t0, **knobs}])
        print(f"{model} {part}: {label} {concept}: efficacy {row['efficacy']:.2f}, "
              f"preservation {row['preservation']:.2f}", flush=True)


def methods(pipe, model: str) -> None:
    _measured(pipe, model, "methods", [(c, label, method, selectors, knobs) for c in CONCEPTS
                                       for label, method, selectors, knobs in variants(model)])


def subsets(pipe, model: str) -> None:
    _measured(pipe, model, "subsets", [(c, name, "esd", selectors, dict(lr=SUBSET_LR)) for c in SUBSET_CONCEPTS
                                       for name, selectors in SUBSETS[model].items()])


def sweep(pipe, model: str) -> None:
    rows = Rows("sweep", model)
    for concept in SWEEP_CONCEPTS:
        if rows.done(model=model, concept=concept):
            continue
        table = layer_sweep(pipe, concept, "uce", progress=False, **MEASURE)
        rows.add(table.assign(model=model).to_dict("records"))
        print(f"{model} uce sweep {concept}: {len(table)} runs", flush=True)


def tracing(pipe, model: str) -> None:
    rows = Rows("tracing", model)
    for concept in TRACE_CONCEPTS:
        if rows.done(model=model, concept=concept):
            continue
        t = trace(pipe, concept, n=4, sites=sites(pipe, streams=True))
        layers = t.layers().assign(model=model, concept=concept, clean=t.clean, corrupted=t.corrupted, n=4)
        rows.add(layers.to_dict("records"))
        print(f"{model} trace {concept}: clean {t.clean:.2f}, corrupted {t.corrupted:.2f}", flush=True)


RUN = {"methods": methods, "subsets": subsets, "sweep": sweep, "tracing": tracing}


def report() -> None:
    """The methods table: efficacy with its interval (bootstrap over concepts), mean preservation."""
    paths = [RESULTS / f"unet_vs_dit_methods_{m}.csv" for m in MODELS]
    if any(p.exists() for p in paths):
        table = pd.concat([pd.read_csv(p) for p in paths if p.exists()], ignore_index=True)
        rates = subset_rates(table, ["model", "variant"])
        print(rates[["model", "variant", "efficacy", "efficacy_lo", "efficacy_hi", "n", "units", "preservation"]]
              .to_string(index=False, float_format="{:.2f}".format))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=MODELS, nargs="+", default=list(MODELS))
    ap.add_argument("--part", choices=PARTS, nargs="+", default=list(PARTS))
    ap.add_argument("--report", action="store_true", help="only print the tables from the saved rows")
    args = ap.parse_args(argv)
    if not args.report:
        for model in args.model:
            pipe = workbench.load(model)
            assert profile_of(pipe).name == model
            for part in args.part:
                RUN[part](pipe, model)
    report()


if __name__ == "__main__":
    main()
