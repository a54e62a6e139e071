"""Erase and measure in one call: the edit, the judge's accuracy before and after, and the figures.

This is what ``workbench demo``, the quickstart panel and the method comparison share.

>>> import workbench
>>> from workbench.report import erase_and_measure
>>> pipe = workbench.load("toy")
>>> result = erase_and_measure(pipe, None, "apple", "uce", concepts=["apple", "pear"], per_prompt=2)
>>> result.table()[["concept", "before", "after"]].shape
(2, 3)
>>> list(result.printed().columns)
['concept', 'kind', 'group', 'erased', 'n', 'before', 'after [95% interval]']
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pandas as pd
from matplotlib.figure import Figure

from .anatomy import Selector
from .concepts import ConceptSet
from .edits import Edit, applied
from .judges import Judge
from .methods import erase, quick
from .metrics import accuracy, preservation
from .plots import accuracy_bars, image_grid
from .profile import profile_of
from .sampling import generate
from .stats import Rate, ratio_interval, wilson, with_intervals


def showcase(pipe, concept: str) -> list[str]:
    """Prompts that show an erasure at a glance (the model's concept set's
    :meth:`~workbench.concepts.ConceptSet.showcase`; for a model without one, the concept itself)."""
    concepts = profile_of(pipe).concepts
    return concepts.showcase(concept) if concepts is not None else [concept, f"a picture of {concept}"]


def before_after(pipe, edit: Edit, prompts: Sequence[str], n: int = 4, seed: int = 0) -> Figure:
    """One row per prompt: ``n`` images before the edit, then the same seeds after it."""
    rows = []
    for prompt in prompts:
        row = generate(pipe, [prompt] * n, seed, batch=n)
        with edit.apply(pipe):
            row += generate(pipe, [prompt] * n, seed, batch=n)
        rows.append(row)
    return image_grid(rows, list(prompts), ["before"] * n + ["after"] * n)


@dataclass
class Erasure:
    """An edit and the judge's accuracy per concept before and after it."""

    concept: str
    edit: Edit
    before: dict[str, float]
    after: dict[str, float]
    per_prompt: int
    seed: int
    concept_set: ConceptSet
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def others(self) -> list[str]:
        return [c for c in self.before if c != self.concept]

    @property
    def efficacy(self) -> float:
        """1 - accuracy on the erased concept after the edit (higher is a stronger erasure), as in
        :func:`workbench.metrics.evaluate`."""
        return 1.0 - self.after[self.concept]

    @property
    def preservation(self) -> float:
        """Accuracy on the other concepts after the edit, as a fraction of before."""
        return preservation({c: self.after[c] for c in self.others}, {c: self.before[c] for c in self.others})

    @property
    def efficacy_rate(self) -> Rate:
        """Efficacy as ``k`` erased of ``n`` images with Wilson's 95% interval."""
        return wilson(round(self.efficacy * self.per_prompt), self.per_prompt)

    @property
    def preservation_interval(self) -> tuple[float, float]:
        """Preservation's 95% interval, a paired bootstrap over the other concepts (NaN with fewer than
        :data:`~workbench.stats.MIN_UNITS` of them)."""
        return ratio_interval([self.after[c] * self.per_prompt for c in self.others],
                              [self.before[c] * self.per_prompt for c in self.others])

    def table(self) -> pd.DataFrame:
        """One row per concept measured: kind, group, images per concept (``n``), accuracy before and after,
        and the after accuracy's Wilson 95% interval (``after_lo``, ``after_hi``)."""
        cs = self.concept_set
        rows = []
        for c in self.before:
            after = wilson(round(self.after[c] * self.per_prompt), self.per_prompt)
            rows.append({"concept": c, "kind": cs.kind(c), "group": cs.group(c), "erased": c == self.concept,
                         "n": self.per_prompt, "before": self.before[c], "after": self.after[c],
                         "after_lo": after.lo, "after_hi": after.hi})
        return pd.DataFrame(rows)

    def printed(self) -> pd.DataFrame:
        """:meth:`table` as a paper prints it: accuracies as percentages, the after one with its interval."""
        t = with_intervals(self.table())
        return t.assign(before=[f"{b:.0%}" for b in t["before"]]).rename(columns={"after": "after [95% interval]"})

    def figure(self) -> Figure:
        return accuracy_bars(self.before, self.after, f"{self.edit.method} erases {self.concept!r}")

    def report(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "concept": self.concept, "method": self.edit.method, "edit_seconds": self.edit.seconds,
            "accuracy_on_concept": {"before": self.before[self.concept], "after": self.after[self.concept]},
            "efficacy": self.efficacy,
            "accuracy_on_others": {k: sum(d[c] for c in self.others) / max(1, len(self.others))
                                   for k, d in (("before", self.before), ("after", self.after))},
            "preservation": self.preservation, "per_concept": {"before": self.before, "after": self.after},
            "images_per_concept": self.per_prompt, "seed": self.seed,
            "params": {k: v for k, v in self.edit.params.items() if k != "scores"},
        }


