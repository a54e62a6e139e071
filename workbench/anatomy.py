"""Stable, human-readable names for every editable part of a pipeline, selectable by glob.

The same names on the toy model (BERT text encoder), the tiny SD-shaped pipeline and Stable Diffusion
(CLIP text encoder):

=========================  ==============================================================
``text.{i}.attn.{q,k,v,out}``  text-encoder layer i's self-attention projections
``text.{i}.ffn.{in,out}``      text-encoder layer i's feed-forward (fc1 / fc2) layers
``unet.{block}.xattn.{k,v}``   a UNet cross-attention layer's to_k / to_v
=========================  ==============================================================

``{block}`` is ``down.{b}.{a}``, ``mid.{a}`` or ``up.{b}.{a}`` (UNet block b, attention a). SD 1.4's
16 cross-attention layers, from its UNet config (layers_per_block 2, three cross-attention down
blocks, three cross-attention up blocks), are::

    down.0.0 down.0.1 down.1.0 down.1.1 down.2.0 down.2.1 mid.0
    up.1.0 up.1.1 up.1.2 up.2.0 up.2.1 up.2.2 up.3.0 up.3.1 up.3.2

A selector is a glob or a list of globs; a glob also matches every part below the name it spells,
so ``"text.3.ffn"`` selects ``text.3.ffn.in`` and ``text.3.ffn.out``.

>>> import workbench
>>> from workbench.anatomy import select
>>> pipe = workbench.load("toy")
>>> select(pipe, "text.5.ffn")
['text.5.ffn.in', 'text.5.ffn.out']
>>> len(select(pipe, "unet.*.xattn.k"))
7
"""
from __future__ import annotations

import fnmatch
import re
import weakref
from typing import Iterable

from torch import nn

Selector = str | Iterable[str]
#: parts() per pipeline, with the modules they were read from (recomputed when those are replaced).
_PARTS: "weakref.WeakKeyDictionary[object, tuple[tuple[int, int], dict[str, nn.Linear]]]" = weakref.WeakKeyDictionary()


def as_list(x: str | Iterable[str]) -> list[str]:
    """``[x]`` for one string, ``list(x)`` for several: ``as_list("a") == ["a"]``."""
    return [x] if isinstance(x, str) else list(x)

_TEXT_LAYERS: tuple[dict[str, str], ...] = (
    {  # CLIP
        "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
        "attn.out": "self_attn.out_proj", "ffn.in": "mlp.fc1", "ffn.out": "mlp.fc2",
    },
    {  # BERT
        "attn.q": "attention.self.query", "attn.k": "attention.self.key",
        "attn.v": "attention.self.value", "attn.out": "attention.output.dense",
        "ffn.in": "intermediate.dense", "ffn.out": "output.dense",
    },
)
_XATTN = re.compile(r"^(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2$"
                    r"|^mid_block\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2$")


def _get(root: nn.Module, path: str) -> nn.Module:
    for attr in path.split("."):
        root = root[int(attr)] if attr.isdigit() else getattr(root, attr)
    return root


def _text_layers(encoder: nn.Module) -> tuple[nn.ModuleList, dict[str, str]]:
    """The encoder's list of transformer layers and the paths of its parts inside a layer."""
    for _, module in encoder.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            for inner in _TEXT_LAYERS:
                try:
                    [_get(module[0], path) for path in inner.values()]
                except (AttributeError, IndexError):
                    continue
                return module, inner
    raise TypeError(f"unsupported text encoder {type(encoder).__name__}: the workbench knows CLIP and BERT")


def parts(pipe) -> dict[str, nn.Linear]:
    """Every editable part of ``pipe``: stable name -> its ``nn.Linear``, in network order (computed once
    per pipeline and text encoder / UNet)."""
    key = (id(pipe.text_encoder), id(pipe.unet))
    try:
        cached = _PARTS.get(pipe)
    except TypeError:  # an object that cannot be weakly referenced: no cache
        return _find_parts(pipe)
    if cached is None or cached[0] != key:
        cached = (key, _find_parts(pipe))
        _PARTS[pipe] = cached
    return dict(cached[1])


