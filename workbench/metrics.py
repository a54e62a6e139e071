"""Efficacy and preservation of an erasure, measured by a judge on a model's concept set.

*Accuracy on the erased concept* is the share of images, generated from the concept's probe prompts, in
which the judge (:mod:`workbench.judges`) still sees the concept, choosing among the labels of the
concept's kind (lower is a stronger erasure). *Preservation* is the judge's accuracy on other concepts'
prompts, as a fraction of the unedited model's accuracy on them. The concept set (:mod:`workbench.concepts`)
says how to prompt each concept and which are related; it defaults to the pipeline's profile.

>>> import workbench
>>> from workbench.metrics import accuracy
>>> from workbench.profile import profile_of
>>> pipe = workbench.load("toy")
>>> oracle = profile_of(pipe).judge()          # the toy world's judge
>>> accuracy(pipe, oracle, ["apple", "van gogh"], per_prompt=4)
{'apple': 1.0, 'van gogh': 1.0}

:func:`evaluate` is the quick measure a layer sweep runs after every edit: a few images of the concept
(efficacy, drift) and of a fixed set of related and unrelated concepts (preservation), all generated in
one batched, seeded pass, against a baseline of the unedited model that is measured once and reused.

>>> from workbench.methods import uce
>>> scores = evaluate(pipe, oracle, "apple", edit=uce(pipe, "apple"), per_prompt=1, per_other=1,
...                   others=["banana", "car"])
>>> sorted(k for k in scores if k.startswith("preservation"))
['preservation', 'preservation_hi', 'preservation_lo', 'preservation_related', 'preservation_unrelated']
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from .concepts import KINDS, ConceptSet
from .judges import Judge
from .profile import profile_of
from .sampling import generate
from .stats import LEVEL, RESAMPLES, SEED, ratio, ratio_interval, wilson


@dataclass(frozen=True)
class Defaults:
    """What a measurement uses when not told otherwise, written once: ``per_prompt`` images of each probed
    concept, ``per_other`` of each other concept (preservation), generated from ``seed``;
    :func:`preservation_sets` takes ``per_concept`` prompts of each concept on :attr:`seeds`.

    >>> DEFAULTS.per_prompt, DEFAULTS.per_other, DEFAULTS.seed, DEFAULTS.seeds
    (8, 4, 1234, (1234, 1235))
    """

    per_prompt: int = 8
    per_other: int = 4
    seed: int = 1234
    per_concept: int = 2

    @property
    def seeds(self) -> tuple[int, int]:
        """Two seeds for paired measurements: :attr:`seed` and the next."""
        return (self.seed, self.seed + 1)


#: The measurement defaults every signature here and in :mod:`workbench.sweep` reads.
DEFAULTS = Defaults()


def _concept_set(pipe, concept_set: ConceptSet | None) -> ConceptSet:
    return concept_set if concept_set is not None else profile_of(pipe).concept_set()


def predictions(pipe, judge: Judge, concepts: Sequence[str], per_prompt: int | Sequence[int] = DEFAULTS.per_prompt,
                seed: int = DEFAULTS.seed, concept_set: ConceptSet | None = None) -> list[tuple[str, str]]:
    """Generate each concept's probe images (seeded batches, :func:`workbench.sampling.generate`) and let
    ``judge`` choose, for each, among the labels of the concept's kind.

    ``per_prompt`` is one count for every concept or one per concept. Returns ``(concept, label)`` per
    image, in prompt order.
    """
    cs = _concept_set(pipe, concept_set)
    counts = [per_prompt] * len(concepts) if isinstance(per_prompt, int) else list(per_prompt)
    if len(counts) != len(concepts):
        raise ValueError(f"give one image count or one per concept ({len(concepts)}), not {len(counts)}")
    prompts, wanted = [], []
    for c, n in zip(concepts, counts):
        ps = cs.probe(c, n)
        prompts += ps
        wanted += [c] * len(ps)
    images = generate(pipe, prompts, seed)
    labels = [""] * len(images)
    for kind in KINDS:
        idx = [i for i, c in enumerate(wanted) if cs.kind(c) == kind]
        for i, label in zip(idx, judge.choose([images[i] for i in idx], cs.labels(kind)) if idx else []):
            labels[i] = label
    return list(zip(wanted, labels))


def hits(preds: Sequence[tuple[str, str]]) -> dict[str, float]:
    """Per concept, the share of its images in which the judge sees it (``predictions``'s output)."""
    seen: dict[str, list[bool]] = {}
    for c, label in preds:
        seen.setdefault(c, []).append(label == c)
    return {c: float(np.mean(v)) for c, v in seen.items()}


def accuracy(pipe, judge: Judge, concepts: Sequence[str], per_prompt: int = DEFAULTS.per_prompt,
             seed: int = DEFAULTS.seed, concept_set: ConceptSet | None = None) -> dict[str, float]:
    """The judge's accuracy on each concept's probe prompts, all images generated in batches."""
    return hits(predictions(pipe, judge, concepts, per_prompt, seed, concept_set))


def judge_prompts(pipe, judge: Judge, prompts: Sequence[str], concepts: Sequence[str], seeds: Sequence[int],
                  concept_set: ConceptSet | None = None) -> tuple[list, pd.DataFrame]:
    """Generate ``prompts`` on each of ``seeds`` (one batch per seed) and let the judge choose, for each
    image, among the labels of the kind of the concept the prompt should show (``concepts[i]``).
    Returns the images and one row per image: ``concept, seed, prompt, label, hit``."""
    cs = _concept_set(pipe, concept_set)
    if len(prompts) != len(concepts):
        raise ValueError(f"give one concept per prompt ({len(prompts)} prompts, {len(concepts)} concepts)")
    images, rows = [], []
    for s in seeds:
        made = generate(pipe, list(prompts), s)
        labels = [""] * len(made)
        for kind in KINDS:
            idx = [i for i, c in enumerate(concepts) if cs.kind(c) == kind]
            for i, label in zip(idx, judge.choose([made[i] for i in idx], cs.labels(kind)) if idx else []):
                labels[i] = label
        rows += [dict(concept=c, seed=s, prompt=p, label=label, hit=label == c)
                 for c, p, label in zip(concepts, prompts, labels)]
        images += made
    return images, pd.DataFrame(rows, columns=["concept", "seed", "prompt", "label", "hit"])


def preservation_sets(pipe, judge: Judge, edit, concept: str, held_out: Sequence[str],
                      per_concept: int = DEFAULTS.per_concept, seeds: Sequence[int] = DEFAULTS.seeds,
                      concept_set: ConceptSet | None = None) -> pd.DataFrame:
    """Accuracy on other concepts before and after ``edit``, per kind of prompt: ``"in list"`` (concepts the
    erasure preserved, in the wordings it preserved them in), ``"held-out wording"`` (the same concepts in
    probe wordings it never saw) and ``"held-out concept"`` (``held_out``: concepts left out of its
    preserve list, in probe wordings). One row per image: ``set, concept, seed, prompt, before, after``."""
    cs = _concept_set(pipe, concept_set)
    kept = [c for c in cs.names if c != concept and c not in held_out]
    sets = {"in list": [(c, p) for c in kept for p in cs.prompts(c)[:per_concept]],
            "held-out wording": [(c, p) for c in kept for p in cs.held_out(c, per_concept)],
            "held-out concept": [(c, p) for c in held_out for p in cs.held_out(c, per_concept)]}
    names = [n for n, pairs in sets.items() for _ in pairs]
    concepts = [c for pairs in sets.values() for c, _ in pairs]
    prompts = [p for pairs in sets.values() for _, p in pairs]
    _, before = judge_prompts(pipe, judge, prompts, concepts, seeds, cs)
    with edit.apply(pipe):
        _, after = judge_prompts(pipe, judge, prompts, concepts, seeds, cs)
    return before.assign(set=names * len(seeds), before=before["hit"], after=after["hit"].to_numpy())[
        ["set", "concept", "seed", "prompt", "before", "after"]]


def preservation_summary(rows: pd.DataFrame, by: Sequence[str] = ("set",)) -> pd.DataFrame:
    """Preservation (accuracy after over before, on the same prompts and seeds) per group of
    :func:`preservation_sets` rows, with a paired bootstrap interval over concept x seed and ``n`` images."""
    out = []
    for key, g in rows.groupby(list(by), sort=False):
        cells = g.groupby(["concept", "seed"])[["before", "after"]].sum()
        value, lo, hi = ratio(cells["after"].to_numpy(), cells["before"].to_numpy())
        out.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), "preservation": value, "lo": lo,
                    "hi": hi, "before": float(g["before"].mean()), "after": float(g["after"].mean()), "n": len(g),
                    "units": len(cells)})
    return pd.DataFrame(out)


