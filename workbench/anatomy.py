"""Stable, human-readable names for every editable part of a pipeline, selectable by glob.

The same names on the toy model (BERT text encoder), the tiny SD-shaped pipeline and Stable Diffusion
(CLIP text encoder). A part is one ``nn.Linear`` or ``nn.Conv2d`` (its weight and bias):

=====================================  ==============================================================
``text.{i}.attn.{q,k,v,out}``          text-encoder layer i's self-attention projections
``text.{i}.ffn.{in,out}``              text-encoder layer i's feed-forward (fc1 / fc2) layers
``unet.{block}.xattn.{q,k,v,out}``     a UNet cross-attention layer (attn2): to_q, to_k, to_v, to_out
``unet.{block}.attn.{q,k,v,out}``      the self-attention (attn1) of the same transformer block
``unet.{block}.ffn.{in,out}``          its feed-forward (ff.net.0.proj, the GEGLU input; ff.net.2)
``unet.{block}.proj.{in,out}``         the transformer's proj_in / proj_out around its blocks
``unet.{block}.res.{conv1,conv2}``     the ResNet block's two convolutions
``unet.{block}.res.{time,skip}``       its timestep projection and its shortcut convolution
``unet.{down,up}.{b}.sample.conv``     block b's down- or upsampling convolution
``unet.in.conv``, ``unet.out.conv``    the UNet's first and last convolutions
``unet.time.mlp.{in,out}``             the timestep embedding's two linear layers
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
import weakref
from typing import Iterable

import pandas as pd
from torch import nn

Selector = str | Iterable[str]
#: parts() per pipeline, with the modules they were read from (recomputed when those are replaced).
_PARTS: "weakref.WeakKeyDictionary[object, tuple[tuple[int, int], dict[str, nn.Module]]]" = weakref.WeakKeyDictionary()


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
#: A diffusers UNet path: the block (down_blocks.b / mid_block / up_blocks.b) and what lies inside it.
_UNET_PATH = re.compile(r"^(?:(down|up)_blocks\.(\d+)|(mid)_block)\.(.+)$")
#: Inside a block: a ResNet, an attention's projections or transformer parts, or the resampler.
_IN_BLOCK = (
    (re.compile(r"^resnets\.(\d+)\.(conv1|time_emb_proj|conv2|conv_shortcut)$"), "res"),
    (re.compile(r"^attentions\.(\d+)\.(proj_in)$"), "proj"),
    (re.compile(r"^attentions\.(\d+)\.transformer_blocks\.(\d+)\.(attn1|attn2|ff)\.(.+)$"), "transformer"),
    (re.compile(r"^attentions\.(\d+)\.(proj_out)$"), "proj"),
    (re.compile(r"^(downsamplers|upsamplers)\.0\.conv$"), "sample"),
)
_SHORT = {"conv1": "conv1", "time_emb_proj": "time", "conv2": "conv2", "conv_shortcut": "skip", "proj_in": "in",
          "proj_out": "out", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out", "net.0.proj": "in",
          "net.2": "out"}
_TOP = {"time_embedding.linear_1": ("time", "mlp.in"), "time_embedding.linear_2": ("time", "mlp.out"),
        "conv_in": ("in", "conv"), "conv_out": ("out", "conv")}
#: A UNet part name: its layer, then its component (and matrix).
_UNET_NAME = re.compile(r"^unet\.((?:down|up)\.\d+\.(?:\d+(?:\.t\d+)?|sample)|mid\.\d+(?:\.t\d+)?|in|out|time|extra)\.(.+)$")


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


def parts(pipe) -> dict[str, nn.Module]:
    """Every editable part of ``pipe``: stable name -> its ``nn.Linear`` or ``nn.Conv2d``, text encoder
    first, then the UNet in the order data flows (computed once per pipeline and text encoder / UNet)."""
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


def _find_parts(pipe) -> dict[str, nn.Module]:
    check_supported(pipe)
    out: dict[str, nn.Module] = {}
    layers, inner = _text_layers(pipe.text_encoder)
    for i, layer in enumerate(layers):
        for short, path in inner.items():
            out[f"text.{i}.{short}"] = _get(layer, path)
    found = [(_unet_name(path), module) for path, module in pipe.unet.named_modules()
             if isinstance(module, (nn.Linear, nn.Conv2d))]
    for (_, name), module in sorted(found, key=lambda f: f[0][0]):  # the order data flows through the UNet
        if name in out:
            raise TypeError(f"two modules of {type(pipe.unet).__name__} would both be named {name!r}; "
                            f"{SUPPORTED}")
        out[name] = module
    return out


def _unet_name(path: str) -> tuple[tuple, str]:
    """(sort key in network order, stable name) of the UNet module at diffusers ``path``."""
    if path in _TOP:
        layer, rest = _TOP[path]
        return ((("time", "in", "", "", "", "out").index(layer),), f"unet.{layer}.{rest}")
    m = _UNET_PATH.match(path)
    if m:
        kind = m.group(1) or m.group(3)
        block = (int(m.group(2)),) if m.group(2) else ()
        for order, (pattern, what) in enumerate(_IN_BLOCK):
            hit = pattern.match(m.group(4))
            if hit:
                return _in_block(kind, block, order, what, hit.groups())
    return ((9, path), "unet.extra." + path.replace(".", "_"))


def _in_block(kind: str, block: tuple, order: int, what: str, groups: tuple) -> tuple[tuple, str]:
    """Sort key and name of a part inside a down, mid or up block (``groups``: the path's matches)."""
    where = (2 + ("down", "mid", "up").index(kind), *block)
    prefix = ".".join(["unet", kind, *map(str, block)])
    if what == "sample":
        return ((*where, 10**6), f"{prefix}.sample.conv")
    i = int(groups[0])
    if what == "res":
        return ((*where, i, 0, _SHORT_ORDER.index(groups[1])), f"{prefix}.{i}.res.{_SHORT[groups[1]]}")
    if what == "proj":
        return ((*where, i, 1 if groups[1] == "proj_in" else 10**6), f"{prefix}.{i}.proj.{_SHORT[groups[1]]}")
    t, module, leaf = int(groups[1]), groups[2], groups[3]
    component = {"attn1": "attn", "attn2": "xattn", "ff": "ffn"}[module]
    name = f"{prefix}.{i}" + (f".t{t}" if t else "") + f".{component}.{_SHORT.get(leaf, leaf.replace('.', '_'))}"
    leaves = ("to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2")
    rank = leaves.index(leaf) if leaf in leaves else len(leaves)
    return ((*where, i, 2 + t, ("attn1", "attn2", "ff").index(module), rank), name)


_SHORT_ORDER = ("conv1", "time_emb_proj", "conv2", "conv_shortcut")


def text_layers(pipe) -> nn.ModuleList:
    """The transformer layers of ``pipe``'s text encoder, ``text.0`` first."""
    return _text_layers(pipe.text_encoder)[0]


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
                f"'text.*.attn', 'unet.*.xattn.k', 'unet.*.ffn', 'unet.mid.0'; this model has: {', '.join(available)}"
            )
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
    ``"unet.down.0.sample.conv" -> "unet.down.0.sample"``, ``"unet.in.conv" -> "unet.in"``."""
    if name.startswith("unet."):
        m = _UNET_NAME.match(name)
        return "unet." + m.group(1) if m else name.rsplit(".", 1)[0]
    return ".".join(name.split(".")[:2])


def component_of(name: str) -> str:
    """What a part is within its layer: ``"attn"`` or ``"ffn"`` (text encoder and UNet alike),
    ``"xattn.q"``, ``"xattn.k"``, ``"xattn.v"`` or ``"xattn.out"`` (each cross-attention matrix on its
    own, as UCE and RECE edit them), ``"res"``, ``"proj"``, ``"conv"`` or ``"mlp"``."""
    if name.startswith("unet."):
        m = _UNET_NAME.match(name)
        rest = m.group(2) if m else name.rsplit(".", 1)[1]
        return rest if rest.startswith("xattn.") else rest.split(".")[0]
    return name.split(".")[2]
