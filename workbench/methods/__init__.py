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

A method is registered once (:func:`register`): its function, the parts a layer sweep walks, the
components it varies there, and the knobs its panel shows. The tables the rest of the workbench reads
(:data:`METHODS`, :data:`workbench.sweep.SCOPE`, the erase panel's knobs) are views of :data:`REGISTRY`.

>>> REGISTRY["uce"].components, [k.name for k in REGISTRY["rece"].knobs]
(('xattn.k', 'xattn.v'), ['epochs', 'ridge'])
>>> list(METHODS)
['rece', 'uce', 'fewshot', 'esd', 'prune', 'sae']
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Mapping, TypeVar

from ..anatomy import Selector
from ..edits import Edit
from ..families import family_of
from ..profile import profile_of
from .esd import esd
from .fewshot import fewshot
from ..sae import sae
from .prune import prune
from .rece import rece
from .uce import uce

#: Knobs ``erase()`` passes on only to methods that take them.
_OPTIONAL = ("seed", "progress")
_V = TypeVar("_V")


@dataclass(frozen=True)
class Knob:
    """A knob a panel shows as a slider: the method's parameter ``name``, the slider's ``label``, its
    ``kind`` (``"int"``: whole numbers from ``low`` to ``high``; ``"log"``: powers of ten from
    ``10**low`` to ``10**high``, shown with ``readout``) and the ``control`` it is (default: ``name``)."""

    name: str
    label: str
    kind: Literal["int", "log"]
    low: int
    high: int
    readout: str = ".0e"
    control: str = ""

    def __post_init__(self) -> None:
        if not self.control:
            object.__setattr__(self, "control", self.name)


@dataclass(frozen=True)
class Method:
    """An erasure method, registered once: its function, the parts a layer sweep walks (``scope``: the
    layers of these parts), the ``components`` a sweep varies by default, the ``knobs`` its panel shows,
    and whether it is ``slow`` (compared only when chosen: it trains for long, or scores every concept
    first). ``dit_scope`` and
    ``dit_components`` are the same on a transformer (FLUX, SD 3); :meth:`scope_on` picks by model.

    >>> import workbench
    >>> REGISTRY["uce"].scope_on(workbench.load("toy"))
    ('unet.*.xattn.[kv]', ('xattn.k', 'xattn.v'))
    """

    name: str
    fn: Callable[..., Edit]
    scope: str
    components: tuple[str, ...]
    knobs: tuple[Knob, ...] = ()
    slow: bool = False
    dit_scope: str = ""
    dit_components: tuple[str, ...] = ()

    def scope_on(self, pipe) -> tuple[str, tuple[str, ...]]:
        """``(scope, components)`` on ``pipe``'s kind of denoiser."""
        if not self.scope and not self.dit_scope:
            raise ValueError(f"{self.name} has no layer sweep (it acts on one block: give its block); methods that "
                             "have one: " + ", ".join(m.name for m in REGISTRY.values() if m.scope))
        if "transformer" in family_of(pipe).components(pipe):
            if not self.dit_scope:
                raise ValueError(f"{self.name} has no layer sweep on a transformer model; methods that have one: "
                                 + ", ".join(m.name for m in REGISTRY.values() if m.dit_scope))
            return self.dit_scope, self.dit_components
        return self.scope, self.components


#: Every method by name, in the order the panels list them.
REGISTRY: dict[str, Method] = {}


class View(Mapping[str, _V]):
    """A read-only table computed from :data:`REGISTRY` on every read, so a later registration shows in it.

    >>> View(lambda: {n: m.slow for n, m in REGISTRY.items()})["esd"]
    True
    """

    def __init__(self, make: Callable[[], dict[str, _V]]) -> None:
        self._make = make

    def __getitem__(self, key: str) -> _V:
        return self._make()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._make())

    def __len__(self) -> int:
        return len(self._make())

    def __repr__(self) -> str:
        return repr(self._make())


