"""Two models side by side (the toy UNet and the toy DiT): one table per question, the same measurement on each.

Each function takes the rows of one measurement per model, as a dict ``{model: table}`` (the rows that
``benchmarks/unet_vs_dit.py`` and ``benchmarks/attacks.py`` save), and compares them on the concepts
both tables hold. Rates carry their n and a 95% interval (a bootstrap over concepts, or concept x seed
units); means over concepts carry an interval over concepts (:func:`workbench.stats.mean_interval`).

>>> import pandas as pd
>>> rows = lambda p: pd.DataFrame({"concept": ["a", "b", "c"], "variant": "uce", "seed": 0, "efficacy": p,
...                                "n_images": 4, "preservation": [1.0, 0.9, 0.8]})
>>> table = methods_table({"unet": rows([1.0, 1.0, 0.75]), "dit": rows([0.5, 0.25, 0.0])})
>>> table[["model", "variant", "efficacy", "images", "concepts"]].values.tolist()
[['unet', 'uce', '92% [65, 99]', 12, 3], ['dit', 'uce', '25% [9, 53]', 12, 3]]
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from .attacks.table import rates_wide
from .stats import interval_text, mean_interval
from .sweep import subset_rates


def together(tables: Mapping[str, pd.DataFrame], concepts: bool = True) -> pd.DataFrame:
    """The tables in one, with a ``model`` column; with ``concepts``, only the concepts every table holds
    (in the first table's order)."""
    if not tables:
        raise ValueError("give at least one model's table, as {model: table}")
    frames = dict(tables)
    if concepts:
        common = set.intersection(*(set(t["concept"]) for t in frames.values()))
        if not common:
            raise ValueError("the tables share no concept: " + "; ".join(
                f"{m}: {', '.join(dict.fromkeys(t['concept']))}" for m, t in frames.items()))
        frames = {m: t[t["concept"].isin(common)] for m, t in frames.items()}
    return pd.concat([t.assign(model=m) for m, t in frames.items()], ignore_index=True)


def methods_table(tables: Mapping[str, pd.DataFrame], by: str = "variant") -> pd.DataFrame:
    """Per model and ``by`` (a method, or a method at some parts): efficacy (the share of the concept's
    images the judge no longer labels as it, with a bootstrap interval over concepts x seeds), the mean
    preservation of the other concepts with a bootstrap interval over concepts, images and concepts; as
    text a paper prints, and as numbers (``efficacy_rate``, ``efficacy_lo``... ``preservation_hi``)."""
    table = together(tables)
    rates = subset_rates(table, ["model", by])
    rows = []
    for r in rates.itertuples():
        runs = table[(table["model"] == r.model) & (table[by] == getattr(r, by))]
        per_concept = runs.groupby("concept", sort=False)["preservation"].mean()
        p, lo, hi = mean_interval(per_concept.to_numpy())
        rows.append({"model": r.model, by: getattr(r, by), "efficacy": interval_text(r.efficacy, r.efficacy_lo, r.efficacy_hi),
                     "preservation": interval_text(p, lo, hi), "images": int(r.n), "concepts": int(runs["concept"].nunique()),
                     "efficacy_rate": r.efficacy, "efficacy_lo": r.efficacy_lo, "efficacy_hi": r.efficacy_hi,
                     "preservation_mean": p, "preservation_lo": lo, "preservation_hi": hi})
    return pd.DataFrame(rows)


def attack_table(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The attack success table (:func:`workbench.attacks.table.rates_wide`) with one column per method and
    model (``"uce · toy-dit"``), on the concepts every model's table holds."""
    table = together(tables)
    table = table.assign(method=table["method"] + " · " + table["model"])
    order = [f"{m} · {model}" for m in dict.fromkeys(table["method"].str.split(" · ").str[0]) for model in tables]
    wide = rates_wide(table)
    return wide[[c for c in order if c in wide.columns] + ["n"]]


def trace_table(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Causal tracing per model and site, in network order: the judge's mean probability of the concept
    when the site is restored, with a bootstrap interval over concepts, and the clean and corrupted runs'
    means beside it; ``kind`` is ``text`` (an encoder layer), ``unet`` or ``dit`` (a block or one stream)."""
    table = together(tables)
    rows = []
    for (model, site), runs in table.groupby(["model", "site"], sort=False):
        p, lo, hi = mean_interval(runs["probability"].to_numpy(), bounds=(0, 1))
        rows.append({"model": model, "site": site, "kind": runs["kind"].iloc[0], "restored": p, "lo": lo, "hi": hi,
                     "clean": float(runs["clean"].mean()), "corrupted": float(runs["corrupted"].mean()),
                     "concepts": int(runs["concept"].nunique())})
    return pd.DataFrame(rows)


def layer_table(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """A layer sweep per model (:func:`workbench.sweep.layer_sweep` rows): per layer and component, the
    efficacy pooled over concepts' images with its interval (:func:`workbench.sweep.subset_rates`), in
    network order; ``depth`` is the layer's place in its model from 0 (first) to 1 (last), so layers of two
    architectures line up."""
    table = together(tables)
    rows = []
    for model, runs in table.groupby("model", sort=False):
        order = list(dict.fromkeys(runs["layer_name"]))
        rates = subset_rates(runs, ["layer_name", "component"])
        for r in rates.itertuples():
            rows.append({"model": model, "layer": r.layer_name, "component": r.component,
                         "depth": order.index(r.layer_name) / max(len(order) - 1, 1), "efficacy": r.efficacy,
                         "lo": r.efficacy_lo, "hi": r.efficacy_hi, "images": int(r.n), "preservation": r.preservation})
    return pd.DataFrame(rows)


def shares(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Where along each model's depth its layers' share of a summed quantity falls: per model, the share
    in the first, middle and last third of its layers (``table`` rows: ``layer`` in network order and
    ``share``, e.g. :meth:`workbench.attnmaps.AttentionMaps.table`)."""
    rows = []
    for model, t in tables.items():
        thirds = np.array_split(t["share"].to_numpy(), 3)
        rows.append({"model": model, **{name: float(part.sum()) for name, part in
                                        zip(("first third", "middle third", "last third"), thirds)}})
    return pd.DataFrame(rows)


def _site_group(site: str, kind: str) -> str:
    """What a trace site restores: an encoder's layer, a whole block, or one stream of a transformer block."""
    if kind == "text":
        return "text encoder" if site.split(".")[0] == "text" else f"text encoder ({site.split('.')[0]})"
    if site.endswith(".img"):
        return "image stream"
    if site.endswith(".text"):
        return "text stream"
    return "blocks"


def trace_profile(trace: pd.DataFrame) -> pd.DataFrame:
    """:func:`trace_table` rows with a ``group`` ("toy-dit: text stream", ...) and each site's ``depth``
    within its group (0 = first, 1 = last), the input of :func:`workbench.plots.depth_profile`."""
    t = trace.assign(group=[f"{m}: {_site_group(s, k)}" for m, s, k in zip(trace["model"], trace["site"], trace["kind"])])
    rank = t.groupby("group", sort=False).cumcount()
    size = t.groupby("group", sort=False)["site"].transform("size")
    return t.assign(depth=rank / (size - 1).clip(lower=1))
