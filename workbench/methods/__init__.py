"""Erasure methods. Each returns an :class:`~workbench.edits.Edit` and leaves the pipeline as it was.

:func:`erase` is the one entry point that picks a method by name and fills in the toy world's defaults
(the erased and preserved prompts, the few-shot prompt kind); the methods themselves take every knob
explicitly.

>>> import workbench
>>> from workbench.methods import erase
>>> pipe = workbench.load("toy")
>>> edit = erase(pipe, "apple", "uce")
>>> edit.params["erase"]
['a photo of an apple', 'a picture of an apple', 'an icon of an apple', 'apple']
>>> edit.params["preserve"][:2]
['a photo of a banana', 'a picture of a banana']
"""
from __future__ import annotations

from typing import Any

from ..anatomy import Selector
from ..edits import Edit
from .fewshot import concept_prompts, fewshot
from .rece import rece
from .uce import uce

METHODS = ("rece", "uce", "fewshot")

#: Few-shot learning rate on the toy model: the paper's 1e-5 leaves its small text encoder unchanged in
#: 8 steps; 5e-5 erases without drifting to related concepts (benchmarks/erasure.py).
TOY_FEWSHOT_LR = 5e-5

#: UCE's and RECE's lambda on the toy model. A third of the directions of its text embeddings carry
#: almost nothing of the preserved prompts, so the papers' values (UCE 0.5, RECE's epochs 0.1) let an edit
#: move them freely and other concepts fade (preservation 79-89% for five of the 20 concepts); these keep
#: preservation at 93% or more and erase as much (benchmarks/erasure.py).
TOY_LAMBDA = {"uce": dict(lam=2.0), "rece": dict(uce_lam=2.0, lam=0.5)}


def erase(pipe, concept: str, method: str = "rece", parts: Selector | None = None, **knobs: Any) -> Edit:
    """Erase ``concept`` with ``method`` (``"rece"``, ``"uce"`` or ``"fewshot"``) scoped to ``parts``.

    On the toy model, for its concepts: UCE and RECE erase the concept in the prompt templates of its kind
    (:func:`concept_prompts`, the ones few-shot trains on) and keep :func:`workbench.metrics.preserve_prompts`,
    with :data:`TOY_LAMBDA`; few-shot picks object or style prompts and :data:`TOY_FEWSHOT_LR`. ``knobs`` go
    to the method unchanged and override those defaults (``progress`` only to few-shot, the one method that
    trains).
    """
    from ..metrics import kind_of, preserve_prompts
    from ..models import is_toy
    from ..toy.world import OBJECTS, PAINTERS

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    toy = is_toy(pipe) and concept in (*OBJECTS, *PAINTERS)
    if parts is not None:
        knobs["parts"] = parts
    progress = knobs.pop("progress", None)  # only few-shot trains, so only it has a progress bar
    if method == "fewshot":
        if progress is not None:
            knobs["progress"] = progress
        knobs.setdefault("kind", kind_of(concept) if toy else "object")
        if is_toy(pipe):
            knobs.setdefault("lr", TOY_FEWSHOT_LR)
        return fewshot(pipe, concept, **knobs)
    knobs.setdefault("preserve", preserve_prompts(concept) if toy else [])
    if toy:
        knobs = {**TOY_LAMBDA[method], **knobs}
    prompts = concept_prompts(concept, kind_of(concept)) if toy else concept
    edit = (rece if method == "rece" else uce)(pipe, prompts, **knobs)
    edit.concept = concept
    return edit


__all__ = ["erase", "uce", "rece", "fewshot", "concept_prompts", "METHODS", "TOY_FEWSHOT_LR", "TOY_LAMBDA"]
