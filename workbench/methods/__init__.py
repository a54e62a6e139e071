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


def erase(pipe, concept: str, method: str = "rece", parts: Selector | None = None, **knobs: Any) -> Edit:
    """Erase ``concept`` with ``method`` (``"rece"``, ``"uce"`` or ``"fewshot"``) scoped to ``parts``.

    For toy-world concepts the preserve list defaults to the other concepts of the same kind, and
    few-shot picks object or style prompts; ``knobs`` go to the method unchanged.
    """
    from ..metrics import kind_of, preserve_prompts
    from ..toy.world import OBJECTS, PAINTERS

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    toy = concept in (*OBJECTS, *PAINTERS)
    if parts is not None:
        knobs["parts"] = parts
    if method == "fewshot":
        knobs.setdefault("kind", kind_of(concept) if toy else "object")
        return fewshot(pipe, concept, **knobs)
    knobs.setdefault("preserve", preserve_prompts(concept) if toy else [])
    return (rece if method == "rece" else uce)(pipe, concept, **knobs)


__all__ = ["erase", "uce", "rece", "fewshot", "METHODS"]
