"""Rates a paper can print: a share with its n and a 95% interval, and tests that say when n is too small.

A *rate* counts images in which the judge saw something (``k`` of ``n``). Images of one concept and one
seed are not independent draws, so intervals come from a bootstrap over *units* (by default a concept x
seed cell: resample the cells with replacement, pool their images); with fewer than
:data:`MIN_UNITS` units the bootstrap cannot see the spread between units and the interval is Wilson's
over images, which assumes independent images (the rate says which one it used).

>>> rate = cluster_rate([3, 0, 1, 2, 0, 1], [8, 8, 8, 8, 8, 8])
>>> rate.k, rate.n, round(rate.rate, 3), rate.method
(7, 48, 0.146, 'bootstrap over 6 units')
>>> str(wilson(0, 20))
'0% [0, 16] (n = 20)'
>>> difference([5, 6, 7, 6, 5], [8] * 5, [1, 2, 1, 0, 1], [8] * 5).significant
True
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

#: Fewest units for a bootstrap interval; below it the interval is Wilson's over images.
MIN_UNITS = 5
#: Bootstrap resamples, the confidence level and the resampling seed, written once.
RESAMPLES, LEVEL, SEED = 2000, 0.95, 0


@dataclass(frozen=True)
class Rate:
    """``k`` of ``n`` images, with the interval ``[lo, hi]`` at :data:`LEVEL` and how it was computed."""

    k: int
    n: int
    lo: float
    hi: float
    method: str = "Wilson"

    @property
    def rate(self) -> float:
        return self.k / self.n if self.n else float("nan")

    def __str__(self) -> str:
        if not self.n:
            return "no images (n = 0)"
        return f"{self.rate:.0%} [{self.lo * 100:.0f}, {self.hi * 100:.0f}] (n = {self.n})"

    def row(self) -> dict:
        """The columns a table shows: ``rate, lo, hi, k, n, interval``."""
        return dict(rate=self.rate, lo=self.lo, hi=self.hi, k=self.k, n=self.n, interval=self.method)


def wilson(k: int, n: int, level: float = LEVEL) -> Rate:
    """Wilson's score interval for ``k`` successes in ``n`` independent trials."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k = {k}, n = {n}")
    if n == 0:
        return Rate(0, 0, 0.0, 1.0)
    z = _z(level)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Rate(k, n, max(0.0, centre - half), min(1.0, centre + half))


def interval_cells(table: pd.DataFrame, column: str) -> list[str]:
    """``table[column]`` with its ``{column}_lo`` and ``{column}_hi`` as printable cells.

    >>> interval_cells(pd.DataFrame({"efficacy": [0.75], "efficacy_lo": [0.3], "efficacy_hi": [0.95]}), "efficacy")
    ['75% [30, 95]']
    """
    missing = [c for c in (column, f"{column}_lo", f"{column}_hi") if c not in table.columns]
    if missing:
        raise KeyError(f"the table has no column {', '.join(missing)}; it has {', '.join(table.columns)}")
    return [("n/a" if r != r else f"{r:.0%}") + ("" if lo != lo else f" [{lo * 100:.0f}, {hi * 100:.0f}]")
            for r, lo, hi in zip(table[column], table[f"{column}_lo"], table[f"{column}_hi"])]


def with_intervals(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with every column that has ``_lo`` and ``_hi`` columns printed as ``rate [lo, hi]`` (percent)
    and those two columns dropped: the form a paper's table takes.

    >>> t = pd.DataFrame({"part": ["a"], "efficacy": [0.75], "efficacy_lo": [0.3], "efficacy_hi": [0.95]})
    >>> with_intervals(t).values.tolist()
    [['a', '75% [30, 95]']]
    """
    rated = [c for c in table.columns if f"{c}_lo" in table.columns and f"{c}_hi" in table.columns]
    out = table.assign(**{c: interval_cells(table, c) for c in rated})
    return out.drop(columns=[f"{c}_{end}" for c in rated for end in ("lo", "hi")])


def _z(level: float) -> float:
    """The two-sided normal quantile for ``level`` (1.96 for 0.95)."""
    from statistics import NormalDist
    return NormalDist().inv_cdf(0.5 + level / 2)


def _resample(hits: np.ndarray, totals: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Pooled rates of ``resamples`` bootstrap draws of the units."""
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(hits), size=(resamples, len(hits)))
    return hits[pick].sum(1) / np.maximum(totals[pick].sum(1), 1)