def preservation(after: dict[str, float], before: dict[str, float]) -> float:
    """Mean accuracy on other concepts after an edit, as a fraction of the unedited model's."""
    return float(np.mean(list(after.values())) / max(1e-9, np.mean(list(before.values()))))


def drift(labels: Sequence[str], concept: str, concept_set: ConceptSet) -> dict[str, float]:
    """Where an erased object went: the share of its images the judge calls a *related* object (same
    group, not the concept itself), and the share expected by chance.

    Chance spreads the images that no longer show the concept uniformly over the other labels of its
    kind, so ``drift > drift_chance`` means erased images land on related objects more often than on
    unrelated ones. For a style both values are NaN.

    >>> cs = ConceptSet.of(objects=["apple", "pear", "banana", "car", "truck"],
    ...                    groups={"fruit": ["apple", "pear", "banana"], "vehicle": ["car", "truck"]})
    >>> drift(["apple", "pear", "banana", "car"], "apple", cs)
    {'drift': 0.5, 'drift_chance': 0.375}
    """
    if concept_set.kind(concept) == "style" or not labels:
        return {"drift": float("nan"), "drift_chance": float("nan")}
    near = concept_set.related(concept)
    moved = sum(label != concept for label in labels) / len(labels)
    return {"drift": sum(label in near for label in labels) / len(labels),
            "drift_chance": moved * len(near) / (len(concept_set.labels("object")) - 1)}