SUPPORTED = ("the workbench edits Stable Diffusion 1.x/2.x-shaped pipelines: one CLIP or BERT text encoder "
             "(pipe.text_encoder) and a UNet2DConditionModel with cross-attention (pipe.unet)")


def check_supported(pipe) -> None:
    """Raise ``TypeError`` naming what ``pipe`` has when the workbench cannot edit it (SDXL's two text
    encoders, SD3's transformer, a UNet without cross-attention)."""
    kind = type(pipe).__name__
    if getattr(pipe, "text_encoder_2", None) is not None or getattr(pipe, "text_encoder_3", None) is not None:
        raise TypeError(f"{kind} has several text encoders (text_encoder_2: SDXL or SD3); {SUPPORTED}")
    if getattr(pipe, "unet", None) is None or getattr(pipe, "text_encoder", None) is None:
        has = [n for n in ("transformer", "prior", "decoder") if getattr(pipe, n, None) is not None]
        raise TypeError(f"{kind} has no " + " or ".join(n for n in ("unet", "text_encoder") if getattr(pipe, n, None) is None)
                        + (f" (it has a {', '.join(has)})" if has else "") + f"; {SUPPORTED}")
    if not any(_XATTN.match(name) for name, _ in pipe.unet.named_modules()):
        raise TypeError(f"{kind}'s UNet ({type(pipe.unet).__name__}) has no cross-attention layers (attn2), so "
                        f"nothing conditions on text there; {SUPPORTED}")


def _find_parts(pipe) -> dict[str, nn.Linear]:
    check_supported(pipe)
    out: dict[str, nn.Linear] = {}
    layers, inner = _text_layers(pipe.text_encoder)
    for i, layer in enumerate(layers):
        for short, path in inner.items():
            out[f"text.{i}.{short}"] = _get(layer, path)
    found = []
    for name, module in pipe.unet.named_modules():
        m = _XATTN.match(name)
        if not m:
            continue
        if m.group(1):
            kind, idx = m.group(1), (int(m.group(2)), int(m.group(3)), int(m.group(4)))
        else:
            kind, idx = "mid", (int(m.group(5)), int(m.group(6)))
        found.append(((("down", "mid", "up").index(kind), idx), kind, idx, module))
    for _, kind, idx, module in sorted(found, key=lambda f: f[0]):  # down, mid, up: the order data flows
        block = ".".join([kind, *map(str, idx[:-1])]) + (f".t{idx[-1]}" if idx[-1] else "")
        out[f"unet.{block}.xattn.k"] = module.to_k
        out[f"unet.{block}.xattn.v"] = module.to_v
    return out


def n_text_layers(pipe) -> int:
    """Number of transformer layers of ``pipe``'s text encoder."""
    return len(_text_layers(pipe.text_encoder)[0])


def names(pipe) -> list[str]:
    """All part names of ``pipe``."""
    return list(parts(pipe))


def select(pipe, selector: Selector) -> list[str]:
    """Part names matched by ``selector`` (a glob or list of globs), in network order.

    Raises ``KeyError`` listing the available names when a glob matches nothing.
    """
    patterns = as_list(selector)
    available = names(pipe)
    chosen: set[str] = set()
    for pattern in patterns:
        hits = [n for n in available if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, pattern + ".*")]
        if not hits:
            raise KeyError(
                f"{pattern!r} matches no part of this model. Parts are named like 'text.3.ffn', "
                f"'text.*.attn', 'unet.*.xattn.k'; this model has: {', '.join(available)}"
            )
        chosen.update(hits)
    return [n for n in available if n in chosen]


def layer_of(name: str) -> str:
    """The layer a part belongs to: ``"text.3.ffn.in" -> "text.3"``, ``"unet.up.1.0.xattn.k" -> "unet.up.1.0"``."""
    return name.split(".xattn")[0] if name.startswith("unet.") else ".".join(name.split(".")[:2])


def component_of(name: str) -> str:
    """``"attn"``, ``"ffn"``, ``"xattn.k"`` or ``"xattn.v"``."""
    if name.startswith("unet."):
        return "xattn." + name.rsplit(".", 1)[1]
    return name.split(".")[2]
