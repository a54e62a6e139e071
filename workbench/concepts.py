"""Concept sets: which concepts a model knows, how to prompt them, and which are their neighbours.

A concept set is what metrics, sweeps and reports need to measure an erasure on any model: each
concept's *kind* (``"object"`` or ``"style"``), its *group* (concepts of one group are related: where an
erased concept may drift), the prompt templates it is erased in, the probe prompts that should show it,
and the labels a judge chooses among. The toy world has one (:data:`workbench.toy.TOY_CONCEPTS`); for
Stable Diffusion, write one as a Python list or a small JSON file (``data/concept_sets/``).

>>> cs = ConceptSet.of(objects=["church", "parachute", "golf ball"], styles=["van gogh", "monet"])
>>> cs.prompts("church")
['a photo of a church', 'a picture of a church', 'an icon of a church', 'church']
>>> cs.probe("monet", 2)
['a cat by monet', 'a painting of a house by monet']
>>> cs.related("van gogh"), cs.labels("object")
(('monet',), ('church', 'parachute', 'golf ball'))
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

KINDS = ("object", "style")

#: Prompt templates an erasure erases a concept in. ``{a}``: the concept with its article, ``{c}``: the concept.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": ("a photo of {a}", "a picture of {a}", "an icon of {a}", "{c}"),
    "style": ("a painting in the style of {c}", "a painting by {c}", "art by {c}", "{c}"),
}
#: Probe templates: prompts that should show the concept (``{subject}``: one of ``subjects``, in turn).
PROBES: dict[str, tuple[str, ...]] = {
    "object": ("a photo of {a}", "{a}", "a picture of {a}", "a close-up photo of {a}"),
    "style": ("{subject} by {c}", "a painting of {subject} by {c}"),
}
SUBJECTS = ("a cat", "a house", "a tree", "a woman", "a city street", "a ship", "flowers", "a mountain")


def article(word: str) -> str:
    """'a' or 'an' for ``word``."""
    return "an" if word[:1].lower() in tuple("aeiou") else "a"


def a(word: str) -> str:
    """``word`` with its indefinite article: ``a("apple") == "an apple"``."""
    return f"{article(word)} {word}"


@dataclass
class ConceptSet:
    """Concepts of a model, with what measuring an erasure of each needs (see the module doc).

    ``kinds`` maps each concept to its kind, in order; ``groups`` each concept to its group (default:
    one group per kind); ``label_sets`` gives, per kind, the labels a judge chooses among (default: the
    concepts of that kind). ``images`` is a folder of few-shot image folders, one per concept
    (``images/van-gogh/``); ``vocabulary`` a word list for landing maps; ``colours`` a plot colour per group.
    """

    kinds: dict[str, str]
    groups: dict[str, str] = field(default_factory=dict)
    templates: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(TEMPLATES))
    probes: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(PROBES))
    subjects: tuple[str, ...] = SUBJECTS
    label_sets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    images: Path | None = None
    vocabulary: Path | None = None
    colours: dict[str, str] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        bad = {c: k for c, k in self.kinds.items() if k not in KINDS}
        if bad:
            raise ValueError(f"unknown kind for {', '.join(map(repr, bad))}: a concept is one of {', '.join(KINDS)}")
        self.groups = {c: self.groups.get(c, self.kinds[c]) for c in self.kinds}
        for kind in KINDS:
            self.label_sets.setdefault(kind, tuple(c for c, k in self.kinds.items() if k == kind))

    @classmethod
    def of(cls, objects: Sequence[str] = (), styles: Sequence[str] = (), **options: Any) -> "ConceptSet":
        """A concept set from lists of object and style names (``groups``: group name -> members)."""
        groups = {c: g for g, members in options.pop("groups", {}).items() for c in members}
        return cls({**{o: "object" for o in objects}, **{s: "style" for s in styles}}, groups, **options)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ConceptSet":
        """Read a JSON file: ``{"name", "objects", "styles", "groups", "templates", "probes", "subjects",
        "labels"}``, every key but one of objects/styles optional; relative paths ("images",
        "vocabulary") are relative to the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no concept-set file at {path}; write a JSON file with at least "
                                    '{"objects": [...]} or {"styles": [...]}')
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from e
        known = {"name", "objects", "styles", "groups", "templates", "probes", "subjects", "labels", "images",
                 "vocabulary", "colours"}
        unknown = sorted(set(spec) - known)
        if unknown or not (spec.get("objects") or spec.get("styles")):
            raise ValueError(f"{path}: " + (f"unknown keys {', '.join(unknown)}; " if unknown else "no concepts; ")
                             + f"a concept set has the keys {', '.join(sorted(known))} and needs objects or styles")
        options: dict[str, Any] = {"name": spec.get("name", path.stem), "groups": spec.get("groups", {})}
        for key in ("templates", "probes"):
            if key in spec:
                options[key] = {**(TEMPLATES if key == "templates" else PROBES),
                                **{k: tuple(v) for k, v in spec[key].items()}}
        if "subjects" in spec:
            options["subjects"] = tuple(spec["subjects"])
        if "labels" in spec:
            options["label_sets"] = {k: tuple(v) for k, v in spec["labels"].items()}
        for key in ("images", "vocabulary"):
            if key in spec:
                options[key] = path.parent / spec[key]
        if "colours" in spec:
            options["colours"] = dict(spec["colours"])
        return cls.of(spec.get("objects", ()), spec.get("styles", ()), **options)

    @property
    def names(self) -> list[str]:
        """Every concept, in order."""
        return list(self.kinds)

    def __contains__(self, concept: object) -> bool:
        return concept in self.kinds

    def kind(self, concept: str) -> str:
        """``"object"`` or ``"style"``."""
        if concept not in self.kinds:
            raise ValueError(f"{concept!r} is not in the concept set {self.name or ''}; its concepts: "
                             f"{', '.join(self.kinds)}")
        return self.kinds[concept]

    def group(self, concept: str) -> str:
        self.kind(concept)
        return self.groups[concept]

    def prompts(self, concept: str) -> list[str]:
        """The prompts an erasure erases ``concept`` in: the templates of its kind, filled in."""
        return [t.format(a=a(concept), c=concept) for t in self.templates[self.kind(concept)]]

    def probe(self, concept: str, n: int) -> list[str]:
        """``n`` prompts that should show ``concept``, cycling through the probe templates of its kind."""
        forms = self.probes[self.kind(concept)]
        return [forms[k % len(forms)].format(a=a(concept), c=concept, subject=self.subjects[k % len(self.subjects)])
                for k in range(n)]

    def held_out(self, concept: str, n: int) -> list[str]:
        """``n`` probe prompts of ``concept`` that are not among the prompts it is erased in (fewer when the
        probes have fewer distinct held-out wordings): where an erasure is judged, never where it was built."""
        erased = set(self.prompts(concept))
        forms = self.probes[self.kind(concept)]
        out = [p for p in dict.fromkeys(self.probe(concept, n + len(forms) * len(self.subjects))) if p not in erased]
        return out[:n]

    def preserve(self, concept: str) -> list[str]:
        """Every other concept in the templates of its kind (what an erasure of ``concept`` keeps)."""
        self.kind(concept)
        return [p for other in self.kinds if other != concept for p in self.prompts(other)]

    def related(self, concept: str) -> tuple[str, ...]:
        """The other concepts of its group: where an erased concept may drift."""
        group = self.group(concept)
        return tuple(c for c, g in self.groups.items() if g == group and c != concept)

    def others(self, concept: str, unrelated: int = 3) -> list[str]:
        """A preservation set: the related concepts, then the first concept of each of ``unrelated``
        other groups."""
        own = self.group(concept)
        firsts = {g: c for c, g in reversed(list(self.groups.items()))}
        order = list(dict.fromkeys(self.groups.values()))
        return [*self.related(concept), *[firsts[g] for g in order if g != own][:unrelated]]

    def labels(self, kind: str) -> tuple[str, ...]:
        """The labels a judge chooses among for a concept of ``kind``."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; kinds are {', '.join(KINDS)}")
        return self.label_sets[kind]

    def showcase(self, concept: str) -> list[str]:
        """Prompts that show an erasure at a glance: the concept, two related concepts and an unrelated one."""
        if concept not in self.kinds:
            return [concept, f"a picture of {concept}"]
        near, far = self.related(concept), [c for c in self.others(concept) if c not in self.related(concept)]
        if self.kind(concept) == "object":
            return [f"a photo of {a(c)}" for c in [concept, *near[:2], *far[:1]]]
        s = self.subjects
        other = near[0] if near else ""
        return [f"{s[0]} by {concept}", f"{s[1]} by {concept}", s[0]] + ([f"{s[0]} by {other}"] if other else [])

    def image_folder(self, concept: str) -> Path | None:
        """The few-shot image folder of ``concept`` (``images/<concept with dashes>``), if the set has one."""
        return None if self.images is None else Path(self.images) / concept.replace(" ", "-")
