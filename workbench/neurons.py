"""Neurons: which feed-forward neurons carry a concept, scored per denoising step.

A feed-forward layer's *neurons* are the columns of its second linear: what the activation (GEGLU, GELU)
hands on, one number per neuron and token. ConceptPrune (Chavhan et al., 2024) scores them with WANDA:
``|W| x ||x||``, the weight's magnitude times the norm of the neuron's input, here averaged over the
weight's rows so that each neuron has one score, at every denoising step (a text encoder runs once, so
its neurons have one step). Two scores per neuron:

- ``wanda``: on the concept's prompts;
- ``contrastive``: the concept's WANDA minus the preserve prompts' (other concepts): what is the
  concept's own rather than what every prompt uses.

ConceptPrune's *skilled* neurons of a layer at a step are its top ``share`` by the concept's WANDA among
those the concept drives harder than the preserve prompts do; the union over the first ``timesteps`` steps
is what :func:`workbench.methods.prune.prune` zeroes.

>>> import workbench
>>> pipe = workbench.load("toy")
>>> sorted(neuron_layers(pipe, "unet.mid.0"))
['unet.mid.0.ffn.out']
>>> s = scores(pipe, "apple", parts="unet.mid.0", preserve=["an icon of a car"], steps=3)
>>> s.norms["unet.mid.0.ffn.out"].shape        # (steps, neurons)
torch.Size([3, 512])
>>> sorted(s.table().columns)[:4]
['component', 'contrastive', 'layer', 'neuron']
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch

from .activations import during_sampling, in_text
from . import anatomy
from .anatomy import Selector, as_list, component_of, denoiser_prefix, layer_of, select
from .edits import applied
from .families import family_of
from .profile import profile_of
from .sampling import BATCH, GUIDANCE, STEPS

#: ConceptPrune's defaults: the top 1% of a layer's neurons per step ("skill ratio"), united over the first
#: fifth of the sampling steps (their 10 of 50).
SHARE, TIMESTEPS = 0.01, 4
#: The scores a neuron has.
SCORES = ("wanda", "contrastive")


@dataclass(frozen=True)
class NeuronLayer:
    """A feed-forward layer's neurons: the ``count`` input columns from ``start`` of the linear ``part``
    (a FLUX single block's ``out`` reads attention and MLP side by side: its MLP columns come last)."""

    part: str
    start: int
    count: int
    owners: tuple[str, ...]

    @property
    def layer(self) -> str:
        return layer_of(self.part)

    @property
    def component(self) -> str:
        """``text``, ``unet`` or ``dit`` (with the stream of a transformer's double block: ``dit.img``)."""
        top = self.part.split(".")[0]
        kind = component_of(self.part)
        return f"{top}.{kind.split('.')[0]}" if top == "dit" and kind.startswith(("img.", "text.")) else top


def _all_layers(pipe) -> dict[str, NeuronLayer]:
    table = anatomy.parts(pipe)
    out: dict[str, NeuronLayer] = {}
    for name, module in table.items():
        if name.endswith(".ffn.out"):
            out[name] = NeuronLayer(name, 0, module.in_features, (name, name[:-len("out")] + "in"))
        elif component_of(name) == "single.out" and f"{layer_of(name)}.ffn.in" in table:
            mlp = table[f"{layer_of(name)}.ffn.in"].out_features
            out[name] = NeuronLayer(name, module.in_features - mlp, mlp, (name, f"{layer_of(name)}.ffn.in"))
    return out


def neuron_layers(pipe, parts: Selector | None = None) -> dict[str, NeuronLayer]:
    """The feed-forward layers whose neurons ``parts`` select (a part selects its FFN's neurons: ``text.3``,
    ``unet.mid.0.ffn.in`` or ``dit.single.0``), by the name of the linear that reads them; default every
    FFN of the denoiser. A selection without any FFN is an error that lists the layers that have neurons."""
    every = _all_layers(pipe)
    if parts is None:
        prefix = denoiser_prefix(pipe) + "."
        return {k: v for k, v in every.items() if k.startswith(prefix)}
    chosen = set(select(pipe, parts))
    found = {k: v for k, v in every.items() if chosen & set(v.owners)}
    if not found:
        raise ValueError(f"{', '.join(map(repr, as_list(parts)))} selects no feed-forward neurons; layers with "
                         f"neurons: {', '.join(every)}")
    return found


def _mean_square(x: torch.Tensor) -> torch.Tensor:
    """Each row's (prompt's) mean square of every column over its tokens: ``(rows, columns)``, float32 on the CPU."""
    x = x.float().pow(2)
    return x.reshape(len(x), -1, x.shape[-1]).mean(1).cpu()


#: Per pipeline (held weakly): each prompt's mean squares, by the erasures applied and the sampling settings.
_SEEN: weakref.WeakKeyDictionary[object, dict] = weakref.WeakKeyDictionary()


def input_norms(pipe, layers: dict[str, NeuronLayer], prompts: Sequence[str], steps: int = STEPS, seed: int = 0,
                guidance: float = GUIDANCE, batch: int = BATCH) -> dict[str, torch.Tensor]:
    """Each layer's neuron input norms on ``prompts`` (root mean square over prompts and tokens):
    ``(steps, neurons)`` for the denoiser, ``(1, neurons)`` for a text encoder. Each prompt is drawn from its
    own noise (:func:`~workbench.activations.prompt_seed`) and kept in memory per pipeline and erasures
    applied to it, so a prompt another concept's scores drew is not drawn again."""
    context = (tuple(id(e) for e in applied(pipe)), steps, seed, guidance)
    seen = _SEEN.setdefault(pipe, {})
    missing = list(dict.fromkeys(p for p in prompts if (context, p) not in seen))
    text_prefixes = tuple(f"{e}." for e in family_of(pipe).encoders(pipe))
    every = _all_layers(pipe)
    text = [n for n in every if n.startswith(text_prefixes)]
    denoiser = [n for n in every if n not in text]
    for i in range(0, len(missing), batch):
        chunk = missing[i:i + batch]
        found = {n: v[None] for n, v in _split(in_text(pipe, [every[n].part for n in text], chunk, inputs=True,
                                                          reduce=_mean_square), text, every).items()}
        parts_needed = list(dict.fromkeys(every[n].part for n in denoiser))
        drawn = during_sampling(pipe, parts_needed, chunk, seed, steps, guidance, inputs=True, reduce=_mean_square)
        per_step = [_split({p: v[t] for p, v in drawn.items()}, denoiser, every) for t in range(steps)]
        found |= {n: torch.stack([step[n] for step in per_step]) for n in denoiser}
        for k, prompt in enumerate(chunk):
            seen[(context, prompt)] = {n: v[:, k] for n, v in found.items()}
    mine = {n: torch.stack([seen[(context, p)][n] for p in prompts]).mean(0).sqrt() for n in layers}
    while len(seen) > 4096:
        seen.pop(next(iter(seen)))
    return mine


def _split(by_part: dict[str, torch.Tensor], names: list[str], every: dict[str, NeuronLayer]) -> dict[str, torch.Tensor]:
    """Each neuron layer's columns of its linear's ``(rows, columns)`` mean squares."""
    return {n: by_part[every[n].part][:, every[n].start:every[n].start + every[n].count] for n in names}


@dataclass
class NeuronScores:
    """A concept's neuron scores: per layer the mean ``|W|`` of each neuron's column (``weights``) and its
    input norms on the concept's and the preserve prompts (``norms``, ``preserve_norms``: steps x neurons)."""

    concept: str
    prompts: list[str]
    preserve: list[str]
    layers: dict[str, NeuronLayer]
    weights: dict[str, torch.Tensor]
    norms: dict[str, torch.Tensor]
    preserve_norms: dict[str, torch.Tensor]
    steps: int
    seed: int

    def wanda(self, layer: str, preserve: bool = False) -> torch.Tensor:
        """``(steps, neurons)`` WANDA scores of ``layer`` on the concept's (or the preserve) prompts."""
        return self.weights[layer] * (self.preserve_norms if preserve else self.norms)[layer]

    def score(self, layer: str, score: str = "wanda") -> torch.Tensor:
        """``(steps, neurons)``: ``"wanda"`` or ``"contrastive"`` (concept minus preserve)."""
        _check_score(score)
        return self.wanda(layer) - (self.wanda(layer, True) if score == "contrastive" else 0)

    def skilled(self, share: float = SHARE, timesteps: int = TIMESTEPS, score: str = "wanda") -> dict[str, torch.Tensor]:
        """Each layer's skilled neurons (sorted indices): per step, the top ``share`` by ``score`` among those
        the concept drives harder than the preserve prompts, united over the first ``timesteps`` steps."""
        check_share(share)
        out = {}
        for name in self.layers:
            ranked, above = self.score(name, score), self.wanda(name) > self.wanda(name, True)
            steps = min(timesteps, len(ranked))
            keep = max(1, int(share * ranked.shape[1]))
            mask = torch.zeros(ranked.shape[1], dtype=torch.bool)
            for t in range(steps):
                top = ranked[t].topk(keep).indices
                mask[top[above[t, top]]] = True
            out[name] = mask.nonzero()[:, 0]
        return out

    def counts(self, share: float = SHARE, timesteps: int = TIMESTEPS, score: str = "wanda") -> pd.DataFrame:
        """Skilled neurons per layer: ``layer, component, neurons, skilled, share``."""
        chosen = self.skilled(share, timesteps, score)
        return pd.DataFrame([dict(layer=l.layer, part=n, component=l.component, neurons=l.count,
                                  skilled=len(chosen[n]), share=len(chosen[n]) / l.count)
                             for n, l in self.layers.items()])

    def table(self, timesteps: int = TIMESTEPS) -> pd.DataFrame:
        """One row per neuron: both scores averaged over the first ``timesteps`` steps."""
        frames = []
        for name, l in self.layers.items():
            steps = slice(0, min(timesteps, len(self.norms[name])))
            frames.append(pd.DataFrame(dict(
                layer=l.layer, part=name, component=l.component, neuron=range(l.count),
                wanda=self.wanda(name)[steps].mean(0).numpy(),
                preserve=self.wanda(name, True)[steps].mean(0).numpy(),
                contrastive=self.score(name, "contrastive")[steps].mean(0).numpy())))
        return pd.concat(frames, ignore_index=True)


def check_share(share: float) -> None:
    """A share of neurons must lie in (0, 1]."""
    if not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise ValueError(f"share is the fraction of each layer's neurons, in (0, 1] (ConceptPrune's 0.01 is 1%), "
                         f"not {share!r}")


def _check_score(score: str) -> None:
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")


def scores(pipe, concept: str, prompts: Sequence[str] | None = None, preserve: Sequence[str] | None = None,
           parts: Selector | None = None, steps: int = STEPS, seed: int = 0,
           guidance: float = GUIDANCE) -> NeuronScores:
    """``concept``'s neuron scores in every FFN ``parts`` select (default: the denoiser's), per step.

    ``prompts`` default to the concept's erase prompts and ``preserve`` to the other concepts' (the model's
    concept set); the images are drawn on ``seed`` (keep evaluation seeds apart from it).
    """
    layers = neuron_layers(pipe, parts)
    if prompts is None or preserve is None:
        cs = profile_of(pipe).concept_set()
        if concept not in cs:
            raise ValueError(f"{concept!r} is not in the concept set; give prompts and preserve, or a concept of: "
                             f"{', '.join(cs.names)}")
        prompts = cs.prompts(concept) if prompts is None else prompts
        preserve = cs.preserve(concept) if preserve is None else preserve
    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")
    prompts, preserve = as_list(prompts), as_list(preserve)
    if not prompts or not preserve:
        raise ValueError("give at least one concept prompt and one preserve prompt")
    table = anatomy.parts(pipe)
    weights = {n: table[l.part].weight.detach()[:, l.start:l.start + l.count].float().abs().mean(0).cpu()
               for n, l in layers.items()}
    return NeuronScores(concept, prompts, preserve, layers, weights,
                        input_norms(pipe, layers, prompts, steps, seed, guidance),
                        input_norms(pipe, layers, preserve, steps, seed, guidance), steps, seed)


def per_side(counts: pd.DataFrame) -> pd.DataFrame:
    """Skilled neurons per layer, text encoders against the denoiser, from many concepts' :meth:`NeuronScores.counts`
    (a ``concept`` column): the mean over concepts of each concept's mean per layer, with a 95% interval.

    >>> t = pd.DataFrame(dict(concept=["a", "a", "b", "b"], part=["text.0.ffn.out", "unet.mid.0.ffn.out"] * 2,
    ...                       skilled=[10, 8, 12, 6], neurons=[1536, 512] * 2))
    >>> per_side(t)[["side", "skilled", "neurons", "concepts"]].values.tolist()
    [['denoiser', 7.0, 512, 2], ['text', 11.0, 1536, 2]]
    """
    from .stats import mean_interval

    side = counts["part"].str.startswith("text").map({True: "text", False: "denoiser"})
    per = counts.assign(side=side).groupby(["side", "concept"]).agg(skilled=("skilled", "mean"),
                                                                    neurons=("neurons", "first")).reset_index()
    rows = []
    for name, group in per.groupby("side"):
        mean, lo, hi = mean_interval(group["skilled"].tolist())
        rows.append(dict(side=name, skilled=mean, lo=lo, hi=hi, neurons=int(group["neurons"].iloc[0]),
                         share=mean / int(group["neurons"].iloc[0]), concepts=len(group)))
    return pd.DataFrame(rows)