def drift_test(labels: pd.DataFrame, concept_set: ConceptSet, unit: Sequence[str] = ("concept", "seed"),
               resamples: int = RESAMPLES, seed: int = SEED) -> pd.DataFrame:
    """Do erased objects drift to related objects more than erased *unrelated* objects land there?

    ``labels`` has one row per image of an erased concept (columns ``concept``, ``label`` and the
    ``unit`` columns; styles are left out). For an object X, *moved* images are those not labelled X;
    ``observed`` is the share of them labelled an object of X's group, ``null`` the share of the moved
    images of *other groups'* concepts labelled one of X's group (the judge's own pull towards those
    labels: smudges look like "airplane" to the toy oracle). One row per concept and a ``pooled`` row
    (weighted by moved images); the interval and one-sided p-value of ``observed - null`` come from a
    bootstrap over units (concept x seed cells), the null re-estimated in every resample.

    >>> cs = ConceptSet.of(objects=["apple", "pear", "car", "truck"],
    ...                    groups={"fruit": ["apple", "pear"], "vehicle": ["car", "truck"]})
    >>> t = pd.DataFrame({"concept": ["apple"] * 4 + ["car"] * 4, "seed": [0, 0, 1, 1] * 2,
    ...                   "label": ["pear", "pear", "pear", "car", "truck", "apple", "truck", "pear"]})
    >>> drift_test(t, cs)[["concept", "moved", "observed", "null"]].values.tolist()
    [['apple', 4, 0.75, 0.25], ['car', 4, 0.5, 0.0], ['pooled', 8, 0.625, 0.125]]
    """
    t = labels[[concept_set.kind(c) == "object" for c in labels["concept"]]]
    t = t[t["label"] != t["concept"]]
    concepts = list(dict.fromkeys(t["concept"]))
    if not concepts:
        raise ValueError("no image of an erased object moved to another label: nothing to test")
    groups = t.groupby(list(unit), sort=False)
    owners = [g["concept"].iloc[0] for _, g in groups]
    moved = groups.size().to_numpy(dtype=float)
    near = np.array([[g["label"].isin(concept_set.related(x)).sum() for x in concepts] for _, g in groups], float)
    own = np.array([[o == x for x in concepts] for o in owners], float)
    other = np.array([[concept_set.group(o) != concept_set.group(x) for x in concepts] for o in owners], float)
    point = _drift_shares(np.ones((1, len(owners))), moved, near, own, other)
    w = np.random.default_rng(seed).multinomial(len(owners), np.full(len(owners), 1 / len(owners)), resamples)
    boot = _drift_shares(w.astype(float), moved, near, own, other)
    diff = boot[0] - boot[1]
    lo, hi = np.nanquantile(diff, [(1 - LEVEL) / 2, (1 + LEVEL) / 2], axis=0)
    p = np.maximum(np.nanmean(diff <= 0, axis=0), 1 / resamples)
    counts = [int((own[:, j] * moved).sum()) for j in range(len(concepts))] + [int(moved.sum())]
    return pd.DataFrame(dict(concept=[*concepts, "pooled"], moved=counts, observed=point[0][0], null=point[1][0],
                             difference=point[0][0] - point[1][0], lo=lo, hi=hi, p=p))