def cluster_rate(hits: Sequence[int], totals: Sequence[int], level: float = LEVEL,
                 resamples: int = RESAMPLES, seed: int = SEED) -> Rate:
    """The pooled rate of units (``hits[i]`` of ``totals[i]`` images in unit i) with a percentile
    bootstrap interval over units; Wilson's over images when there are fewer than :data:`MIN_UNITS`, or
    when every image or none is a hit (resampling cannot widen a 0% or 100% rate)."""
    h, t = np.asarray(hits, dtype=np.int64), np.asarray(totals, dtype=np.int64)
    if h.shape != t.shape or (h < 0).any() or (h > t).any():
        raise ValueError("give one hit count and one total per unit, with 0 <= hits <= total")
    k, n = int(h.sum()), int(t.sum())
    if len(h) < MIN_UNITS or n == 0 or k in (0, n):  # a bootstrap of all or nothing is [k/n, k/n]
        return wilson(k, n, level)
    draws = _resample(h, t, resamples, seed)
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return Rate(k, n, float(lo), float(hi), f"bootstrap over {len(h)} units")


#: The cells images are grouped in: images of one concept and one seed are not independent draws.
UNITS = ("concept", "seed")


def unit_cells(table: pd.DataFrame, hit: str = "hit", total: str | None = None, units: Sequence[str] = UNITS,
               sort: bool = True) -> pd.DataFrame:
    """Hits (``sum`` of ``hit``) of images (``count``: rows, or the sum of ``total``) per ``units`` cell,
    indexed by the cell (sorted, or in table order for ``sort=False``).

    >>> t = pd.DataFrame({"concept": ["b", "a", "a"], "seed": [0, 0, 0], "hit": [True, False, True]})
    >>> unit_cells(t).values.tolist(), unit_cells(t, sort=False).index.tolist()
    ([[1, 2], [1, 1]], [('b', 0), ('a', 0)])
    >>> runs = pd.DataFrame({"concept": ["a", "a"], "seed": [0, 0], "erased": [3, 8], "n_images": [8, 8]})
    >>> unit_cells(runs, "erased", "n_images").values.tolist()
    [[11, 16]]
    """
    groups = table.groupby(list(units), sort=sort)
    if total is None:
        return groups[hit].agg(["sum", "count"])
    return groups.agg(sum=(hit, "sum"), count=(total, "sum"))


def paired_cells(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """The cells (:func:`unit_cells`) both ``a`` and ``b`` have, side by side: ``sum_a, count_a, sum_b,
    count_b`` (the units a paired bootstrap resamples together, :func:`difference`).

    >>> a = pd.DataFrame({"sum": [1, 2], "count": [4, 4]}, index=["x", "y"])
    >>> paired_cells(a, a.iloc[1:]).values.tolist()
    [[2, 4, 2, 4]]
    """
    return a.add_suffix("_a").join(b.add_suffix("_b"), how="inner")


def rates(table: pd.DataFrame, by: str | Sequence[str], hit: str = "hit",
          units: Sequence[str] = UNITS) -> pd.DataFrame:
    """One row per group of ``by``: the share of rows with ``hit`` true, its interval (bootstrap over the
    ``units`` cells of the group, see :func:`cluster_rate`), ``k``, ``n`` and ``units``.

    >>> t = pd.DataFrame({"method": ["uce"] * 4, "concept": ["a", "a", "b", "b"], "seed": [0, 1, 0, 1],
    ...                   "hit": [True, False, False, False]})
    >>> rates(t, "method")[["method", "rate", "k", "n", "units"]].values.tolist()
    [['uce', 0.25, 1, 4, 4]]
    """
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in [*by, hit, *units] if c not in table.columns]
    if missing:
        raise KeyError(f"the table has no column {', '.join(missing)}; it has {', '.join(table.columns)}")
    rows = []
    for key, group in table.groupby(by, sort=False, dropna=False):
        cells = unit_cells(group, hit, units=units, sort=False)
        rate = cluster_rate(cells["sum"].to_numpy(), cells["count"].to_numpy())
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), **rate.row(), "units": len(cells)})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Difference:
    """Rate a minus rate b with its bootstrap interval, a one-sided p-value (a <= b), a two-sided one
    (``p_two``: a = b) and the verdict."""

    a: float
    b: float
    lo: float
    hi: float
    p: float
    n: int
    alpha: float = 1 - LEVEL
    p_two: float = 1.0

    @property
    def significant(self) -> bool:
        return self.p < self.alpha

    def __str__(self) -> str:
        verdict = "significant" if self.significant else f"not significant at n = {self.n}"
        return (f"{self.a:.0%} vs {self.b:.0%}: difference {self.a - self.b:+.0%} "
                f"[{self.lo * 100:+.0f}, {self.hi * 100:+.0f}], one-sided p = {self.p:.2g} ({verdict})")


