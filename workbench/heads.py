"""Attention heads' attribution to a concept: causal tracing at the resolution of single heads.

An attention layer's heads each compute their own output; the layer concatenates them (head ``h`` in
columns ``h * width ... (h + 1) * width``) and projects the concatenation with one linear layer, its
*output projection*. Zeroing a head's columns of what that projection reads removes the head and nothing
else. The heads looked at (:func:`head_sites`) are those of every layer where text meets image (a UNet's
cross-attention, a transformer's joint attention, whose heads' output goes through both streams'
projections, ``dit.{i}.img.out`` and ``dit.{i}.text.out``, and its single blocks, whose fused ``out`` reads
the heads first and the MLP after them) and every text-encoder self-attention layer. A head is named by
its layer and its index: ``("unet.mid.0", 3)``.

:func:`attribute` measures each head with the judge's probability that the images show the concept:

- ``mode="ablate"``: the clean run of the concept's prompt with one head zeroed (in every denoiser call
  and every classifier-free-guidance copy); effect = P(ablated) - P(clean), negative where the head
  carries the concept;
- ``mode="restore"``: the corrupted run of :mod:`workbench.tracing` (the concept's token embeddings
  noised) with one head's clean output put back, copied from clean rows drawn in the same batch from the
  same noise; effect = P(restored) - P(corrupted). A text-encoder head is restored at the concept's tokens.

A text-encoder head changes only the conditioning: it is patched while the prompt is encoded, and the
images are drawn from that conditioning. The runs are batched: each row of a denoising batch patches a
different head (a per-row mask of the projection's input columns), so a layer's heads cost rows of one
batch, not one pipeline call each. Nothing on the pipeline changes: every hook is removed on exit.

:class:`HeadAblation` is the erasure made from it: given heads zeroed at inference (:func:`ablate_heads`
picks the heads whose ablation lowers the concept most).

>>> import workbench
>>> pipe = workbench.load("toy")
>>> sites = head_sites(pipe)
>>> sites["unet.mid.0"]
HeadSite(layer='unet.mid.0', parts=('unet.mid.0.xattn.out',), heads=32, width=4, offset=0, component='unet')
>>> sites["text.5"].heads, sites["text.5"].columns(2)
(12, slice(64, 96, None))
"""
from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import pandas as pd
import torch
from torch import nn

from .anatomy import as_list, text_encoders, text_layers
from .concepts import ConceptSet
from .families import Conditioning, family_of
from .hooks import hooked
from .interventions import Intervention, Site
from .judges import Judge
from .sampling import BATCH, GUIDANCE, STEPS
from .tracing import NOISE, Sampler, Text, concept_setup, encoder_positions, probability

#: What :func:`attribute` does to each head.
MODES = ("ablate", "restore")


@dataclass(frozen=True)
class HeadSite:
    """An attention layer's heads: the ``parts`` whose input is the heads' concatenation (their output
    projections), how many ``heads``, each ``width`` columns wide, from column ``offset`` on; ``component``:
    ``"text"``, ``"unet"`` or ``"dit"``."""

    layer: str
    parts: tuple[str, ...]
    heads: int
    width: int
    offset: int = 0
    component: str = ""

    def columns(self, head: int) -> slice:
        """The columns of the projections' input that head ``head`` writes."""
        start = self.offset + head * self.width
        return slice(start, start + self.width)


