"""Erasure methods. Each returns an :class:`~workbench.edits.Edit` and leaves the pipeline as it was.

:func:`erase` is the one entry point that picks a method by name and fills in the defaults of the
model's profile (:mod:`workbench.profile`: on the toy model, the prompts a concept is erased in, the
preserve list, the few-shot images and the toy's measured lambdas); the methods themselves take every
knob explicitly, with the papers' defaults.

>>> import workbench
>>> from workbench.methods import erase
>>> pipe = workbench.load("toy")
>>> edit = erase(pipe, "apple", "uce")
>>> edit.params["erase"]
['a photo of an apple', 'a picture of an apple', 'an icon of an apple', 'apple']
>>> edit.params["preserve"][:2]
['a photo of a banana', 'a picture of a banana']
>>> defaults(pipe, "uce")["lam"], defaults(object(), "uce")["lam"]    # the toy's lambda, the paper's
(2.0, 0.5)
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from ..anatomy import Selector
from ..edits import Edit
from ..profile import profile_of
from .esd import esd
from .fewshot import fewshot
from .rece import rece
from .uce import uce

#: Every method by name, in the order the panels list them.
METHODS: dict[str, Callable[..., Edit]] = {"rece": rece, "uce": uce, "fewshot": fewshot, "esd": esd}
#: Knobs ``erase()`` passes on only to methods that take them.
_OPTIONAL = ("seed", "progress")


def _method(method: str) -> Callable[..., Edit]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method]


def defaults(pipe, method: str) -> dict[str, Any]:
    """Every knob of ``method`` with its default on ``pipe``: the method's signature, then the model
    profile's method defaults (what :func:`erase` and the panels start from)."""
    params = inspect.signature(_method(method)).parameters
    values = {n: p.default for n, p in list(params.items())[2:] if p.default is not inspect.Parameter.empty}
    return {**values, **profile_of(pipe).defaults.get(method, {})}


def erase(pipe, concept: str, method: str = "rece", parts: Selector | None = None, **knobs: Any) -> Edit:
    """Erase ``concept`` with ``method`` (``"rece"``, ``"uce"``, ``"fewshot"`` or ``"esd"``) scoped to ``parts``.

    The model profile's defaults for the method and concept come first (:meth:`Profile.knobs
    <workbench.profile.Profile.knobs>`), then ``knobs``; ``seed`` and ``progress`` reach only methods
    that take them (the closed forms have no randomness and no training loop). A knob the method does
    not take is refused with the list of those it does.
    """
    fn = _method(method)
    accepted = list(inspect.signature(fn).parameters)[2:]
    unknown = [k for k in knobs if k not in accepted and k not in _OPTIONAL]
    if unknown:
        raise TypeError(f"{method} has no knob {', '.join(map(repr, unknown))}; its knobs: {', '.join(accepted)}")
    settings = {**profile_of(pipe).knobs(method, concept), **knobs}
    if parts is not None:
        settings["parts"] = parts
    target = concept if "prompts" in accepted else settings.pop("prompts", concept)
    edit = fn(pipe, target, **{k: v for k, v in settings.items() if k in accepted})
    edit.concept = concept
    return edit


__all__ = ["erase", "defaults", "uce", "rece", "fewshot", "esd", "METHODS"]