#: The unedited model's accuracy per pipeline and setting, measured once (forgotten with the pipeline).
_BASE: "weakref.WeakKeyDictionary[object, dict[tuple, dict[str, float]]]" = weakref.WeakKeyDictionary()


def erase_and_measure(pipe, judge: Judge | None, concept: str, method: str = "rece", parts: Selector | None = None,
                      concepts: Sequence[str] | None = None, per_prompt: int = 4, seed: int = 0,
                      concept_set: ConceptSet | None = None, **knobs: Any) -> Erasure:
    """Erase ``concept`` and measure the judge's accuracy on ``concepts`` (default: the concept and the
    concept set's :meth:`~workbench.concepts.ConceptSet.others`, its related concepts and three unrelated
    ones). ``judge`` and ``concept_set`` default to the model profile's.

    The unedited model's accuracy is computed once per pipeline and setting, then reused. ``seed`` seeds
    the images and, for methods that train, the training.
    """
    profile = profile_of(pipe)
    judge = judge if judge is not None else profile.judge()
    cs = concept_set if concept_set is not None else profile.concept_set()
    concepts = list(concepts) if concepts is not None else [concept, *cs.others(concept)]
    if concept not in concepts:
        concepts.insert(0, concept)
    key = (tuple(id(e) for e in applied(pipe)), id(judge), id(cs), tuple(concepts), per_prompt, seed)
    base = _BASE.setdefault(pipe, {})
    if key not in base:
        base[key] = accuracy(pipe, judge, concepts, per_prompt, seed, cs)
    edit = erase(pipe, concept, method, parts, **{"seed": seed, **knobs})
    with edit.apply(pipe):
        after = accuracy(pipe, judge, concepts, per_prompt, seed, cs)
    return Erasure(concept, edit, dict(base[key]), after, per_prompt, seed, cs)


def compare(pipe, judge: Judge | None, concepts: Sequence[str], methods: Sequence[str] | None = None,
            per_prompt: int = 4, seed: int = 0, on_step: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Erase each concept with each method (default: all but the slow ones, :func:`workbench.methods.quick`);
    one row per (method, concept): images of the concept (``n``),
    accuracy on it before and after, efficacy (1 - after) and preservation of its neighbourhood, each with
    its 95% interval (``_lo``, ``_hi``; see :class:`Erasure`), seconds, and the edit's total ``||dW||``.
    ``on_step(label)`` is called after each erasure (for progress bars)."""
    rows = []
    for concept in concepts:
        for method in quick() if methods is None else methods:
            r = erase_and_measure(pipe, judge, concept, method, per_prompt=per_prompt, seed=seed, progress=False)
            summary = r.edit.summary(pipe)
            lo, hi = r.preservation_interval
            rows.append({"method": method, "concept": concept, "kind": r.concept_set.kind(concept), "n": per_prompt,
                         "before": r.before[concept], "after": r.after[concept], "efficacy": r.efficacy,
                         "efficacy_lo": r.efficacy_rate.lo, "efficacy_hi": r.efficacy_rate.hi,
                         "preservation": r.preservation, "preservation_lo": lo, "preservation_hi": hi,
                         "seconds": r.edit.seconds, "dW": float((summary["dW"] ** 2).sum() ** 0.5),
                         "relative dW": float(summary["relative"].mean()), "parts": len(summary)})
            if on_step is not None:
                on_step(f"{method} on {concept!r}")
    return pd.DataFrame(rows)
