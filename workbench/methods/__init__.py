"""Erasure methods. Each returns an :class:`~workbench.edits.Edit` and leaves the pipeline as it was.

:func:`erase` is the one entry point that picks a method by name and fills in the toy world's defaults
(the preserve list, the few-shot prompt kind); the methods themselves take every knob explicitly.

>>> import workbench
>>> from workbench.methods import erase
>>> pipe = workbench.load("toy")
>>> erase(pipe, "apple", "uce").params["preserve"][:2]
['a banana', 'a cherry']
"""
from __future__ import annotations

from typing import Any

from ..anatomy import Selector
from ..edits import Edit
from .fewshot import fewshot
from .rece import rece
from .uce import uce

METHODS = ("rece", "uce", "fewshot")

#: Few-shot learning rate on the toy model: the paper's 1e-5 leaves its small text encoder unchanged in
#: 8 steps; 5e-5 erases without drifting to related concepts (benchmarks/erasure.py).
TOY_FEWSHOT_LR = 5e-5


def erase(pipe, concept: str, method: str = "rece", parts: Selector | None = None, **knobs: Any) -> Edit:
    """Erase ``concept`` with ``method`` (``"rece"``, ``"uce"`` or ``"fewshot"``) scoped to ``parts``.

    On the toy model, for its concepts, the preserve list defaults to the other concepts of the same kind, and
    few-shot picks object or style prompts and, on the toy model, :data:`TOY_FEWSHOT_LR`; ``knobs`` go
    to the method unchanged (``progress`` only to few-shot, the one method that trains).
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
    return (rece if method == "rece" else uce)(pipe, concept, **knobs)


__all__ = ["erase", "uce", "rece", "fewshot", "METHODS", "TOY_FEWSHOT_LR"]