def _drift_shares(w: np.ndarray, moved: np.ndarray, near: np.ndarray, own: np.ndarray,
                  other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Observed and null drift shares ``[resamples, concepts + 1]`` (pooled last) for unit weights ``w``."""
    mass = w @ (own * moved[:, None])
    obs = (w @ (own * near)) / np.where(mass > 0, mass, np.nan)
    base = w @ (other * moved[:, None])
    null = (w @ (other * near)) / np.where(base > 0, base, np.nan)
    total = mass.sum(1, keepdims=True)
    pool = lambda x: np.nansum(x * mass, 1, keepdims=True) / np.where(total > 0, total, np.nan)  # noqa: E731
    return np.hstack([obs, pool(obs)]), np.hstack([null, pool(null)])


def evaluate(pipe, judge: Judge, concept: str, edit=None, others: Sequence[str] | None = None,
             per_prompt: int = DEFAULTS.per_prompt, per_other: int = DEFAULTS.per_other, seed: int = DEFAULTS.seed,
             before: dict | None = None, concept_set: ConceptSet | None = None) -> dict:
    """Efficacy, preservation and drift of ``edit`` (or of the pipeline as it is, for ``edit=None``).

    One batched, seeded generation pass: ``per_prompt`` images of the concept's probe prompts and
    ``per_other`` of each concept in ``others`` (default: the concept set's
    :meth:`~workbench.concepts.ConceptSet.others`, related then unrelated). ``before`` is this
    function's result on the unedited model with the same settings; it is measured first when not
    given, so pass it when scoring many edits.

    Returns ``accuracy`` (the judge's accuracy on the concept), ``efficacy`` (1 - accuracy) with
    ``efficacy_lo`` and ``efficacy_hi`` (Wilson's 95% interval over its ``n_images``), ``base_accuracy``,
    ``preservation`` (accuracy on the others as a share of the unedited model's; also ``_related`` and
    ``_unrelated``) with ``preservation_lo`` and ``preservation_hi`` (paired bootstrap over the other
    concepts; NaN with fewer than :data:`~workbench.stats.MIN_UNITS` of them), ``drift`` and ``drift_chance`` (see :func:`drift`),
    ``n_images``, ``labels`` (the judge's label for each image of the concept) and ``others`` (accuracy per
    other concept).
    """
    cs = _concept_set(pipe, concept_set)
    others = cs.others(concept) if others is None else list(others)
    settings = _settings(concept, others, per_prompt, per_other, seed)
    if edit is not None:
        if before is None:
            before = evaluate(pipe, judge, concept, None, concept_set=cs, **settings)
        with edit.apply(pipe):
            return evaluate(pipe, judge, concept, None, before=before, concept_set=cs, **settings)
    if before is not None and before.get("settings") != settings:
        raise ValueError(f"`before` was measured with other settings ({before.get('settings')}) than these "
                         f"({settings}); measure the baseline with the same others, counts and seed")
    preds = predictions(pipe, judge, [concept, *others], [per_prompt] + [per_other] * len(others), seed, cs)
    return {**_scores(preds, concept, others, before, cs), "settings": settings}


def _settings(concept: str, others: list[str], per_prompt: int, per_other: int, seed: int) -> dict:
    """The settings a baseline must share with a measurement, checked."""
    if per_prompt < 1 or per_other < 1:
        raise ValueError(f"per_prompt and per_other must be at least 1 (got {per_prompt}, {per_other})")
    if concept in others:
        raise ValueError(f"{concept!r} is in its own preservation set; give other concepts as `others`")
    return {"others": others, "per_prompt": per_prompt, "per_other": per_other, "seed": seed}


def _preservation_interval(preds: list[tuple[str, str]], concept: str, base: dict[str, float]) -> dict:
    """``preservation_lo`` and ``preservation_hi``: a paired bootstrap over the other concepts of their
    hits after over their hits before (the same images' count on both sides)."""
    counts: dict[str, list[int]] = {}
    for c, label in preds:
        if c != concept:
            counts.setdefault(c, [0, 0])
            counts[c][0] += label == c
            counts[c][1] += 1
    lo, hi = ratio_interval([h for h, _ in counts.values()], [base[c] * n for c, (_, n) in counts.items()])
    return {"preservation_lo": lo, "preservation_hi": hi}


def _scores(preds: list[tuple[str, str]], concept: str, others: list[str], before: dict | None,
            cs: ConceptSet) -> dict:
    """:func:`evaluate`'s numbers from the judge's labels (and the baseline's, when given)."""
    own = [label for c, label in preds if c == concept]
    acc = hits([(c, label) for c, label in preds if c != concept])
    base = before["others"] if before is not None else acc
    near = set(cs.related(concept))
    split = {"related": [c for c in others if c in near], "unrelated": [c for c in others if c not in near]}
    accuracy_now = float(np.mean([label == concept for label in own]))
    erased = wilson(sum(label != concept for label in own), len(own))
    return {
        "accuracy": accuracy_now,
        "efficacy": 1.0 - accuracy_now,
        "efficacy_lo": erased.lo,
        "efficacy_hi": erased.hi,
        "base_accuracy": before["accuracy"] if before is not None else accuracy_now,
        "preservation": preservation(acc, base) if others else float("nan"),
        **_preservation_interval(preds, concept, base),
        **{f"preservation_{k}": preservation({c: acc[c] for c in group}, {c: base[c] for c in group})
           if group else float("nan") for k, group in split.items()},
        **drift(own, concept, cs),
        "n_images": len(own),
        "labels": own,
        "others": acc,
    }
