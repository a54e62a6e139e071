"""RECE: Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024).

UCE first; then, each epoch, (A) derive in closed form the embedding that still makes the edited model
produce what the original made for the concept, and (B) erase that embedding too with a UCE step.

Both steps act on the rows that carry the concept (:func:`~workbench.methods.uce.aligned_rows`); the
derived embeddings are kept for every row, so they can be drawn and projected like any prompt's. The
erase set of step (B) grows: the concept itself and every embedding derived so far stay in it, each
with its target, so a later epoch cannot give back what an earlier one erased (with only the newest
embedding in it, the preserve term pulls the concept back and efficacy swings from epoch to epoch).

>>> import workbench
>>> from workbench.methods import rece
>>> pipe = workbench.load("toy")
>>> edit = rece(pipe, "apple", epochs=2)
>>> edit.extras["derived.1"].shape
torch.Size([20, 384])
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..anatomy import Selector
from ..edits import Edit, Timer
from ..embed import check_prompt, encode, last_word
from .solver import Gram, solve
from .uce import XATTN, _as_list, aligned_rows, cross_attention_parts, edit_weights


def derive_embedding(base: dict[str, torch.Tensor], current: dict[str, torch.Tensor],
                     keys: torch.Tensor, ridge: float) -> torch.Tensor:
    """Rows c' = (sum W'^T W' + ridge I)^-1 (sum W'^T W) c for every row c of ``keys``."""
    d = keys.shape[-1]
    A = ridge * torch.eye(d, dtype=torch.float64)
    B = torch.zeros(d, d, dtype=torch.float64)
    for name, W in base.items():
        Wc = current[name].double()
        A += Wc.T @ Wc
        B += Wc.T @ W.double()
    X = torch.linalg.solve(A, B)  # A X = B, A symmetric positive definite
    return (keys.reshape(-1, d).double() @ X.T).reshape(keys.shape).float()


def rece(pipe, concept: str | Sequence[str], guide: str = "", preserve: Sequence[str] = (),
         parts: Selector = XATTN, epochs: int = 3, ridge: float = 1e-3, lam: float = 0.1,
         preserve_scale: float = 0.1, uce_lam: float = 0.5, uce_preserve_scale: float = 1.0,
         validate: Callable[[Edit], float] | None = None) -> Edit:
    """Erase ``concept`` with UCE (``uce_lam``, ``uce_preserve_scale``), then ``epochs`` rounds of
    derived-embedding erasure (``ridge``, ``lam``, ``preserve_scale``).

    ``validate(edit) -> score`` (higher is better) is called after each epoch and the best epoch is kept.
    The derived embeddings are returned as ``edit.extras["derived.{epoch}"]``.
    """
    concepts = _as_list(concept)
    for text in concepts:
        check_prompt(pipe, text)
    names = cross_attention_parts(pipe, parts, "RECE")
    with Timer() as timer:
        k = len(concepts)
        emb = encode(pipe, concepts + [guide, ""] + list(preserve))
        full, empty = emb[:k], emb[k + 1].expand(k, -1, -1)
        at = last_word(pipe, concepts + [guide])
        keys, guide_rows = aligned_rows(full, at[:k], emb[k].expand(k, -1, -1), [at[k]] * k)
        keep = Gram.of(emb[k + 2:]) if preserve else None
        base_w, first_w = edit_weights(pipe, names, keys, guide_rows, keep, uce_lam, 1.0, uce_preserve_scale)
        base = {n: base_w[f"{n}.weight"] for n in names}
        current = {n: first_w[f"{n}.weight"] for n in names}
        first = Edit.between(base_w, first_w, method="uce", concept=", ".join(concepts))
        erase_keys = [keys.double()]
        targets = {n: [guide_rows.double() @ base[n].double().T] for n in names}
        candidates, scores, derived = [first], [], {}
        for epoch in range(epochs):
            c_new = derive_embedding(base, current, full, ridge)
            derived[f"derived.{epoch}"] = c_new[0] if k == 1 else c_new
            rows, harmless = aligned_rows(c_new, at[:k], empty, [0] * k)
            erase_keys.append(rows.double())
            K = torch.cat(erase_keys)
            gram = Gram.of(K)
            for n in names:
                Wc = current[n]
                targets[n].append(harmless.double() @ Wc.double().T)
                current[n] = solve(Wc, gram, torch.cat(targets[n]), K, keep, preserve_weight=base[n],
                                   lam=lam, preserve_scale=preserve_scale)
            candidates.append(Edit.between({f"{n}.weight": base[n] for n in names},
                                           {f"{n}.weight": current[n] for n in names},
                                           method="rece", concept=", ".join(concepts)))
    if validate is not None:
        scores = [float(validate(c)) for c in candidates]
        best = max(range(len(candidates)), key=lambda i: scores[i])
    else:
        best = len(candidates) - 1
    chosen = candidates[best]
    chosen.method, chosen.seconds = "rece", timer.seconds
    chosen.params = dict(erase=concepts, guide=guide, preserve=list(preserve), parts=names, epochs=epochs,
                         best_epoch=best, ridge=ridge, lam=lam, preserve_scale=preserve_scale,
                         uce_lam=uce_lam, uce_preserve_scale=uce_preserve_scale, scores=scores)
    chosen.extras = derived
    return chosen