def head_sites(pipe, text: bool = True) -> dict[str, HeadSite]:
    """Every attention layer's heads by layer name, in network order: with ``text``, each text encoder's
    layers (``text.{i}``, ``text2.{i}``, ...), then every layer of the denoiser where text meets image.

    >>> import workbench
    >>> sites = head_sites(workbench.load("toy-dit"), text=False)
    >>> list(sites)[-2:], sites["dit.0"].parts, sites["dit.single.1"].parts
    (['dit.single.0', 'dit.single.1'], ('dit.0.img.out', 'dit.0.text.out'), ('dit.single.1.out',))
    """
    family = family_of(pipe)
    table = family.parts(pipe)
    out: dict[str, HeadSite] = {}
    if text:
        encoders = family.encoders(pipe)
        for e in text_encoders(pipe):
            config = encoders[e].config
            heads = getattr(config, "num_attention_heads", None) or config.num_heads  # T5 says num_heads
            for i in range(len(text_layers(pipe, e))):
                part = f"{e}.{i}.attn.out"
                out[f"{e}.{i}"] = HeadSite(f"{e}.{i}", (part,), heads, table[part].in_features // heads, 0, "text")
    named = {id(m): name for name, m in table.items()}
    for layer, attn in family.cross_attention(pipe).items():
        to_out = getattr(attn, "to_out", None)
        projections = [None if to_out is None else to_out[0], getattr(attn, "to_add_out", None)]
        parts = tuple(named[id(m)] for m in projections if m is not None and id(m) in named)
        if not parts:  # a single block: its fused out projection reads the heads, then the MLP
            parts = (f"{layer}.out",)
        inner = getattr(attn, "inner_dim", None) or attn.to_q.out_features
        out[layer] = HeadSite(layer, parts, attn.heads, inner // attn.heads, 0, layer.split(".")[0])
    return out


def _chosen(sites: dict[str, HeadSite], layers: str | Sequence[str] | None) -> list[HeadSite]:
    """The sites named by ``layers`` (layer names or globs; all when None), in network order."""
    if layers is None:
        return list(sites.values())
    wanted = as_list(layers)
    _known(sites, [w for w in wanted if not any(fnmatch.fnmatchcase(name, w) for name in sites)])
    return [s for name, s in sites.items() if any(fnmatch.fnmatchcase(name, w) for w in wanted)]


def _known(sites: dict[str, HeadSite], missing: list[str]) -> None:
    if missing:
        raise ValueError(f"{', '.join(map(repr, missing))}: no such attention layer; layers with heads: "
                         f"{', '.join(sites)}")


def _check_heads(sites: dict[str, HeadSite], heads: dict[str, Sequence[int]]) -> dict[str, list[int]]:
    """``heads`` with every layer and head index checked, each layer's heads sorted, once each."""
    _known(sites, [layer for layer in heads if layer not in sites])
    out = {}
    for layer, chosen in heads.items():
        chosen = sorted({int(h) for h in ([chosen] if isinstance(chosen, int) else chosen)})
        bad = [h for h in chosen if not 0 <= h < sites[layer].heads]
        if bad:
            raise ValueError(f"head {', '.join(map(str, bad))} of {layer}: it has heads 0..{sites[layer].heads - 1}")
        if chosen:
            out[layer] = chosen
    return out


def _head_hook(mask: torch.Tensor, source: torch.Tensor | None = None) -> Callable:
    """A pre-hook on an output projection that rewrites the masked columns of each row it reads.

    ``mask`` ``[rows, 1 or tokens, columns]``: which entries of each of the ``rows`` drawn; a call may hold
    several copies of them (the two halves of a classifier-free-guidance batch), each patched alike.
    ``source``: ``None`` zeroes them; a long tensor of row indices copies them from those rows of the same
    copy; a tensor ``[1, tokens, columns]`` pastes its entries."""
    rows = len(mask)

    def hook(module, inputs):
        x = inputs[0]
        copies = len(x) // rows
        if copies * rows != len(x):
            raise RuntimeError(f"an output projection read {len(x)} rows where {rows} rows were drawn; head "
                               "patching needs each call to hold whole copies of the drawn rows")
        m = mask.to(x.device).repeat(copies, 1, 1)
        if source is None:
            new = x.masked_fill(m, 0)
        elif source.dtype == torch.long:
            idx = torch.cat([source + c * rows for c in range(copies)]).to(x.device)
            new = torch.where(m, x[idx], x)
        else:
            new = torch.where(m, source.to(x.device, x.dtype), x)
        return (new, *inputs[1:])
    return hook


def _masks(units: Sequence[tuple[HeadSite, int] | None], per_unit: int, modules: dict[str, nn.Module],
           tokens: dict[str, tuple[list[int], int]] | None = None) -> dict[str, torch.Tensor]:
    """Per output projection, the mask of :func:`_head_hook`: unit ``u`` (a head, or None for rows left
    alone) owns rows ``u * per_unit ...``, at every token, or with ``tokens`` (per part: the positions, of
    how many tokens) at those positions only."""
    masks: dict[str, torch.Tensor] = {}
    rows = len(units) * per_unit
    for u, unit in enumerate(units):
        if unit is None:
            continue
        site, head = unit
        for part in site.parts:
            at, depth = (slice(None), 1) if tokens is None else tokens[part]
            if part not in masks:
                weight = modules[part].weight
                masks[part] = torch.zeros((rows, depth, weight.shape[1]), dtype=torch.bool, device=weight.device)
            masks[part][u * per_unit:(u + 1) * per_unit, at, site.columns(head)] = True
    return masks


@dataclass
class _Run:
    """``n`` rows to draw: their conditioning, the head they measure (None: a baseline) and whether that
    head is patched in the denoiser while drawing (a text-encoder head is already in the conditioning)."""

    cond: Conditioning
    unit: tuple[HeadSite, int] | None = None
    patched: bool = False


@dataclass
class HeadAttribution:
    """Each head's effect on the judge's probability of ``concept`` (``table``: component, layer, head,
    probability, effect); ``baseline``: the clean probability (``"ablate"``) or the corrupted one
    (``"restore"``) the effects are measured from; ``clean``: the clean run's."""

    concept: str
    prompt: str
    mode: str
    baseline: float
    clean: float
    n: int
    seed: int
    table: pd.DataFrame = field(repr=False)
    seconds: float = 0.0

    def grid(self) -> pd.DataFrame:
        """Effect per layer (rows, network order) and head (columns)."""
        return self.table.pivot_table(index="layer", columns="head", values="effect", sort=False)

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` heads that matter most: the most negative effects when ablated, the most positive
        when restored."""
        pick = pd.DataFrame.nsmallest if self.mode == "ablate" else pd.DataFrame.nlargest
        return pick(self.table, k, "effect").reset_index(drop=True)

    def heads(self, k: int = 10) -> dict[str, list[int]]:
        """The :meth:`top` ``k`` heads as ``{layer: [heads]}`` (what :class:`HeadAblation` takes); when
        ablated, only heads whose ablation lowered the probability."""
        rows = self.top(k)
        if self.mode == "ablate":
            rows = rows[rows["effect"] < 0]
        out: dict[str, list[int]] = {}
        for layer, head in zip(rows["layer"], rows["head"]):
            out.setdefault(layer, []).append(int(head))
        return {layer: sorted(h) for layer, h in out.items()}


def attribute(pipe, concept: str, judge: Judge | None = None, *, layers: str | Sequence[str] | None = None,
              mode: str = "ablate", n: int = 1, seed: int = 0, steps: int = STEPS, guidance: float = GUIDANCE,
              batch: int = BATCH, prompt: str | None = None, concept_set: ConceptSet | None = None,
              noise: float = NOISE, progress: Callable[[int, int], None] | None = None) -> HeadAttribution:
    """Every head's effect on ``concept`` in ``prompt`` (default the concept set's first probe prompt) over
    ``n`` images (seeds ``seed``, ``seed + 1``, ...) per run. ``layers``: layer names or globs
    (``"unet.*"``; default every layer of :func:`head_sites`); ``mode``: ``"ablate"`` or ``"restore"``
    (``noise``: the corruption, as in :func:`workbench.tracing.trace`); ``batch``: rows per denoising
    call; ``progress(done, total)`` is called as heads are measured.

    >>> import workbench
    >>> pipe = workbench.load("toy")
    >>> result = attribute(pipe, "apple", layers="unet.mid.0", n=1, steps=2)
    >>> len(result.table), result.grid().shape, result.mode
    (32, (1, 32), 'ablate')
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
    if n < 1:
        raise ValueError(f"n (images per run) must be at least 1, not {n}")
    if batch < 1:
        raise ValueError(f"batch (rows per denoising call) must be at least 1, not {batch}")
    if mode == "restore" and not noise > 0:
        raise ValueError(f"noise must be positive (standard deviations of the embeddings), not {noise}")
    prompt, judge, labels = concept_setup(pipe, concept, prompt, judge, concept_set)
    chosen = _chosen(head_sites(pipe), layers)
    start = time.perf_counter()
    restore = mode == "restore"
    family = family_of(pipe)
    modules = family.parts(pipe)
    units = [(site, h) for site in chosen for h in range(site.heads)]
    in_text = [u for u in units if u[0].component == "text"]
    text = Text(pipe, prompt, encoder_positions(pipe, prompt, concept), n, noise, seed) if restore else None
    clean = text.clean if restore else family.encode(pipe, [prompt])
    base = text.corrupted() if restore else clean.expand(n)
    runs = [_Run(base)]
    runs += _text_runs(pipe, prompt, in_text, n, batch, modules, text)
    runs += [_Run(base, u, True) for u in units if u[0].component != "text"]
    sampler = Sampler(pipe, n, seed, steps, guidance)
    scores, clean_score = _draw(sampler, runs, clean.expand(n) if restore else None, modules, judge, labels,
                                concept, batch, progress)
    baseline = scores[0]
    clean_score = baseline if clean_score is None else clean_score
    table = pd.DataFrame([dict(component=r.unit[0].component, layer=r.unit[0].layer, head=r.unit[1], probability=p)
                          for r, p in zip(runs, scores) if r.unit is not None],
                         columns=["component", "layer", "head", "probability"])
    table["effect"] = table["probability"] - baseline
    return HeadAttribution(concept, prompt, mode, baseline, clean_score, n, seed, table,
                           time.perf_counter() - start)


def _text_runs(pipe, prompt: str, units: list[tuple[HeadSite, int]], n: int, batch: int,
               modules: dict[str, nn.Module], text: Text | None) -> list[_Run]:
    """One run per text-encoder head: the prompt encoded with the head zeroed (``text`` None), or the
    corrupted prompt (``n`` noise draws) with the head's clean output pasted back at the concept's tokens."""
    if not units:
        return []
    family = family_of(pipe)
    if text is None:
        runs = []
        for i in range(0, len(units), max(1, batch)):
            chunk = units[i:i + batch]
            hooks = [(modules[p], _head_hook(m)) for p, m in _masks(chunk, 1, modules).items()]
            with hooked(hooks, pre=True):
                cond = family.encode(pipe, [prompt] * len(chunk))
            runs += [_Run(cond[k:k + 1].expand(n), unit) for k, unit in enumerate(chunk)]
        return runs
    parts = sorted({p for site, _ in units for p in site.parts})
    seen: dict[str, torch.Tensor] = {}

    def keep(part: str) -> Callable:
        def hook(module, inputs):
            seen[part] = inputs[0].detach()
        return hook

    with hooked([(modules[p], keep(p)) for p in parts], pre=True):
        family.encode(pipe, [prompt])
    tokens = {p: (text.positions[p.split(".")[0]], seen[p].shape[1]) for p in parts}
    runs = []
    per = max(1, batch // n)
    for i in range(0, len(units), per):
        chunk = units[i:i + per]
        rows = n * len(chunk)
        hooks = [(modules[p], _head_hook(m, seen[p])) for p, m in _masks(chunk, n, modules, tokens).items()]

        def corrupt(e: str) -> Callable:
            def hook(module, inputs, output):
                return output + text.noise[e].repeat(len(chunk), 1, 1).to(output.device, output.dtype)
            return hook
        with hooked([(table, corrupt(e)) for e, table in text.tables.items()]), hooked(hooks, pre=True):
            cond = family.encode(pipe, [prompt] * rows)
        runs += [_Run(cond[k * n:(k + 1) * n], unit) for k, unit in enumerate(chunk)]
    return runs


def _draw(sampler: Sampler, runs: list[_Run], source: Conditioning | None, modules: dict[str, nn.Module],
          judge: Judge, labels, concept: str, batch: int,
          progress: Callable[[int, int], None] | None) -> tuple[list[float], float | None]:
    """The judge's probability per run, drawn ``batch`` rows at a time; with ``source`` (restoring), every
    call starts with those clean rows, which its patched heads copy from: returns their probability too."""
    n = sampler.n
    lead = [_Run(source)] if source is not None else []
    per = max(1, batch // n - len(lead))
    total, done = sum(r.unit is not None for r in runs), 0
    if progress is not None:
        progress(0, total)
    scores: list[float] = []
    clean: float | None = None
    for i in range(0, len(runs), per):
        chunk = lead + runs[i:i + per]
        masks = _masks([r.unit if r.patched else None for r in chunk], n, modules)
        from_rows = torch.arange(n * len(chunk)) % n if source is not None else None
        hooks = [(modules[p], _head_hook(m, from_rows)) for p, m in masks.items()]
        with hooked(hooks, pre=True):
            images = sampler.draw(Conditioning.cat([r.cond for r in chunk]))
        got = probability(judge, images, labels, concept, n)
        if lead:
            clean = got[0] if clean is None else clean
            got = got[1:]
        scores += got
        done += sum(r.unit is not None for r in chunk)
        if progress is not None:
            progress(done, total)
    return scores, clean


class HeadAblation(Intervention):
    """Attention heads zeroed at inference: ``tensors[part]`` marks the columns of each output
    projection's input to zero (``params["units"]``: the heads per part, ``params["heads"]`` per layer).

    >>> import workbench
    >>> from workbench.edits import applied
    >>> pipe = workbench.load("toy")
    >>> off = HeadAblation.of(pipe, "apple", {"unet.mid.0": [0, 3]})
    >>> with off.apply(pipe):
    ...     during = [e.kind for e in applied(pipe)]
    >>> during, applied(pipe)
    (['heads'], [])
    >>> off.summary()
                       part       changes  units
    0  unet.mid.0.xattn.out  heads zeroed      2
    """

    kind = "heads"

    @classmethod
    def of(cls, pipe, concept: str, heads: dict[str, Sequence[int]], method: str = "heads",
           **fields) -> "HeadAblation":
        """The heads ``{layer: [head, ...]}`` of ``pipe`` zeroed (layers as :func:`head_sites` names them)."""
        sites = head_sites(pipe)
        heads = _check_heads(sites, heads)
        if not heads:
            raise ValueError("no heads to ablate: name at least one, as {layer: [head, ...]}")
        modules = family_of(pipe).parts(pipe)
        tensors: dict[str, torch.Tensor] = {}
        units: dict[str, list[int]] = {}
        for layer, chosen in heads.items():
            site = sites[layer]
            for part in site.parts:
                mask = tensors.setdefault(part, torch.zeros(modules[part].weight.shape[1], dtype=torch.bool))
                for h in chosen:
                    mask[site.columns(h)] = True
                units[part] = chosen
        params = {"sites": list(tensors), "units": units, "heads": heads, "changes": "heads zeroed"}
        return cls(tensors, method, concept, params=params, **fields)

    def check(self, pipe) -> None:
        """Raise ``ValueError`` if a hooked projection is missing or reads another number of columns."""
        super().check(pipe)
        modules = family_of(pipe).parts(pipe)
        wrong = [p for p in self.parts if modules[p].weight.shape[1] != len(self.tensors[p])]
        if wrong:
            raise ValueError(f"this head ablation of {self.concept!r} was made for projections of other widths "
                             f"({', '.join(wrong)}); the model was left unchanged")

    def hooks(self, pipe) -> list[Site]:
        def zero(part: str) -> Callable:
            mask = self.tensors[part]

            def hook(module, inputs):
                x = inputs[0]
                return (x.masked_fill(mask.to(x.device), 0), *inputs[1:])
            return hook
        return [(part, zero(part), True) for part in self.parts]


def ablate_heads(pipe, concept: str, heads: dict[str, Sequence[int]] | None = None, top: int = 8,
                 judge: Judge | None = None, **attribution) -> HeadAblation:
    """A :class:`HeadAblation` of ``heads`` (``{layer: [head, ...]}``); when None, of the ``top`` heads whose
    ablation lowers the judge's probability of ``concept`` most (:func:`attribute` with ``attribution``'s
    keywords: ``layers``, ``n``, ``steps``, ...).

    >>> import workbench
    >>> pipe = workbench.load("toy")
    >>> ablate_heads(pipe, "apple", {"unet.mid.0": [3, 1]}).params["units"]
    {'unet.mid.0.xattn.out': [1, 3]}
    """
    if heads is not None:
        return HeadAblation.of(pipe, concept, heads)
    if top < 1:
        raise ValueError(f"top (heads to ablate) must be at least 1, not {top}")
    found = attribute(pipe, concept, judge, mode="ablate", **attribution)
    chosen = found.heads(top)
    if not chosen:
        raise ValueError(f"no head's ablation lowered the probability of {concept!r} (clean {found.clean:.3f}); "
                         "nothing to ablate")
    return HeadAblation.of(pipe, concept, chosen, seed=found.seed, seconds=found.seconds)
