"""The derived-embedding attack: RECE's closed form against the *final* edited weights.

For every token row c of the concept's held-out prompts, c* = (sum W'^T W' + ridge I)^-1 (sum W'^T W) c,
summed over every cross-attention k/v of the UNet (W original, W' with the edit): the embedding whose
keys and values in the edited model are closest to what the original model made of the concept. No
optimisation; the attacked model's text encoder makes c, so an edit of the text encoder alone leaves
W' = W and c* = c (up to the ridge): this attack only probes the UNet.

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

from ..anatomy import parts, select
from ..concepts import ConceptSet
from ..embed import conditioning
from ..families import Conditioning
from ..judges import Judge
from ..methods.rece import derive_embedding
from ..methods.uce import XATTN
from .common import Crafted, eval_prompts, original_weights

#: The ridge of the closed form (RECE's for objects and styles).
RIDGE = 1e-3


def derived(pipe, concept: str, concept_set: ConceptSet, judge: Judge | None = None, budget: int | None = None,
            seed: int = 0, ridge: float = RIDGE) -> Crafted:
    """Derived embeddings of the concept's held-out prompts under the edits applied to ``pipe``.
    ``judge``, ``budget`` and ``seed`` are not used: the attack is a closed form."""
    names = select(pipe, XATTN)
    table = parts(pipe)
    base = original_weights(pipe, names)
    current = {n: table[n].weight.detach() for n in names}
    prompts = eval_prompts(concept_set, concept)
    cond = conditioning(pipe, prompts)
    rows = derive_embedding(base, current, cond.tokens, ridge)
    return Crafted(Conditioning(rows, cond.pooled).compact(), [f"derived from: {p}" for p in prompts], {"ridge": ridge})
