"""Stable, human-readable names for every editable part of a pipeline, selectable by glob.

The same names on the toy model (BERT text encoder), the tiny SD-shaped pipeline and Stable Diffusion
(CLIP text encoder). A part is one ``nn.Linear`` or ``nn.Conv2d`` (its weight and bias):

=====================================  ==============================================================
``text.{i}.attn.{q,k,v,out}``          text-encoder layer i's self-attention projections
``text.{i}.ffn.{in,out}``              text-encoder layer i's feed-forward (fc1 / fc2) layers
``text2.{i}...``                       the same in SDXL's second text encoder (OpenCLIP bigG)
``unet.{block}.xattn.{q,k,v,out}``     a UNet cross-attention layer (attn2): to_q, to_k, to_v, to_out
``unet.{block}.attn.{q,k,v,out}``      the self-attention (attn1) of the same transformer block
``unet.{block}.ffn.{in,out}``          its feed-forward (ff.net.0.proj, the GEGLU input; ff.net.2)
``unet.{block}.proj.{in,out}``         the transformer's proj_in / proj_out around its blocks
``unet.{block}.res.{conv1,conv2}``     the ResNet block's two convolutions
``unet.{block}.res.{time,skip}``       its timestep projection and its shortcut convolution
``unet.{down,up}.{b}.sample.conv``     block b's down- or upsampling convolution
``unet.in.conv``, ``unet.out.conv``    the UNet's first and last convolutions
``unet.time.mlp.{in,out}``             the timestep embedding's two linear layers
``unet.time.added.{in,out}``           SDXL's added (pooled text and time ids) embedding
``text3.{i}...``                       SD 3's T5 (``text2`` is FLUX's T5), ``ffn.gate`` its gate
``dit.*``                              a transformer's parts (FLUX, SD 3): :mod:`workbench.families.mmdit`
=====================================  ==============================================================

``{block}`` is ``down.{b}.{i}``, ``mid.{i}`` or ``up.{b}.{i}``: UNet block b's i-th layer, which is its
i-th ResNet followed by its i-th attention (the order data flows through a diffusers block; the mid
block is ResNet 0, attention 0, ResNet 1, so ``mid.1`` holds only a ResNet). A transformer block
after the first one of an attention (SDXL-style depth) adds ``.t{k}``: ``down.2.0.t1.attn.q``.
SD 1.4's 16 cross-attention layers, from its UNet config (layers_per_block 2, three cross-attention
down blocks, three cross-attention up blocks), are::

    down.0.0 down.0.1 down.1.0 down.1.1 down.2.0 down.2.1 mid.0
    up.1.0 up.1.1 up.1.2 up.2.0 up.2.1 up.2.2 up.3.0 up.3.1 up.3.2

Normalisation layers are not parts (no method trains them). A Linear or Conv2d the scheme does not
know (a class embedding, say) is ``unet.extra.<its diffusers path, dots as underscores>``.

A selector is a glob or a list of globs; a glob also matches every part below the name it spells,
so ``"text.3.ffn"`` selects ``text.3.ffn.in`` and ``text.3.ffn.out``, ``"unet.mid.0"`` every part
of that layer and ``"unet.*.xattn.[kv]"`` the matrices UCE and RECE edit.

>>> import workbench
>>> from workbench.anatomy import select
>>> pipe = workbench.load("toy")
>>> select(pipe, "text.5.ffn")
['text.5.ffn.in', 'text.5.ffn.out']
>>> len(select(pipe, "unet.*.xattn.k"))
7
>>> select(pipe, "unet.mid.1")
['unet.mid.1.res.conv1', 'unet.mid.1.res.time', 'unet.mid.1.res.conv2']
"""
from __future__ import annotations

import fnmatch
import re
from typing import Iterable

import pandas as pd
from torch import nn

from .families import family_of

Selector = str | Iterable[str]


def as_list(x: str | Iterable[str]) -> list[str]:
    """``[x]`` for one string, ``list(x)`` for several: ``as_list("a") == ["a"]``."""
    return [x] if isinstance(x, str) else list(x)

#: A UNet part name: its layer, then its component (and matrix).
_UNET_NAME = re.compile(r"^unet\.((?:down|up)\.\d+\.(?:\d+(?:\.t\d+)?|sample)|mid\.\d+(?:\.t\d+)?|in|out|time|extra)\.(.+)$")


def parts(pipe) -> dict[str, nn.Module]:
    """Every editable part of ``pipe``: stable name -> its ``nn.Linear`` or ``nn.Conv2d``, text encoders
    first, then the UNet in the order data flows (named by the pipeline's model family)."""
    return family_of(pipe).parts(pipe)


def check_supported(pipe) -> None:
    """Raise ``TypeError`` naming what ``pipe`` has when no model family of the workbench takes it."""
    family_of(pipe)


def text_encoders(pipe) -> list[str]:
    """The part-name prefixes of ``pipe``'s text encoders: ``["text"]``, or ``["text", "text2"]`` for SDXL."""
    return list(family_of(pipe).encoders(pipe))


def text_layers(pipe, encoder: str = "text") -> nn.ModuleList:
    """The transformer layers of ``pipe``'s text encoder ``encoder``, layer 0 first."""
    return family_of(pipe).text_layers(pipe, encoder)


