"""UnlearnDiffAtk (Zhang et al., ECCV 2024): a prefix of soft tokens that makes the erased model denoise
the concept's images as if it had not forgotten them.

``k`` prefix tokens are prepended to the concept's erase prompts and optimised with the *erased* model's
own denoising loss on the concept's images (about 40 steps). With ``project=True`` the forward pass
uses each vector's nearest real token (the gradient passes straight through to the soft vectors), so
the result is a readable prompt: the prefix is those tokens, prepended to each held-out probe prompt.

The loss is the family's (noise, v- or flow-matching velocity). The prefix lives in the encoders that share
the vocabulary of the one making the token rows (:func:`~workbench.attacks.common.vocabulary_encoders`): a
real token is then one id, its rows side by side in each of them. On SD and SDXL that is every encoder;
on FLUX it is T5 (CLIP's vocabulary is another, and it only makes the pooled vector), on SD 3 the two
CLIPs; the other encoders read each prompt without the prefix, so their ids stay fixed (the workbench's
choice: nearest tokens across two tokenizers are not defined). The readable prefix is decoded by the
token rows' tokenizer.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..concepts import ConceptSet
from ..families import family_of
from ..judges import Judge
from ..sampling import seeded
from .common import Crafted, SoftTokens, concept_latents, eval_prompts, input_tables, vocabulary_encoders
from .inversion import at_checkpoints, steps_for, train

#: Optimisation steps, prefix length, learning rate and batch unless told otherwise.
STEPS, TOKENS, LR, BATCH = 40, 5, 1e-2, 4


class Vocabulary:
    """The text encoder's real tokens (special tokens left out) and the nearest one to any vector; with
    several encoders of one vocabulary (SDXL, SD 3's CLIPs: :attr:`encoders`), a token's rows in each
    side by side, so the nearest token is the nearest in all of them together."""

    def __init__(self, pipe) -> None:
        #: The encoders the rows come from: those sharing the token rows' vocabulary.
        self.encoders = vocabulary_encoders(pipe)
        self.tokenizer = tokenizer = family_of(pipe).tokenizer(pipe, self.encoders[0])
        tables = [t.weight.detach().float().cpu() for t in input_tables(pipe, self.encoders).values()]
        size = min(len(tokenizer), *(len(t) for t in tables))  # T5's table has rows no token uses
        special = set(tokenizer.all_special_ids)
        self.ids = torch.tensor([i for i in range(size) if i not in special])
        self.rows = torch.cat([t[self.ids] for t in tables], dim=1)

    def nearest(self, vectors: torch.Tensor) -> torch.Tensor:
        """The id of the nearest real token (Euclidean) to each of ``vectors``."""
        return self.ids[torch.cdist(vectors.detach().float().cpu(), self.rows).argmin(1)]

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        """Each vector replaced by its nearest real token's embedding."""
        return self.rows[torch.cdist(vectors.detach().float().cpu(), self.rows).argmin(1)].to(vectors.device)

    def text(self, ids: torch.Tensor) -> str:
        return self.tokenizer.decode(ids.tolist())


def unlearndiff(pipe, concept: str, concept_set: ConceptSet, judge: Judge | None = None, budget: int | None = None,
                seed: int = 0, tokens: int = TOKENS, lr: float = LR, batch: int = BATCH, project: bool = True,
                checkpoints: Sequence[int] = ()) -> Crafted:
    """Optimise a ``tokens``-token prefix for ``budget`` steps (default :data:`STEPS`) under the edits
    applied to ``pipe``; the crafted embeddings are the prefix before each held-out probe prompt.
    ``checkpoints``: as for :func:`~workbench.attacks.inversion.inversion`."""
    steps, earlier = steps_for(budget, checkpoints, STEPS)
    vocab = Vocabulary(pipe)
    start = vocab.rows[torch.randint(len(vocab.rows), (tokens,), generator=seeded(seed))]
    soft = SoftTokens(pipe, ["{} " + p.replace("{", "{{").replace("}", "}}") for p in concept_set.prompts(concept)],
                      start, vocab.encoders)
    losses, kept = train(pipe, soft, concept_latents(pipe, concept_set, concept), steps, lr, batch, seed,
                         vocab.project if project else None, earlier)
    shown = eval_prompts(concept_set, concept)

    def make(trained: torch.Tensor, step: int, info: dict) -> Crafted:
        vectors = vocab.project(trained) if project else trained
        probe = SoftTokens(pipe, ["{} " + p.replace("{", "{{").replace("}", "}}") for p in shown], vectors,
                           vocab.encoders)
        with torch.no_grad():
            embeds = probe.encode().float().cpu().compact()
        prefix = vocab.text(vocab.nearest(vectors)) if project else "<p1..p%d>" % tokens
        return Crafted(embeds, [f"{prefix} {p}" for p in shown],
                       {"tokens": tokens, "lr": lr, "projected": project, "prefix": prefix, **info})

    return at_checkpoints(kept, losses, steps, make)