def difference(hits_a: Sequence[int], totals_a: Sequence[int], hits_b: Sequence[int], totals_b: Sequence[int],
               level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED, paired: bool = True) -> Difference:
    """Is rate a above rate b? Units are resampled together when ``paired`` (unit i of a and of b are the
    same concept x seed), independently otherwise. ``p`` is the share of resamples with a <= b (at
    least 1 / resamples)."""
    ha, ta, hb, tb = (np.asarray(x, dtype=np.int64) for x in (hits_a, totals_a, hits_b, totals_b))
    if paired and len(ha) != len(hb):
        raise ValueError(f"paired units need the same count on both sides ({len(ha)} vs {len(hb)})")
    rng = np.random.default_rng(seed)
    pick_a = rng.integers(0, len(ha), size=(resamples, len(ha)))
    pick_b = pick_a if paired else rng.integers(0, len(hb), size=(resamples, len(hb)))
    ra = ha[pick_a].sum(1) / np.maximum(ta[pick_a].sum(1), 1)
    rb = hb[pick_b].sum(1) / np.maximum(tb[pick_b].sum(1), 1)
    d = ra - rb
    lo, hi = np.quantile(d, [(1 - level) / 2, (1 + level) / 2])
    p = max(float((d <= 0).mean()), 1 / resamples)
    p_two = min(1.0, 2 * max(min(float((d <= 0).mean()), float((d >= 0).mean())), 1 / resamples))
    return Difference(ha.sum() / max(ta.sum(), 1), hb.sum() / max(tb.sum(), 1), float(lo), float(hi), p,
                      int(ta.sum() + tb.sum()), 1 - level, p_two)


def paired_difference(a: Sequence[bool], b: Sequence[bool], level: float = LEVEL) -> tuple[float, float, float]:
    """Rate a minus rate b over paired binary outcomes (``a[i]`` and ``b[i]``: the same prompt and seed
    under two methods) with Newcombe's hybrid score interval for paired proportions (his method 10, 1998),
    which stays inside [-1, 1] and does not collapse when both rates are 0% or 100%: ``(difference, lo, hi)``.

    >>> [round(x, 3) for x in paired_difference([0] * 12, [0] * 12)]
    [0.0, -0.242, 0.242]
    >>> a = [1] * 21 + [0] * 23                  # Newcombe's example: 12 both, 9 a only, 2 b only, 21 neither
    >>> b = [1] * 12 + [0] * 9 + [1] * 2 + [0] * 21
    >>> [round(x, 4) for x in paired_difference(a, b)]    # his Table II: 0.0112 to 0.2954
    [0.1591, 0.0112, 0.2954]
    """
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if x.shape != y.shape or x.ndim != 1 or not len(x):
        raise ValueError(f"give the same number of paired outcomes on both sides, at least one ({len(x)} vs {len(y)})")
    n = len(x)
    e, f, g, h = (int(v) for v in ((x & y).sum(), (x & ~y).sum(), (~x & y).sum(), (~x & ~y).sum()))
    p1, p2 = (e + f) / n, (e + g) / n
    one, two = wilson(e + f, n, level), wilson(e + g, n, level)
    denominator = (e + f) * (g + h) * (e + g) * (f + h)
    cross = e * h - f * g
    cross = cross - n / 2 if cross > n / 2 else (0.0 if cross >= 0 else cross)
    phi = cross / math.sqrt(denominator) if denominator else 0.0
    below = (p1 - one.lo) ** 2 - 2 * phi * (p1 - one.lo) * (two.hi - p2) + (two.hi - p2) ** 2
    above = (one.hi - p1) ** 2 - 2 * phi * (one.hi - p1) * (p2 - two.lo) + (p2 - two.lo) ** 2
    return p1 - p2, p1 - p2 - math.sqrt(max(below, 0.0)), p1 - p2 + math.sqrt(max(above, 0.0))


def interval_text(value: float, lo: float, hi: float, signed: bool = False) -> str:
    """A share and its interval as a paper prints them: ``'33% [6, 60]'``, or with signs for a difference.

    >>> interval_text(0.31, 0.19, 0.41, signed=True)
    '+31% [+19, +41]'
    """
    if signed:
        return f"{value:+.0%} [{lo * 100:+.0f}, {hi * 100:+.0f}]"
    return f"{value:.0%} [{lo * 100:.0f}, {hi * 100:.0f}]"


