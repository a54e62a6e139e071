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

:func:`evaluate` is the quick measure a layer sweep runs after every edit: a few images of the concept
(efficacy, drift) and of a fixed set of related and unrelated concepts (preservation), all generated in
one batched, seeded pass, against a baseline of the unedited model that is measured once and reused.

>>> from workbench.methods import uce
>>> scores = evaluate(pipe, Oracle.load(), "apple", edit=uce(pipe, "apple"), per_prompt=1, per_other=1,
...                   others=["banana", "car"])
>>> sorted(k for k in scores if k.startswith("preservation"))
['preservation', 'preservation_related', 'preservation_unrelated']
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .models import seeded
from .toy.world import GROUP_OF, GROUPS, OBJECTS, PAINTERS, a

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
    """A preserve list for erasing a toy concept: every other object and style, each in the prompt
    templates of its kind (the same templates the concept itself is erased in, so that what the erased
    prompts share with others, "a photo of", "a painting by", is kept).

    >>> preserve_prompts("apple")[:2]
    ['a photo of a banana', 'a picture of a banana']
    """
    from .methods.fewshot import concept_prompts

    kind_of(concept)  # a concept outside the toy world gets kind_of's error
    return [p for other in (*OBJECTS, *PAINTERS) if other != concept
            for p in concept_prompts(other, kind_of(other))]


def predictions(pipe, oracle, concepts: Sequence[str], per_prompt: int | Sequence[int] = 8,
                seed: int = 1234) -> list[tuple[str, str, dict[str, str]]]:
    """Generate each concept's probe images (in seeded batches of 32) and classify them with ``oracle``.

    ``per_prompt`` is one count for every concept or one per concept. Returns ``(concept, head,
    prediction)`` per image, in prompt order; ``prediction`` is the oracle's dict of labels.
    """
    counts = [per_prompt] * len(concepts) if isinstance(per_prompt, int) else list(per_prompt)
    if len(counts) != len(concepts):
        raise ValueError(f"give one image count or one per concept ({len(concepts)}), not {len(counts)}")
    prompts, heads, wanted = [], [], []
    for c, n in zip(concepts, counts):
        ps, head = probe(c, n)
        prompts += ps
        heads += [head] * len(ps)
        wanted += [c] * len(ps)
    images = []
    for i in range(0, len(prompts), 32):
        images += pipe(prompts[i:i + 32], num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                       generator=seeded(seed + i)).images
    return list(zip(wanted, heads, oracle.predict(images) if images else []))


def accuracy(pipe, oracle, concepts: list[str], per_prompt: int = 8, seed: int = 1234) -> dict[str, float]:
    """The oracle's accuracy on each concept's prompts, all images generated in batches."""
    return hits(predictions(pipe, oracle, concepts, per_prompt, seed))


def hits(preds: Sequence[tuple[str, str, dict[str, str]]]) -> dict[str, float]:
    """Per concept, the share of its images in which the oracle sees it (``predictions``'s output)."""
    seen: dict[str, list[bool]] = {}
    for c, head, pred in preds:
        seen.setdefault(c, []).append(pred[head] == c)
    return {c: float(np.mean(v)) for c, v in seen.items()}


def preservation(after: dict[str, float], before: dict[str, float]) -> float:
    """Mean accuracy on other concepts after an edit, as a fraction of the unedited model's."""
    return float(np.mean(list(after.values())) / max(1e-9, np.mean(list(before.values()))))


def related(concept: str) -> tuple[str, ...]:
    """The concepts an erased ``concept`` may drift to: the rest of its object group, or the other painters."""
    if kind_of(concept) == "object":
        return tuple(o for o in GROUPS[GROUP_OF[concept]] if o != concept)
    return tuple(p for p in PAINTERS if p != concept)


def default_others(concept: str) -> list[str]:
    """A fixed preservation set for ``concept``: its related concepts, then three unrelated objects
    (the first object of each other group)."""
    own = GROUP_OF.get(concept)
    return [*related(concept), *[objs[0] for g, objs in GROUPS.items() if g != own][:3]]


