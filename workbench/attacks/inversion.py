"""Concept inversion (Pham et al., ICLR 2024): learn new token embeddings that bring the concept back.

On the *erased* model, a few soft tokens ``<v>`` at the text encoder's input are trained with the
ordinary denoising loss on the concept's images, in the templates the concept was erased in
("a photo of <v>", ...): textual inversion against the edit. The attack then prompts with ``<v>`` in the
concept's held-out probe wordings. Adam; the vectors start at the embedding of a concept-free word.

With several text encoders a soft token is every encoder's input vector side by side, each starting at
the word's embedding under its own tokenizer (SDXL's two CLIPs; FLUX's CLIP and T5; SD 3's two CLIPs and
T5): nothing is projected onto a vocabulary, so encoders with different tokenizers pose no problem. The
loss is the family's (noise, v- or flow-matching velocity; FLUX.1-dev at its default distilled guidance).
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from ..concepts import ConceptSet
from ..judges import Judge
from ..families import family_of
from ..hooks import frozen, trainable_attention
from ..sampling import seeded
from .common import (NEUTRAL, Crafted, SoftTokens, batches, concept_latents, denoising_loss, eval_prompts, fill,
                     input_tables, slot)

#: Optimisation steps, learning rate, batch and soft-token count on any model unless told otherwise.
STEPS, LR, BATCH, TOKENS = 100, 5e-3, 4, 1


def word_vectors(pipe, word: str, k: int) -> torch.Tensor:
    """``k`` copies of the mean input embedding of ``word``'s tokens (every text encoder's, side by side):
    where soft tokens start."""
    family = family_of(pipe)
    rows = []
    for e, table in input_tables(pipe).items():
        ids = family.tokenizer(pipe, e)(word, add_special_tokens=False).input_ids
        rows.append(table.weight[ids].detach().float().mean(0, keepdim=True).cpu())
    return torch.cat(rows, dim=1).repeat(k, 1)


def train(pipe, soft: SoftTokens, latents: torch.Tensor, steps: int, lr: float, batch: int, seed: int,
          project: Callable[[torch.Tensor], torch.Tensor] | None = None,
          checkpoints: Sequence[int] = ()) -> tuple[list[float], dict[int, tuple[torch.Tensor, float]]]:
    """Minimise the denoising loss of ``latents`` through ``soft``'s templates; the pipeline is frozen.
    ``project`` (vectors -> vectors), when given, is applied in the forward pass and the gradient passes
    straight through to the soft vectors. Returns the loss of every step, and for each step count in
    ``checkpoints`` (and ``steps``) the vectors after it and the seconds it took to get there: a run to
    400 steps holds the runs to 25, 50, 100 and 200 steps exactly, as every step draws from one
    generator in order."""
    gen = seeded(seed)
    opt = torch.optim.Adam([soft.vectors], lr=lr)
    keep = set(checkpoints) | {steps}
    losses, kept, start = [], {}, time.perf_counter()
    with frozen(*family_of(pipe).components(pipe).values()), trainable_attention(pipe):
        for step in range(1, steps + 1):
            idx, rows = batches(len(latents), len(soft.templates), batch, gen)
            vectors = soft.vectors if project is None else soft.vectors + (project(soft.vectors) - soft.vectors).detach()
            loss = denoising_loss(pipe, latents[idx], soft.encode(rows, vectors), gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if step in keep:
                kept[step] = (soft.vectors.detach().clone(), time.perf_counter() - start)
    return losses, kept


def steps_for(budget: int | None, checkpoints: Sequence[int], default: int) -> tuple[int, list[int]]:
    """The steps to train (the budget, or ``default``) and the checkpoints before it, checked.

    >>> steps_for(100, [25, 50], 40)
    (100, [25, 50])
    """
    steps = default if budget is None else budget
    bad = [c for c in checkpoints if not isinstance(c, int) or not 0 < c <= steps]
    if bad:
        raise ValueError(f"checkpoints must be whole numbers of steps in 1..{steps} (the budget), not {bad}")
    return steps, sorted(set(checkpoints) - {steps})


def at_checkpoints(kept: dict[int, tuple[torch.Tensor, float]], losses: list[float], steps: int,
                   make: Callable[[torch.Tensor, int, dict], Crafted]) -> Crafted:
    """The crafted result after ``steps``, with ``info["checkpoints"]`` holding the one ``make`` builds
    from the vectors of each earlier checkpoint (their ``info`` has ``steps``, ``seconds`` and ``loss_last``)."""
    def made(step: int) -> Crafted:
        vectors, seconds = kept[step]
        return make(vectors, step, {"steps": step, "seconds": seconds, "loss_first": losses[0],
                                    "loss_last": losses[step - 1]})

    final = made(steps)
    final.info["checkpoints"] = {s: made(s) for s in sorted(kept) if s != steps}
    return final


def inversion(pipe, concept: str, concept_set: ConceptSet, judge: Judge | None = None, budget: int | None = None,
              seed: int = 0, tokens: int = TOKENS, lr: float = LR, batch: int = BATCH,
              checkpoints: Sequence[int] = ()) -> Crafted:
    """Learn ``tokens`` soft tokens for ``budget`` steps (default :data:`STEPS`) on the concept's images
    under the edits applied to ``pipe``; the crafted embeddings are its held-out probe wordings with
    ``<v>`` for the concept. ``checkpoints`` (step counts below the budget) also keep what the same run
    had crafted after that many steps, in ``info["checkpoints"]``: one run gives a whole budget curve."""
    steps, earlier = steps_for(budget, checkpoints, STEPS)
    forms = list(concept_set.templates[concept_set.kind(concept)])
    soft = SoftTokens(pipe, [fill(t, "{}") for t in forms], word_vectors(pipe, NEUTRAL, tokens))
    losses, kept = train(pipe, soft, concept_latents(pipe, concept_set, concept), steps, lr, batch, seed,
                         checkpoints=earlier)
    shown = eval_prompts(concept_set, concept)

    def make(vectors: torch.Tensor, step: int, info: dict) -> Crafted:
        probe = SoftTokens(pipe, [slot(p, concept) for p in shown], vectors)
        with torch.no_grad():
            embeds = probe.encode().float().cpu().compact()
        return Crafted(embeds, [slot(p, concept).format("<v>") for p in shown], {"lr": lr, "tokens": tokens, **info})

    return at_checkpoints(kept, losses, steps, make)
