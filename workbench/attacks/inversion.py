"""Concept inversion (Pham et al., ICLR 2024): learn new token embeddings that bring the concept back.

On the *erased* model, a few soft tokens ``<v>`` at the text encoder's input are trained with the
ordinary denoising loss on the concept's images, in the templates the concept was erased in
("a photo of <v>", ...): textual inversion against the edit. The attack then prompts with ``<v>`` in the
concept's held-out probe wordings. Adam; the vectors start at the embedding of a concept-free word.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..concepts import ConceptSet
from ..judges import Judge
from ..methods.fewshot import Frozen
from ..sampling import seeded
from .common import (NEUTRAL, Crafted, SoftTokens, batches, concept_latents, denoising_loss, eval_prompts, fill,
                     slot)

#: Optimisation steps, learning rate, batch and soft-token count on any model unless told otherwise.
STEPS, LR, BATCH, TOKENS = 100, 5e-3, 4, 1


def word_vectors(pipe, word: str, k: int) -> torch.Tensor:
    """``k`` copies of the mean input embedding of ``word``'s tokens: where soft tokens start."""
    table = pipe.text_encoder.get_input_embeddings().weight
    ids = pipe.tokenizer(word, add_special_tokens=False).input_ids
    return table[ids].detach().float().mean(0, keepdim=True).repeat(k, 1).cpu()


def train(pipe, soft: SoftTokens, latents: torch.Tensor, steps: int, lr: float, batch: int, seed: int,
          project: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[float]:
    """Minimise the denoising loss of ``latents`` through ``soft``'s templates; the pipeline is frozen.
    ``project`` (vectors -> vectors), when given, is applied in the forward pass and the gradient passes
    straight through to the soft vectors. Returns the loss of every step."""
    gen = seeded(seed)
    opt = torch.optim.Adam([soft.vectors], lr=lr)
    frozen = Frozen(pipe.unet, pipe.vae, pipe.text_encoder)
    losses = []
    try:
        for _ in range(steps):
            idx, rows = batches(len(latents), len(soft.templates), batch, gen)
            vectors = soft.vectors if project is None else soft.vectors + (project(soft.vectors) - soft.vectors).detach()
            loss = denoising_loss(pipe, latents[idx], soft.encode(rows, vectors), gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        frozen.restore()
    return losses


def inversion(pipe, concept: str, concept_set: ConceptSet, judge: Judge | None = None, budget: int | None = None,
              seed: int = 0, tokens: int = TOKENS, lr: float = LR, batch: int = BATCH) -> Crafted:
    """Learn ``tokens`` soft tokens for ``budget`` steps (default :data:`STEPS`) on the concept's images
    under the edits applied to ``pipe``; the crafted embeddings are its held-out probe wordings with
    ``<v>`` for the concept."""
    steps = STEPS if budget is None else budget
    forms = list(concept_set.templates[concept_set.kind(concept)])
    soft = SoftTokens(pipe, [fill(t, "{}") for t in forms], word_vectors(pipe, NEUTRAL, tokens))
    losses = train(pipe, soft, concept_latents(pipe, concept_set, concept), steps, lr, batch, seed)
    shown = eval_prompts(concept_set, concept)
    probe = SoftTokens(pipe, [slot(p, concept) for p in shown], soft.vectors)
    with torch.no_grad():
        embeds = probe.encode().float().cpu()
    return Crafted(embeds, [slot(p, concept).format("<v>") for p in shown],
                   {"steps": steps, "lr": lr, "tokens": tokens, "loss_first": losses[0], "loss_last": losses[-1]})