def n_text_layers(pipe, encoder: str = "text") -> int:
    """Number of transformer layers of ``pipe``'s text encoder ``encoder``."""
    return len(text_layers(pipe, encoder))


def names(pipe) -> list[str]:
    """All part names of ``pipe``."""
    return list(parts(pipe))


def denoiser_prefix(pipe) -> str:
    """The first word of the denoiser's part names: ``"unet"``, or ``"dit"`` for a transformer (FLUX, SD 3),
    so that ``f"{denoiser_prefix(pipe)}.*"`` selects every denoiser part.

    >>> import workbench
    >>> denoiser_prefix(workbench.load("toy")), denoiser_prefix(workbench.load("toy-dit"))
    ('unet', 'dit')
    """
    return names(pipe)[-1].split(".")[0]  # text encoders come first, the denoiser last


def middle_layer(pipe) -> str:
    """The denoiser's middle layer where text meets image: a UNet's mid block (``unet.mid.0``), else the
    middle one of those layers in network order (a transformer's blocks: ``dit.4`` of the toy DiT's six
    double and two single blocks).

    >>> import workbench
    >>> middle_layer(workbench.load("toy")), middle_layer(workbench.load("toy-dit"))
    ('unet.mid.0', 'dit.4')
    """
    layers = list(family_of(pipe).cross_attention(pipe))
    return next((name for name in layers if name.startswith("unet.mid.")), layers[len(layers) // 2])


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
            like = ("'dit.*.text.[kv]', 'dit.3.img.ffn', 'dit.single.0', 'dit.context.proj'"
                    if any(n.startswith("dit.") for n in available) else "'unet.*.xattn.k', 'unet.*.ffn', 'unet.mid.0'")
            raise KeyError(f"{pattern!r} matches no part of this model. Parts are named like 'text.3.ffn', "
                           f"'text.*.attn', {like}; this model has: {', '.join(available)}")
        chosen.update(hits)
    return [n for n in available if n in chosen]


def census(pipe, selector: Selector = "*") -> pd.DataFrame:
    """How many parts and parameters each component has (``selector`` narrows the parts, e.g. ``"unet.*"``).

    >>> import workbench
    >>> census(workbench.load("toy"), "unet.*").set_index("component").loc[["unet.xattn.k", "unet.ffn"], "parts"].tolist()
    [7, 14]
    """
    table = parts(pipe)
    rows: dict[str, list[int]] = {}
    for name in select(pipe, selector):
        count = rows.setdefault(name.split(".")[0] + "." + component_of(name), [0, 0])
        count[0] += 1
        count[1] += sum(p.numel() for p in table[name].parameters())
    return pd.DataFrame([{"component": k, "parts": v[0], "parameters": v[1]} for k, v in rows.items()])


def layer_of(name: str) -> str:
    """The layer a part belongs to: ``"text.3.ffn.in" -> "text.3"``, ``"unet.up.1.0.xattn.k" -> "unet.up.1.0"``,
    ``"unet.down.0.sample.conv" -> "unet.down.0.sample"``, ``"unet.in.conv" -> "unet.in"``,
    ``"dit.3.text.k" -> "dit.3"``, ``"dit.single.0.q" -> "dit.single.0"``, ``"dit.context.proj" -> "dit.context"``."""
    if name.startswith("dit."):
        bits = name.split(".")
        return ".".join(bits[:3] if bits[1] == "single" else bits[:2])
    if name.startswith("unet."):
        m = _UNET_NAME.match(name)
        return "unet." + m.group(1) if m else name.rsplit(".", 1)[0]
    return ".".join(name.split(".")[:2])


def component_of(name: str) -> str:
    """What a part is within its layer: ``"attn"`` or ``"ffn"`` (text encoder and UNet alike),
    ``"xattn.q"``, ``"xattn.k"``, ``"xattn.v"`` or ``"xattn.out"`` (each cross-attention matrix on its
    own, as UCE and RECE edit them), ``"res"``, ``"proj"``, ``"conv"`` or ``"mlp"``; in a transformer the
    stream and matrix of a double block (``"text.k"``, ``"img.q"``, ``"img.ffn"``, ``"text.mod"``,
    ``"img.attn2"``), ``"single.q"`` ... ``"single.ffn"`` in a single block, else the top-level part
    (``"context"``, ``"pooled"``, ``"time"``, ``"in"``, ``"out"``).

    >>> [component_of(n) for n in ("dit.3.text.k", "dit.0.img.ffn.in", "dit.single.2.ffn.in", "dit.context.proj")]
    ['text.k', 'img.ffn', 'single.ffn', 'context']
    """
    if name.startswith("dit."):
        bits = name.split(".")
        if bits[1] == "single":
            return "single." + bits[3]
        if bits[1].isdigit():
            return ".".join(bits[2:4])
        return bits[1]
    if name.startswith("unet."):
        m = _UNET_NAME.match(name)
        rest = m.group(2) if m else name.rsplit(".", 1)[1]
        return rest if rest.startswith("xattn.") else rest.split(".")[0]
    return name.split(".")[2]
