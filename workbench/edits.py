"""An ``Edit``: the weight changes an erasure made, applied and reverted exactly, saved as safetensors.

>>> import workbench
>>> from workbench.methods import uce
>>> pipe = workbench.load("toy")
>>> edit = uce(pipe, "apple")
>>> with edit.apply(pipe):
...     erased = pipe("an apple", generator=workbench.seeded(0)).images
>>> round(float(edit.summary(pipe)["relative"].max()), 3) > 0
True
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import diffusers
import pandas as pd
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from .anatomy import component_of, layer_of, parts

_STACK = "_workbench_applied"


def parameter(table: dict[str, torch.nn.Module], key: str) -> torch.nn.Parameter:
    """The parameter ``key`` ("<part>.<weight|bias>") of a :func:`~workbench.anatomy.parts` table.

    >>> import workbench
    >>> tuple(parameter(parts(workbench.load("toy")), "text.0.ffn.in.bias").shape)
    (1536,)
    """
    part, attr = key.rsplit(".", 1)
    if part not in table:
        raise KeyError(part)
    return getattr(table[part], attr)


def versions() -> dict[str, str]:
    """The versions of the libraries an edit was made with."""
    return {"workbench": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


@dataclass
class Edit:
    """Weight deltas keyed ``"<part>.<weight|bias>"`` (e.g. ``"unet.mid.0.xattn.k.weight"``) and what made them.

    The deltas are float32 on the device of the weights they were made from (a GPU pipeline's edit stays
    on the GPU; :meth:`to` moves it, :meth:`save` writes it from anywhere, :meth:`load` reads it to the CPU).
    """

    deltas: dict[str, torch.Tensor]
    method: str
    concept: str
    params: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    seconds: float = 0.0
    versions: dict[str, str] = field(default_factory=versions)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def between(cls, base: dict[str, torch.Tensor], new: dict[str, torch.Tensor], **meta) -> "Edit":
        """The edit that turns ``base`` tensors into ``new`` ones, float32 on ``new``'s device; refuses
        NaN or inf."""
        finite = torch.stack([torch.isfinite(value).all() for value in new.values()]) if new else None
        if finite is not None and not bool(finite.all()):  # one look at the device for every tensor
            key = list(new)[int((~finite).nonzero()[0])]
            raise FloatingPointError(
                f"the {meta.get('method', 'edit')} result for {key} has NaN or inf values; nothing was "
                "changed. Lower the erase scale or raise the regulariser (lam / ridge) and try again."
            )
        deltas = {key: (value.float() - base[key].to(value.device).float()).contiguous()
                  for key, value in new.items()}
        return cls(deltas=deltas, **meta)

    def to(self, device: torch.device | str) -> "Edit":
        """A copy of this edit with its deltas and extras on ``device`` (tensors already there are shared).

        >>> Edit({"a.weight": torch.ones(2)}, "uce", "apple").to("cpu").deltas["a.weight"].device.type
        'cpu'
        """
        return replace(self, deltas={k: v.to(device) for k, v in self.deltas.items()},
                       extras={k: v.to(device) for k, v in self.extras.items()})

    @property
    def parts(self) -> list[str]:
        """Names of the parts this edit changes."""
        return sorted({k.rsplit(".", 1)[0] for k in self.deltas})

    def check(self, pipe) -> None:
        """Raise ``ValueError`` if this edit does not fit ``pipe`` (other names or shapes)."""
        problems, table = [], parts(pipe)
        for key, delta in self.deltas.items():
            try:
                p = parameter(table, key)
            except (KeyError, AttributeError):
                problems.append(f"{key}: no such part")
                continue
            if p.shape != delta.shape:
                problems.append(f"{key}: edit has shape {tuple(delta.shape)}, model has {tuple(p.shape)}")
        if problems:
            raise ValueError(
                f"this {self.method} edit of {self.concept!r} was made for another model; the model was "
                "left unchanged. Mismatches: " + "; ".join(problems[:6])
                + (f" (and {len(problems) - 6} more)" if len(problems) > 6 else "")
            )

    @contextmanager
    def apply(self, pipe) -> Iterator["Edit"]:
        """Add the deltas to ``pipe``'s weights; on exit restore the exact previous weights.

        Edits nest: ``with a.apply(pipe), b.apply(pipe): ...`` erases both concepts.
        """
        self.check(pipe)
        saved, table = {}, parts(pipe)
        with torch.no_grad():
            for key, delta in self.deltas.items():
                p = parameter(table, key)
                saved[key] = p.detach().clone()
                # one rounding to the weight's dtype: W + dW summed in float32, so a float16/bfloat16
                # model gets the float32 edit's nearest weights
                p.copy_((p.float() + delta.to(p.device)).to(p.dtype))
        stack = getattr(pipe, _STACK, [])
        setattr(pipe, _STACK, stack + [self])
        try:
            yield self
        finally:
            with torch.no_grad():
                for key, value in saved.items():
                    parameter(table, key).copy_(value)
            setattr(pipe, _STACK, [e for e in getattr(pipe, _STACK) if e is not self])

    def summary(self, pipe=None):
        """One row per part: ``||dW||`` (Frobenius, weight and bias together) and, given the
        pipeline, the base norm and the relative change."""
        rows, table = [], parts(pipe) if pipe is not None else {}
        for part in self.parts:
            keys = [k for k in self.deltas if k.rsplit(".", 1)[0] == part]
            dw = float(torch.sqrt(sum(self.deltas[k].double().pow(2).sum() for k in keys)))
            row = {"part": part, "layer": layer_of(part), "component": component_of(part), "dW": dw}
            if pipe is not None:
                w = float(torch.sqrt(sum(parameter(table, k).detach().double().pow(2).sum() for k in keys)))
                row.update(W=w, relative=dw / w if w else float("nan"))
            rows.append(row)
        return pd.DataFrame(rows)

    def save(self, path: str | Path) -> Path:
        """Write a ``.safetensors`` file: the deltas, extras, and the metadata as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"delta/{k}": v.cpu().contiguous() for k, v in self.deltas.items()}
        tensors |= {f"extra/{k}": v.cpu().contiguous() for k, v in self.extras.items()}
        meta = {"method": self.method, "concept": self.concept, "params": self.params, "seed": self.seed,
                "seconds": self.seconds, "versions": self.versions}
        save_file(tensors, path, metadata={"workbench": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Edit":
        """Read an edit written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no edit file at {path}; write one with `edit.save(path)` or `workbench erase`")
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("workbench")
        if raw is None:
            raise ValueError(f"{path} is a safetensors file but not a workbench edit (no 'workbench' metadata)")
        tensors = load_file(path)
        meta = json.loads(raw)
        return cls(deltas={k[6:]: v for k, v in tensors.items() if k.startswith("delta/")},
                   extras={k[6:]: v for k, v in tensors.items() if k.startswith("extra/")}, **meta)


def applied(pipe) -> list[Edit]:
    """The edits now applied to ``pipe``, oldest first."""
    return list(getattr(pipe, _STACK, []))


class Timer:
    """``with Timer() as t: ...; t.seconds``."""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
