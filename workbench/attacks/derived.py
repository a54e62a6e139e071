"""The derived-embedding attack: RECE's closed form against the *final* edited weights.

For every token row c of the concept's held-out prompts, c* = (sum W'^T W' + ridge I)^-1 (sum W'^T W) c,
summed over every matrix that reads the token rows (W original, W' with the edit): every cross-attention
k/v of a UNet, a transformer's ``context_embedder``. The embedding whose projections in the edited model
are closest to what the original model made of the concept. On a transformer the pooled vector is
derived the same way against the pooled projection. No optimisation; the attacked model's text encoder
makes c, so an edit of the text encoder alone leaves W' = W and W c* = W c (up to the ridge): this
attack only probes the matrices where text enters the denoiser. (FLUX's ``context_embedder`` maps
4,096-wide T5 rows to 3,072, so there c* is the least-norm row with the projection sought, not c.) An
edit of a transformer block's own text k/v alone also leaves W c* = W c: those read the block's text
stream, not the token rows, and no closed form maps back through the blocks before it.

>>> import workbench
>>> from workbench.methods import uce
>>> from workbench.profile import profile_of
>>> pipe = workbench.load("toy")
>>> with uce(pipe, "apple").apply(pipe):
...     crafted = derived(pipe, "apple", profile_of(pipe).concept_set())
>>> crafted.embeds.shape, crafted.prompts[0]
(torch.Size([3, 20, 384]), 'derived from: an apple')
"""
from __future__ import annotations

import torch

from ..anatomy import parts
from ..concepts import ConceptSet
from ..embed import conditioning
from ..families import Conditioning, family_of
from ..judges import Judge
from ..methods.rece import derive_embedding
from .common import Crafted, eval_prompts, original_weights

#: The ridge of the closed form (RECE's for objects and styles).
RIDGE = 1e-3


def derived(pipe, concept: str, concept_set: ConceptSet, judge: Judge | None = None, budget: int | None = None,
            seed: int = 0, ridge: float = RIDGE) -> Crafted:
    """Derived embeddings of the concept's held-out prompts under the edits applied to ``pipe``.
    ``judge``, ``budget`` and ``seed`` are not used: the attack is a closed form."""
    prompts = eval_prompts(concept_set, concept)
    cond = conditioning(pipe, prompts)
    rows = _derived(pipe, "tokens", cond.tokens, ridge)
    pooled = cond.pooled
    if pooled is not None and "pooled" in family_of(pipe).text_entries(pipe).values():
        pooled = _derived(pipe, "pooled", pooled[:, None], ridge)[:, 0]
    return Crafted(Conditioning(rows, pooled).compact(), [f"derived from: {p}" for p in prompts], {"ridge": ridge})


def _derived(pipe, space: str, rows: torch.Tensor, ridge: float) -> torch.Tensor:
    """``rows`` derived against every matrix reading ``space`` (original and current weights)."""
    names = [n for n, where in family_of(pipe).text_entries(pipe).items() if where == space]
    table = parts(pipe)
    current = {n: table[n].weight.detach() for n in names}
    return derive_embedding(original_weights(pipe, names), current, rows, ridge)
