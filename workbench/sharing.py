"""Do related concepts share their units? Overlap of concepts' neurons, heads or features, pair by pair.

Each concept has a set of units (its skilled neurons, its top heads, its SAE features). For every pair of
concepts :func:`pairs` gives the Jaccard overlap of their sets and whether the two are related (one group
of the concept set: apple and cherry, not apple and car). :func:`related_vs_unrelated` compares the mean
overlap of related pairs with that of unrelated ones; pairs share concepts, so its interval comes from a
bootstrap over *concepts* (a resampled concept brings every pair it is in), not over pairs.

>>> from workbench.toy import TOY_CONCEPTS
>>> sets = {"apple": {1, 2, 3}, "cherry": {2, 3, 4}, "car": {7}, "truck": {7, 8}}
>>> table = pairs(sets, TOY_CONCEPTS)
>>> table[["a", "b", "related", "jaccard"]].values.tolist()[:2]
[['apple', 'cherry', True, 0.5], ['apple', 'car', False, 0.0]]
"""
from __future__ import annotations

import itertools
from typing import Hashable, Mapping

import numpy as np
import pandas as pd

from .concepts import ConceptSet
from .stats import LEVEL, RESAMPLES, SEED


def jaccard(a: set, b: set) -> float:
    """``|a & b| / |a | b|`` (NaN for two empty sets).

    >>> jaccard({1, 2}, {2, 3})
    0.3333333333333333
    """
    union = a | b
    return len(a & b) / len(union) if union else float("nan")


def top_units(table: pd.DataFrame, k: int, value: str = "effect", unit: tuple[str, ...] = ("layer", "head"),
              largest: bool = True) -> dict[str, set]:
    """Each concept's ``k`` units (rows of ``table``: ``concept``, the ``unit`` columns, ``value``) with the
    largest (or smallest) ``value``, only those on the chosen side of zero.

    >>> t = pd.DataFrame(dict(concept=["a"] * 3, layer=["x"] * 3, head=[0, 1, 2], effect=[0.5, -0.1, 0.2]))
    >>> top_units(t, 2)
    {'a': {('x', 0), ('x', 2)}}
    """
    out = {}
    for concept, group in table.groupby("concept", sort=False):
        rows = group.nlargest(k, value) if largest else group.nsmallest(k, value)
        rows = rows[rows[value] > 0] if largest else rows[rows[value] < 0]
        out[concept] = {tuple(r) for r in rows[list(unit)].itertuples(index=False)}
    return out


def pairs(sets: Mapping[str, set[Hashable]], concept_set: ConceptSet) -> pd.DataFrame:
    """One row per pair of concepts (in ``sets``' order): ``a, b, kinds, related, shared, jaccard``."""
    rows = []
    for a, b in itertools.combinations(sets, 2):
        rows.append(dict(a=a, b=b, kinds=f"{concept_set.kind(a)}/{concept_set.kind(b)}",
                         related=concept_set.group(a) == concept_set.group(b), shared=len(sets[a] & sets[b]),
                         jaccard=jaccard(set(sets[a]), set(sets[b]))))
    return pd.DataFrame(rows, columns=["a", "b", "kinds", "related", "shared", "jaccard"])


def related_vs_unrelated(table: pd.DataFrame, value: str = "jaccard", level: float = LEVEL,
                         resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, float]:
    """Mean ``value`` of related and of unrelated pairs (:func:`pairs`), their difference, and a 95% interval
    of each from a bootstrap over concepts; ``n_related``, ``n_unrelated``: pairs, ``n_concepts``.

    >>> from workbench.toy import TOY_CONCEPTS
    >>> sets = {c: {c[0], c[-1], "x"} for c in ["apple", "cherry", "pear", "car", "truck", "boat"]}
    >>> r = related_vs_unrelated(pairs(sets, TOY_CONCEPTS), resamples=200)
    >>> r["n_related"], r["n_unrelated"], r["n_concepts"]
    (6, 9, 6)
    """
    table = table.dropna(subset=[value])
    concepts = list(dict.fromkeys([*table["a"], *table["b"]]))
    index = {c: i for i, c in enumerate(concepts)}
    a, b = table["a"].map(index).to_numpy(), table["b"].map(index).to_numpy()
    v, rel = table[value].to_numpy(float), table["related"].to_numpy(bool)

    def means(weight: np.ndarray) -> tuple[float, float]:
        w = weight[a] * weight[b]  # a pair counts as often as both its concepts were drawn
        r, u = (w * rel).sum(), (w * ~rel).sum()
        return ((w * rel * v).sum() / r if r else np.nan, (w * ~rel * v).sum() / u if u else np.nan)

    point = means(np.ones(len(concepts)))
    rng = np.random.default_rng(seed)
    draws = np.array([means(np.bincount(rng.integers(0, len(concepts), len(concepts)), minlength=len(concepts))
                            .astype(float)) for _ in range(resamples)])
    diff = draws[:, 0] - draws[:, 1]
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    related_lo, related_hi = np.nanpercentile(draws[:, 0], q)
    unrelated_lo, unrelated_hi = np.nanpercentile(draws[:, 1], q)
    diff_lo, diff_hi = np.nanpercentile(diff, q)
    return dict(related=point[0], related_lo=related_lo, related_hi=related_hi, unrelated=point[1],
                unrelated_lo=unrelated_lo, unrelated_hi=unrelated_hi, difference=point[0] - point[1],
                difference_lo=diff_lo, difference_hi=diff_hi, n_related=int(rel.sum()), n_unrelated=int((~rel).sum()),
                n_concepts=len(concepts))


def in_words(result: dict[str, float], units: str) -> str:
    """:func:`related_vs_unrelated` as a sentence with its intervals and n.

    >>> in_words(dict(related=0.37, related_lo=0.33, related_hi=0.41, unrelated=0.30, unrelated_lo=0.28,
    ...               unrelated_hi=0.32, difference=0.07, difference_lo=0.03, difference_hi=0.11, n_related=24,
    ...               n_unrelated=96, n_concepts=16), "skilled neurons")
    'related concepts share 37% [33, 41] of their skilled neurons (Jaccard), unrelated ones 30% [28, 32]: +7.0 points [+3.0, +11.0] (24 and 96 pairs of 16 concepts, bootstrap over concepts)'
    """
    sig = result["difference_lo"] > 0 or result["difference_hi"] < 0
    tail = "" if sig else f"; not significant at n = {result['n_concepts']} concepts"
    def pct(key: str) -> str:
        return f"{result[key]:.0%} [{result[key + '_lo'] * 100:.0f}, {result[key + '_hi'] * 100:.0f}]"

    return (f"related concepts share {pct('related')} of their {units} (Jaccard), unrelated ones {pct('unrelated')}: "
            f"{_points(result['difference'])} points [{_points(result['difference_lo'])}, "
            f"{_points(result['difference_hi'])}] ({result['n_related']} and {result['n_unrelated']} pairs of "
            f"{result['n_concepts']} concepts, bootstrap over concepts{tail})")


def _points(x: float) -> str:
    """A difference of shares in percentage points, signed, to a tenth (never "-0.0")."""
    return f"{round(x * 100, 1) + 0.0:+.1f}"