def register(name: str, fn: Callable[..., Edit], scope: str, components: tuple[str, ...] | list[str],
             knobs: tuple[Knob, ...] | list[Knob] = (), slow: bool = False, dit_scope: str = "",
             dit_components: tuple[str, ...] | list[str] = ()) -> Method:
    """Register the method ``name`` (again: replace it); every table of methods follows.

    A knob must be a parameter of ``fn`` and its control must not be another method's.

    >>> from workbench.methods.uce import uce
    >>> m = register("uce2", uce, "unet.*.xattn.[kv]", ["xattn.v"],
    ...              [Knob("lam", "UCE2 lambda", "log", -2, 1, control="lam2")])
    >>> "uce2" in METHODS, REGISTRY.pop("uce2").components
    (True, ('xattn.v',))
    """
    method = Method(name, fn, scope, tuple(components), tuple(knobs), slow, dit_scope, tuple(dit_components))
    params = list(inspect.signature(fn).parameters)[2:]
    taken = {k.control: m.name for m in REGISTRY.values() if m.name != name for k in m.knobs}
    for knob in method.knobs:
        if knob.name not in params:
            raise ValueError(f"{name} has no knob {knob.name!r}; its knobs: {', '.join(params)}")
        if knob.control in taken:
            raise ValueError(f"the control {knob.control!r} is already {taken[knob.control]}'s; give the knob "
                             "another control name")
    REGISTRY[name] = method
    return method


_TEXT_KV = ("text.k", "text.v")
register("rece", rece, "unet.*.xattn.[kv]", ("xattn.k", "xattn.v"),
         (Knob("epochs", "RECE epochs", "int", 1, 6), Knob("ridge", "RECE ridge", "log", -4, -1)),
         dit_scope="dit.*.text.[kv]", dit_components=_TEXT_KV)
register("uce", uce, "unet.*.xattn.[kv]", ("xattn.k", "xattn.v"), (Knob("lam", "UCE lambda", "log", -2, 1, ".2g"),),
         dit_scope="dit.*.text.[kv]", dit_components=_TEXT_KV)
register("fewshot", fewshot, "text.*", ("ffn", "attn"),
         (Knob("lr", "few-shot lr", "log", -6, -3), Knob("steps", "few-shot steps", "int", 1, 40)),
         dit_scope="text*", dit_components=("ffn", "attn"))
# ESD trains for tens of seconds per erasure: it is compared when chosen, not by default
register("esd", esd, "unet.*.xattn.k", ("attn", "xattn", "ffn"), slow=True,
         dit_scope="dit.*.[qkv]", dit_components=("img.attn", "img.ffn", "text.attn", "text.ffn", "single.attn", "ffn"))
# below the layer: compared when chosen (pruning scores every other concept's prompts first)
register("prune", prune, "unet.*.ffn.out", ("ffn",),
         (Knob("share", "prune share", "log", -3, 0, ".1%"), Knob("timesteps", "prune steps", "int", 1, 20)), slow=True,
         dit_scope="dit.*.ffn.out", dit_components=("img.ffn", "text.ffn"))
# an intervention on one block's output (its ``block``), not a weight edit of parts: no layer sweep
register("sae", sae, "", (), (Knob("features", "SAE features", "int", 1, 64),), slow=True)

#: Every method's function by name, in the order the panels list them.
METHODS: Mapping[str, Callable[..., Edit]] = View(lambda: {n: m.fn for n, m in REGISTRY.items()})


def quick() -> tuple[str, ...]:
    """The methods compared by default: all but the slow ones.

    >>> quick()
    ('rece', 'uce', 'fewshot')
    """
    return tuple(n for n, m in REGISTRY.items() if not m.slow)


def _method(method: str) -> Callable[..., Edit]:
    if method not in REGISTRY:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[method].fn


def defaults(pipe, method: str) -> dict[str, Any]:
    """Every knob of ``method`` with its default on ``pipe``: the method's signature, then the model
    profile's method defaults (what :func:`erase` and the panels start from)."""
    params = inspect.signature(_method(method)).parameters
    values = {n: p.default for n, p in list(params.items())[2:] if p.default is not inspect.Parameter.empty}
    return {**values, **profile_of(pipe).defaults.get(method, {})}


def erase(pipe, concept: str, method: str = "rece", parts: Selector | None = None, **knobs: Any) -> Edit:
    """Erase ``concept`` with ``method`` (``"rece"``, ``"uce"``, ``"fewshot"``, ``"esd"`` or any other
    registered one) scoped to ``parts``.

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


__all__ = ["erase", "defaults", "register", "quick", "Method", "Knob", "REGISTRY", "METHODS", "uce", "rece",
           "fewshot", "esd", "prune", "sae"]
