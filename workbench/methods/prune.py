"""ConceptPrune (Chavhan et al., 2024): erase a concept by zeroing its skilled feed-forward neurons, no training.

The skilled neurons come from :mod:`workbench.neurons` (WANDA per step, the top ``share`` of each layer among
those the concept drives harder than the preserve prompts, united over the first ``timesteps`` steps). The
edit sets their columns of the FFN's second linear to zero: an :class:`~workbench.edits.Edit` whose deltas
are minus those columns, so reverting gives the weights back exactly.

``unit="weight"`` is the authors' code's granularity: in each output row of the linear, its top ``share``
of weights by ``|W_ij| x ||x_j||`` whose neuron the concept drives harder than the preserve prompts, so a
row loses different inputs than the next; ``unit="neuron"`` (default, this workbench's) zeroes whole
columns, which is what "a neuron" means and what a neuron count counts.

>>> import workbench
>>> pipe = workbench.load("toy")
>>> edit = prune(pipe, "apple", ["an icon of an apple"], preserve=["an icon of a car"], parts="unet.mid.0",
...              share=0.05, steps=3)
>>> edit.parts, edit.params["neurons"]["unet.mid.0.ffn.out"] > 0
(['unet.mid.0.ffn.out'], True)
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..anatomy import Selector, as_list, parts as part_table
from ..edits import Edit, Timer
from ..neurons import SCORES, SHARE, TIMESTEPS, NeuronScores, check_share, scores
from ..sampling import GUIDANCE, STEPS

#: What ``prune`` zeroes: whole neurons (columns) or, as ConceptPrune's code, single weights.
UNITS = ("neuron", "weight")


def _weight_mask(s: NeuronScores, name: str, share: float, timesteps: int, weight: torch.Tensor) -> torch.Tensor:
    """ConceptPrune's mask of one linear: per step and output row, its top ``share`` of inputs by
    ``|W_ij| x ||x_j||`` among the neurons the concept drives harder, united over the first steps."""
    layer = s.layers[name]
    w = weight[:, layer.start:layer.start + layer.count].float().abs().cpu()
    keep = max(1, int(share * layer.count))
    mask = torch.zeros_like(w, dtype=torch.bool)
    for t in range(min(timesteps, len(s.norms[name]))):
        above = s.norms[name][t] > s.preserve_norms[name][t]
        top = (w * s.norms[name][t]).topk(keep, dim=1).indices
        mask.scatter_(1, top, above[top] | mask.gather(1, top))
    return mask


def prune(pipe, concept: str, prompts: str | Sequence[str] | None = None, preserve: Sequence[str] | None = None,
          parts: Selector | None = None, share: float = SHARE, timesteps: int = TIMESTEPS, score: str = "wanda",
          unit: str = "neuron", steps: int = STEPS, guidance: float = GUIDANCE, seed: int = 0) -> Edit:
    """Zero ``concept``'s skilled neurons in the FFNs ``parts`` select (default: the denoiser's).

    ``prompts`` (default the concept's erase prompts) and ``preserve`` (default the other concepts') are
    drawn on ``seed`` for ``steps`` steps to score the neurons; ``share`` of each layer's neurons per step
    (ConceptPrune's 1%), the first ``timesteps`` steps united, by ``score`` (``"wanda"`` as the paper, or
    ``"contrastive"``); ``unit`` says what is zeroed (:data:`UNITS`). The pipeline is not changed: apply
    the returned edit.
    """
    check_share(share)
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, not {unit!r}")
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    if not isinstance(timesteps, int) or timesteps < 1:
        raise ValueError(f"timesteps is how many first sampling steps are united, a whole number >= 1, not {timesteps!r}")
    prompts = None if prompts is None else as_list(prompts)
    with Timer() as timer:
        s = scores(pipe, concept, prompts, preserve, parts, steps, seed, guidance)
        chosen = s.skilled(share, timesteps, score)
        table = part_table(pipe)
        deltas, neurons = {}, {}
        for name, layer in s.layers.items():
            weight = table[layer.part].weight.detach()
            mask = torch.zeros(weight.shape, dtype=torch.bool)
            if unit == "neuron":
                mask[:, layer.start + chosen[name]] = True
            else:
                mask[:, layer.start:layer.start + layer.count] = _weight_mask(s, name, share, timesteps, weight)
            mask = mask.to(weight.device)
            if bool(mask.any()):
                deltas[f"{layer.part}.weight"] = -(weight.float() * mask)
                neurons[name] = int(mask.any(0).sum())
    return Edit(deltas, "prune", concept, params=dict(
        prompts=s.prompts, preserve_count=len(s.preserve), parts=list(s.layers), share=share, timesteps=timesteps,
        score=score, unit=unit, steps=steps, neurons=neurons,
        skilled={n: idx.tolist() for n, idx in chosen.items()}), seed=seed, seconds=timer.seconds)
