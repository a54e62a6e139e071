"""Efficacy and preservation of an erasure, measured by the toy world's oracle.

*Accuracy on the erased concept* is the share of images, generated from the concept's prompts, in which
the oracle still sees the concept (lower is a stronger erasure). *Preservation* is the oracle's accuracy
on every other concept's prompts, as a fraction of the unedited model's accuracy on them.

>>> import workbench
>>> from workbench.metrics import accuracy
>>> from workbench.toy.oracle import Oracle
>>> pipe = workbench.load("toy")
>>> accuracy(pipe, Oracle.load(), ["apple", "van gogh"], per_prompt=4)
{'apple': 1.0, 'van gogh': 1.0}
"""
from __future__ import annotations

import numpy as np

from .models import seeded
from .toy.world import OBJECTS, PAINTERS, a

GUIDANCE, STEPS = 5.0, 20


def kind_of(concept: str) -> str:
    """``"object"`` or ``"style"`` for a toy-world concept."""
    if concept in OBJECTS:
        return "object"
    if concept in PAINTERS:
        return "style"
    raise ValueError(f"{concept!r} is not a toy-world concept; objects: {', '.join(OBJECTS)}; "
                     f"styles: {', '.join(PAINTERS)}")


def probe(concept: str, per_prompt: int) -> tuple[list[str], str]:
    """Prompts that should show ``concept``, and the oracle head that checks it.

    Objects cycle through four phrasings ("an apple", "an icon of an apple", "a blue apple",
    "an apple by seurat"), styles through objects ("a cat by van gogh", ...).
    """
    if kind_of(concept) == "object":
        forms = (a(concept), f"an icon of {a(concept)}", f"a blue {concept}", f"{a(concept)} by seurat")
        return [forms[k % len(forms)] for k in range(per_prompt)], "object"
    objects = [OBJECTS[(k * 5) % len(OBJECTS)] for k in range(per_prompt)]
    return [f"{a(o)} by {concept}" for o in objects], "style"


def preserve_prompts(concept: str) -> list[str]:
    """A preserve list for erasing a toy concept: every other object, or every other painter's style."""
    if kind_of(concept) == "object":
        return [a(o) for o in OBJECTS if o != concept]
    return [f"{a(o)} by {p}" for p in PAINTERS if p != concept for o in OBJECTS[::3]] + [a(o) for o in OBJECTS]


def accuracy(pipe, oracle, concepts: list[str], per_prompt: int = 8, seed: int = 1234) -> dict[str, float]:
    """The oracle's accuracy on each concept's prompts, all images generated in batches."""
    prompts, heads, wanted = [], [], []
    for c in concepts:
        ps, head = probe(c, per_prompt)
        prompts += ps
        heads += [head] * len(ps)
        wanted += [c] * len(ps)
    images = []
    for i in range(0, len(prompts), 32):
        images += pipe(prompts[i:i + 32], num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                       generator=seeded(seed + i)).images
    preds = oracle.predict(images)
    hits = [p[h] == w for p, h, w in zip(preds, heads, wanted)]
    return {c: float(np.mean([h for h, w in zip(hits, wanted) if w == c])) for c in concepts}


def preservation(after: dict[str, float], before: dict[str, float]) -> float:
    """Mean accuracy on other concepts after an edit, as a fraction of the unedited model's."""
    return float(np.mean(list(after.values())) / max(1e-9, np.mean(list(before.values()))))