def drift(preds: Sequence[dict[str, str]], concept: str) -> dict[str, float]:
    """Where an erased object went: the share of its images the oracle calls a *related* object (same
    group, not the concept itself), and the share expected by chance.

    Chance spreads the images that no longer show the concept uniformly over the other objects, so
    ``drift > drift_chance`` means erased images land on related objects more often than on unrelated
    ones. Groups are object groups; for a style both values are NaN.

    >>> preds = [{"object": o} for o in ("apple", "pear", "banana", "car")]
    >>> drift(preds, "apple")
    {'drift': 0.5, 'drift_chance': 0.15}
    """
    if kind_of(concept) == "style" or not preds:
        return {"drift": float("nan"), "drift_chance": float("nan")}
    near = related(concept)
    moved = sum(p["object"] != concept for p in preds) / len(preds)
    return {"drift": sum(p["object"] in near for p in preds) / len(preds),
            "drift_chance": moved * len(near) / (len(OBJECTS) - 1)}


def evaluate(pipe, oracle, concept: str, edit=None, others: Sequence[str] | None = None,
             per_prompt: int = 8, per_other: int = 4, seed: int = 1234, before: dict | None = None) -> dict:
    """Efficacy, preservation and drift of ``edit`` (or of the pipeline as it is, for ``edit=None``).

    One batched, seeded generation pass: ``per_prompt`` images of the concept's probe prompts and
    ``per_other`` of each concept in ``others`` (default :func:`default_others`: related, then
    unrelated). ``before`` is this function's result on the unedited model with the same settings;
    it is measured first when not given, so pass it when scoring many edits.

    Returns ``accuracy`` (oracle accuracy on the concept), ``efficacy`` (1 - accuracy),
    ``base_accuracy``, ``preservation`` (accuracy on the others as a share of the unedited model's;
    also ``_related`` and ``_unrelated``), ``drift`` and ``drift_chance`` (see :func:`drift`),
    ``n_images`` and ``others`` (accuracy per other concept).
    """
    others = default_others(concept) if others is None else list(others)
    if per_prompt < 1 or per_other < 1:
        raise ValueError(f"per_prompt and per_other must be at least 1 (got {per_prompt}, {per_other})")
    if concept in others:
        raise ValueError(f"{concept!r} is in its own preservation set; give other concepts as `others`")
    settings = {"others": others, "per_prompt": per_prompt, "per_other": per_other, "seed": seed}
    if edit is not None:
        if before is None:
            before = evaluate(pipe, oracle, concept, None, **settings)
        with edit.apply(pipe):
            return evaluate(pipe, oracle, concept, None, before=before, **settings)
    if before is not None and before.get("settings") != settings:
        raise ValueError(f"`before` was measured with other settings ({before.get('settings')}) than these "
                         f"({settings}); measure the baseline with the same others, counts and seed")
    preds = predictions(pipe, oracle, [concept, *others], [per_prompt] + [per_other] * len(others), seed)
    own = [p for c, _, p in preds if c == concept]
    head = preds[0][1]
    acc = {c: float(np.mean([p[h] == c for k, h, p in preds if k == c])) for c in others}
    base = before["others"] if before is not None else acc
    near = set(related(concept))
    split = {"related": [c for c in others if c in near], "unrelated": [c for c in others if c not in near]}
    accuracy_now = float(np.mean([p[head] == concept for p in own]))
    return {
        "accuracy": accuracy_now,
        "efficacy": 1.0 - accuracy_now,
        "base_accuracy": before["accuracy"] if before is not None else accuracy_now,
        "preservation": preservation(acc, base) if others else float("nan"),
        **{f"preservation_{k}": preservation({c: acc[c] for c in cs}, {c: base[c] for c in cs})
           if cs else float("nan") for k, cs in split.items()},
        **drift(own, concept),
        "n_images": len(own),
        "others": acc,
        "settings": settings,
    }