def mean_interval(values: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES,
                  seed: int = SEED, bounds: tuple[float, float] | None = None) -> tuple[float, float, float]:
    """The mean of per-unit values (one per concept, say) with a 95% interval: ``(mean, lo, hi)``; a
    percentile bootstrap over the units from :data:`MIN_UNITS` of them, Student's t below (NaN for one),
    cut to ``bounds`` when the values cannot leave them (probabilities: ``(0, 1)``).

    >>> [round(x, 3) for x in mean_interval([0.9, 1.0, 0.8])]
    [0.9, 0.652, 1.148]
    >>> [round(x, 3) for x in mean_interval([0.9, 1.0, 0.8], bounds=(0, 1))]
    [0.9, 0.652, 1.0]
    >>> [round(x, 3) for x in mean_interval([0.9, 1.0, 0.8, 0.7, 1.0, 0.9])]
    [0.883, 0.8, 0.967]
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("give at least one value")
    mean = float(v.mean())
    if v.size == 1:
        return mean, float("nan"), float("nan")
    if v.size < MIN_UNITS:
        from scipy.stats import t
        half = float(t.ppf((1 + level) / 2, v.size - 1)) * float(v.std(ddof=1)) / math.sqrt(v.size)
        lo, hi = mean - half, mean + half
        return (mean, lo, hi) if bounds is None else (mean, max(lo, float(bounds[0])), min(hi, float(bounds[1])))
    draws = v[np.random.default_rng(seed).integers(0, v.size, size=(resamples, v.size))].mean(1)
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return mean, float(lo), float(hi)


def enough(n_units: int, n_images: int, min_units: int = 2, min_images: int = 16) -> str | None:
    """Why a verdict cannot be given on this much data (None when it can): fewer than ``min_units``
    concept x seed units, or fewer than ``min_images`` images."""
    if n_units < min_units or n_images < min_images:
        return (f"too little data for a verdict ({n_units} concept x seed unit(s), {n_images} images; "
                f"need at least {min_units} units and {min_images} images): add concepts, seeds or images")
    return None


def ratio(hits_a: Sequence[int], hits_b: Sequence[int], level: float = LEVEL, resamples: int = RESAMPLES,
          seed: int = SEED) -> tuple[float, float, float]:
    """Sum(a) / sum(b) over units with a paired percentile bootstrap interval (e.g. accuracy after an edit
    over accuracy before it, on the same prompts and seeds): ``(ratio, lo, hi)``. When every unit has
    a = b, the interval is Wilson's for sum(a) of sum(b) images.

    >>> ratio([3, 4, 4, 2, 4], [4, 4, 4, 4, 4])[0]
    0.85
    >>> [round(x, 3) for x in ratio([4] * 5, [4] * 5)]  # nothing lost: Wilson's interval over the 20 images
    [1.0, 0.839, 1.0]
    """
    a, b = np.asarray(hits_a, dtype=float), np.asarray(hits_b, dtype=float)
    if a.shape != b.shape or not len(a):
        raise ValueError("give one count per unit on both sides, and at least one unit")
    point = a.sum() / b.sum() if b.sum() else float("nan")
    if (a == b).all() and b.sum() and float(b.sum()).is_integer():
        # every unit kept all it had: resampling gives [1, 1]; bound it as a share of b's images instead
        kept = wilson(int(a.sum()), int(b.sum()), level)
        return float(point), kept.lo, kept.hi
    pick = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    with np.errstate(invalid="ignore", divide="ignore"):
        draws = a[pick].sum(1) / b[pick].sum(1)
    lo, hi = np.nanquantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(point), float(lo), float(hi)


def ratio_interval(hits_a: Sequence[float], hits_b: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """:func:`ratio`'s interval alone, or NaNs with fewer than :data:`MIN_UNITS` units or nothing in b
    (preservation: the other concepts' hits after an edit over their hits before it).

    >>> ratio_interval([4, 4], [4, 4])
    (nan, nan)
    >>> [round(x, 3) for x in ratio_interval([4] * 5, [4] * 5)]
    [0.839, 1.0]
    """
    if len(hits_a) < MIN_UNITS or not sum(hits_b):
        return float("nan"), float("nan")
    _, lo, hi = ratio(hits_a, hits_b, level)
    return lo, hi
