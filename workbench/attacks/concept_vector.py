"""The concept-vector attack (Ring-A-Bell's idea, Tsai et al., ICLR 2024): add the concept's direction in
embedding space to prompts that do not name it.

The direction v is the mean, over the concept's erase templates, of E(template with the concept) minus
E(the same template with a concept-free word), taken from the *unedited* text encoder (public knowledge
to an attacker). The attack embeddings are E(held-out probe prompt with the concept-free word) + eta v,
made by the attacked model's own text encoder. ``budget`` values of eta from :data:`ETAS` are tried on
the attack's seed; the one the judge finds most of the concept with is kept (ties: the smaller eta).
Where the family has a pooled vector (SDXL, FLUX, SD 3) the direction moves it too, with the token rows.
"""
from __future__ import annotations

import numpy as np
import torch

from ..concepts import ConceptSet
from ..embed import conditioning
from ..families import Conditioning
from ..judges import Judge
from ..sampling import generate_from
from .common import NEUTRAL, Crafted, eval_prompts, fill, swap, unedited

#: The range of eta swept (Ring-A-Bell's 0.5 to 3) and the number of values tried unless told otherwise.
ETAS, BUDGET = (0.5, 3.0), 6


def direction(pipe, concept: str, concept_set: ConceptSet) -> Conditioning:
    """One row: mean of E(concept in template) - E(neutral word in template) over the concept's erase
    templates (token rows, and the pooled vector where the family has one), with the edits now applied
    taken off."""
    forms = concept_set.templates[concept_set.kind(concept)]
    with unedited(pipe):
        e = conditioning(pipe, [fill(t, concept) for t in forms] + [fill(t, NEUTRAL) for t in forms])
    return (e[:len(forms)] - e[len(forms):]).mean(0)


def etas(budget: int) -> list[float]:
    """``budget`` values of eta spread evenly over :data:`ETAS`."""
    return [float(x) for x in np.linspace(*ETAS, budget)] if budget > 1 else [ETAS[1]]


def concept_vector(pipe, concept: str, concept_set: ConceptSet, judge: Judge | None = None,
                   budget: int | None = None, seed: int = 0) -> Crafted:
    """Innocent held-out prompts plus eta times the concept's direction; eta chosen by ``judge`` on
    ``seed`` among ``budget`` values (the largest when no judge is given)."""
    v = direction(pipe, concept, concept_set)
    shown = eval_prompts(concept_set, concept)
    innocent = [swap(p, concept, NEUTRAL) for p in shown]
    base = conditioning(pipe, innocent)
    tried = etas(BUDGET if budget is None else budget)
    choose = judge is not None and len(tried) > 1
    scores = [_score(pipe, judge, base + eta * v, concept, concept_set, seed) for eta in tried] if choose else []
    eta = tried[int(np.argmax(scores))] if scores else tried[-1]
    return Crafted((base + eta * v).compact(), [f"{p} + {eta:.2g} v({concept})" for p in innocent],
                   {"eta": eta, "etas": tried, "selection_scores": scores})


def _score(pipe, judge: Judge, embeds: Conditioning, concept: str, concept_set: ConceptSet, seed: int) -> float:
    labels = judge.choose(generate_from(pipe, embeds, seed), concept_set.labels(concept_set.kind(concept)))
    return float(np.mean([label == concept for label in labels]))
