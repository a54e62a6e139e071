"""Erase and measure in one call: the edit, the oracle's accuracy before and after, and the figures.

This is what ``workbench demo``, the quickstart panel and the method comparison share.

>>> import workbench
>>> from workbench.report import erase_and_measure
>>> from workbench.toy.oracle import Oracle
>>> pipe = workbench.load("toy")
>>> result = erase_and_measure(pipe, Oracle.load(), "apple", "uce", concepts=["apple", "pear"], per_prompt=2)
>>> result.table()[["concept", "before", "after"]].shape
(2, 3)
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pandas as pd
from matplotlib.figure import Figure

from .anatomy import Selector
from .edits import Edit, applied
from .methods import erase
from .metrics import accuracy, default_others, kind_of, preservation
from .models import seeded
from .plots import accuracy_bars, image_grid
from .toy.world import GROUP_OF, GROUPS, OBJECTS, PAINTERS, a

STEPS, GUIDANCE = 20, 5.0


def showcase(concept: str) -> list[str]:
    """Prompts that show an erasure at a glance: the concept, two related concepts and an unrelated one."""
    if concept not in (*OBJECTS, *PAINTERS):
        return [concept, f"a picture of {concept}"]
    if kind_of(concept) == "object":
        group = GROUP_OF[concept]
        shown = [concept, *[o for o in GROUPS[group] if o != concept][:2], "car" if group != "vehicle" else "cat"]
        return [f"an icon of {a(c)}" for c in shown]
    other = next(p for p in PAINTERS if p != concept)
    return [f"a cat by {concept}", f"a boat by {concept}", "a cat", f"a cat by {other}"]


def before_after(pipe, edit: Edit, prompts: Sequence[str], n: int = 4, seed: int = 0) -> Figure:
    """One row per prompt: ``n`` images before the edit, then the same seeds after it."""
    rows = []
    for prompt in prompts:
        row = pipe([prompt] * n, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=seeded(seed)).images
        with edit.apply(pipe):
            row += pipe([prompt] * n, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                        generator=seeded(seed)).images
        rows.append(row)
    return image_grid(rows, list(prompts), ["before"] * n + ["after"] * n)


@dataclass
class Erasure:
    """An edit and the oracle's accuracy per concept before and after it."""

    concept: str
    edit: Edit
    before: dict[str, float]
    after: dict[str, float]
    per_prompt: int
    seed: int
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

    def table(self) -> pd.DataFrame:
        """One row per concept measured: kind, group, accuracy before and after."""
        return pd.DataFrame([{"concept": c, "kind": kind_of(c),
                              "group": GROUP_OF.get(c, "style"), "erased": c == self.concept,
                              "before": self.before[c], "after": self.after[c]} for c in self.before])

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


def erase_and_measure(pipe, oracle, concept: str, method: str = "rece", parts: Selector | None = None,
                      concepts: Sequence[str] | None = None, per_prompt: int = 4, seed: int = 0,
                      **knobs: Any) -> Erasure:
    """Erase a toy concept and measure accuracy on ``concepts`` (default: the concept and
    :func:`workbench.metrics.default_others`, its related concepts and three unrelated objects).

    The unedited model's accuracy is computed once per pipeline and setting, then reused. ``seed`` seeds
    the images and, for few-shot, the training.
    """
    concepts = list(concepts) if concepts is not None else [concept, *default_others(concept)]
    if concept not in concepts:
        concepts.insert(0, concept)
    key = (tuple(id(e) for e in applied(pipe)), tuple(concepts), per_prompt, seed)
    base = _BASE.setdefault(pipe, {})
    if key not in base:
        base[key] = accuracy(pipe, oracle, concepts, per_prompt, seed)
    if method == "fewshot":
        knobs.setdefault("seed", seed)
    edit = erase(pipe, concept, method, parts, **knobs)
    with edit.apply(pipe):
        after = accuracy(pipe, oracle, concepts, per_prompt, seed)
    return Erasure(concept, edit, dict(base[key]), after, per_prompt, seed)


def compare(pipe, oracle, concepts: Sequence[str], methods: Sequence[str] = ("rece", "uce", "fewshot"),
            per_prompt: int = 4, seed: int = 0, on_step: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Erase each concept with each method; one row per (method, concept): accuracy on the concept
    before and after, efficacy (1 - after), preservation of its neighbourhood, seconds, and the edit's total ``||dW||``.
    ``on_step(label)`` is called after each erasure (for progress bars)."""
    rows = []
    for concept in concepts:
        for method in methods:
            r = erase_and_measure(pipe, oracle, concept, method, per_prompt=per_prompt, seed=seed, progress=False)
            summary = r.edit.summary(pipe)
            rows.append({"method": method, "concept": concept, "kind": kind_of(concept),
                         "before": r.before[concept], "after": r.after[concept], "efficacy": r.efficacy, "preservation": r.preservation,
                         "seconds": r.edit.seconds, "dW": float((summary["dW"] ** 2).sum() ** 0.5),
                         "relative dW": float(summary["relative"].mean()), "parts": len(summary)})
            if on_step is not None:
                on_step(f"{method} on {concept!r}")
    return pd.DataFrame(rows)
