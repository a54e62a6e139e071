"""Model profiles: what a loaded model brings with it (its concept set, its judge, method defaults).

``workbench.load("toy")`` attaches the toy world's profile; any other pipeline has the generic one (no
concept set, no judge, the papers' defaults) until you attach your own. :func:`workbench.methods.erase`
takes a profile's defaults before the caller's knobs; metrics take its concept set and judge when none
is given.

>>> import workbench
>>> profile_of(workbench.load("toy")).name
'toy'
>>> profile_of(object()).name
'generic'
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .concepts import ConceptSet
from .judges import Judge

_ATTR = "_workbench_profile"


@dataclass
class Profile:
    """A model's concept set, a way to load its judge, and its method defaults (method -> knobs)."""

    name: str
    concepts: ConceptSet | None = None
    load_judge: Callable[[], Judge] | None = None
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The bundled models this profile's world comes in, by the name :func:`workbench.load` takes
    #: (the toy world: ``("toy", "toy-dit")``); empty for a model loaded from a folder or the hub.
    models: tuple[str, ...] = ()
    _judge: Judge | None = field(default=None, repr=False, compare=False)

    def judge(self) -> Judge:
        """The model's judge, loaded on first use."""
        if self._judge is None:
            if self.load_judge is None:
                raise ValueError(f"the {self.name} profile has no judge: pass one (e.g. "
                                 "workbench.judges.ClipJudge.load(folder)) or attach a profile that has one")
            self._judge = self.load_judge()
        return self._judge

    def concept_set(self) -> ConceptSet:
        """The model's concept set; an error that says how to give one when it has none."""
        if self.concepts is None:
            raise ValueError(f"the {self.name} profile has no concept set: pass concept_set=ConceptSet.of(...) "
                             "or ConceptSet.load('data/concept_sets/imagenette.json')")
        return self.concepts

    def knobs(self, method: str, concept: str) -> dict[str, Any]:
        """``erase()``'s defaults for ``method`` on ``concept``: the method's defaults on this model and,
        for a concept of the concept set, its prompts, preserve list, kind and few-shot images."""
        knobs = dict(self.defaults.get(method, {}))
        cs = self.concepts
        if cs is not None and concept in cs:
            knobs.update(prompts=cs.prompts(concept), preserve=cs.preserve(concept), kind=cs.kind(concept))
            folder = cs.image_folder(concept)
            if folder is not None:
                knobs["images"] = folder
        return knobs


GENERIC = Profile("generic")


def attach(pipe, profile: Profile):
    """Give ``pipe`` a profile (returned for chaining)."""
    setattr(pipe, _ATTR, profile)
    return pipe


def profile_of(pipe) -> Profile:
    """The profile attached to ``pipe``, or the generic one."""
    return getattr(pipe, _ATTR, GENERIC)
