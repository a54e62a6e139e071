"""An ``Intervention``: an erasure made of hooks rather than weight changes, installed and removed exactly.

An :class:`~workbench.edits.Edit` adds deltas to weights; an intervention changes what some modules compute
while it is applied (a sparse autoencoder's features ablated in a block's output, attention heads zeroed)
and never touches a weight. Both are *erasures*: ``with erasure.apply(pipe):`` installs either, they nest
with each other, :func:`~workbench.edits.applied` lists both, and metrics, attacks, sweeps, grids and panels
take either the same way. An intervention holds its tensors (``tensors``) and says which modules it hooks
(:meth:`Intervention.hooks`); :meth:`Intervention.save` and :func:`load` keep it as safetensors like an edit.

>>> import torch, workbench
>>> from workbench.sampling import generate
>>> pipe = workbench.load("toy")
>>> zero = Scaled({"scale": torch.tensor(0.0)}, "scaled", "apple", params={"sites": ["unet.mid.0.xattn.out"]})
>>> with zero.apply(pipe):
...     applied_now = [e.method for e in applied(pipe)]
...     dark = generate(pipe, ["an apple"], steps=2)[0]
>>> applied_now, applied(pipe)
(['scaled'], [])
>>> dark.tobytes() != generate(pipe, ["an apple"], steps=2)[0].tobytes()
True
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Union

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .edits import _STACK, Edit, applied, versions
from .hooks import hooked, modules

#: A hook an intervention installs: ``(site, fn, pre)``; ``pre``: ``fn(module, inputs)`` rewrites what the
#: module reads, otherwise ``fn(module, inputs, output)`` rewrites what it returns.
Site = tuple[str, Callable, bool]


@dataclass
class Intervention:
    """Hooks on named modules (parts, layers or blocks) and the tensors they need; no weight changes
    (``deltas`` is empty, so code that undoes edits' deltas leaves it alone and :func:`suspended` turns it off).

    A subclass names itself in :data:`KINDS` (``kind``) and says what it hooks (:meth:`hooks`);
    ``params["sites"]`` lists the modules.
    """

    tensors: dict[str, torch.Tensor]
    method: str
    concept: str
    params: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    seconds: float = 0.0
    versions: dict[str, str] = field(default_factory=versions)
    active: bool = field(default=True, repr=False, compare=False)

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            KINDS[cls.kind] = cls

    @property
    def deltas(self) -> dict[str, torch.Tensor]:
        """No weight changes: an intervention's effect is its hooks."""
        return {}

    @property
    def extras(self) -> dict[str, torch.Tensor]:
        return {}

    @property
    def parts(self) -> list[str]:
        """The modules this intervention hooks."""
        return list(self.params.get("sites", []))

    def hooks(self, pipe) -> list[Site]:
        """The hooks to install on ``pipe``."""
        raise NotImplementedError

    def check(self, pipe) -> None:
        """Raise ``ValueError`` if a hooked module does not exist on ``pipe``."""
        try:
            modules(pipe, self.parts)
        except KeyError as error:
            raise ValueError(f"this {self.method} intervention on {self.concept!r} hooks modules this model does not "
                             f"have; the model was left unchanged. {error.args[0]}") from None

    def _gated(self, fn: Callable) -> Callable:
        def hook(*args):
            return fn(*args) if self.active else None
        return hook

    @contextmanager
    def apply(self, pipe) -> Iterator["Intervention"]:
        """Install the hooks; on exit remove them (nothing else on ``pipe`` ever changes). Nests with edits."""
        self.check(pipe)
        found = modules(pipe, self.parts)
        pairs = [(found[site], self._gated(fn), pre) for site, fn, pre in self.hooks(pipe)]
        stack = getattr(pipe, _STACK, [])
        setattr(pipe, _STACK, stack + [self])
        try:
            with hooked([(m, f) for m, f, pre in pairs if pre], pre=True), hooked([(m, f) for m, f, pre in pairs
                                                                                     if not pre]):
                yield self
        finally:
            setattr(pipe, _STACK, [e for e in getattr(pipe, _STACK) if e is not self])

    def summary(self, pipe=None) -> pd.DataFrame:
        """One row per hooked module: what is changed there (``units``: features or heads) and how many."""
        units = self.params.get("units", {})
        return pd.DataFrame([{"part": site, "changes": self.params.get("changes", self.kind),
                              "units": len(units.get(site, []))} for site in self.parts])

    def save(self, path: str | Path) -> Path:
        """Write a ``.safetensors`` file: the tensors and the metadata (with the kind) as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "method": self.method, "concept": self.concept, "params": self.params,
                "seed": self.seed, "seconds": self.seconds, "versions": self.versions}
        save_file({k: v.cpu().contiguous() for k, v in self.tensors.items()}, path,
                  metadata={"workbench-intervention": json.dumps(meta)})
        return path


#: Every kind of intervention by name (filled as subclasses are defined).
KINDS: dict[str, type[Intervention]] = {}

#: What erases: an edit of the weights or an intervention of hooks.
Erasure = Union[Edit, Intervention]


def load(path: str | Path) -> Erasure:
    """Read an erasure written by ``save``: an :class:`~workbench.edits.Edit` or an :class:`Intervention`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no erasure file at {path}; write one with `.save(path)`")
    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("workbench-intervention")
    if raw is None:
        return Edit.load(path)
    meta = json.loads(raw)
    kind = meta.pop("kind")
    if kind not in KINDS:
        raise ValueError(f"{path} holds a {kind!r} intervention, which this workbench does not know; kinds: "
                         f"{', '.join(KINDS)}")
    return KINDS[kind](tensors=load_file(path), **meta)


@contextmanager
def suspended(pipe) -> Iterator[None]:
    """A context in which the interventions applied to ``pipe`` do nothing; they act again on exit."""
    now = [e for e in applied(pipe) if isinstance(e, Intervention)]
    before = [e.active for e in now]
    for e in now:
        e.active = False
    try:
        yield
    finally:
        for e, flag in zip(now, before):
            e.active = flag


class Scaled(Intervention):
    """The output of each module in ``params["sites"]`` times ``tensors["scale"]`` (0: the module silenced).

    >>> Scaled({"scale": torch.tensor(0.5)}, "scaled", "apple", params={"sites": ["unet.mid"]}).parts
    ['unet.mid']
    """

    kind = "scaled"

    def hooks(self, pipe) -> list[Site]:
        def scale(module, inputs, output):
            if isinstance(output, tuple):
                return (output[0] * self.tensors["scale"].to(output[0].device, output[0].dtype), *output[1:])
            return output * self.tensors["scale"].to(output.device, output.dtype)
        return [(site, scale, False) for site in self.parts]
