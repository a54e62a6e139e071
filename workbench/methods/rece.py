"""RECE: Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024).

UCE first; then, each epoch, (A) derive in closed form the embedding that still makes the edited model
produce what the original made for the concept, and (B) erase that embedding too with a UCE step.

As in the reference code: (A) sums over every cross-attention k/v of the UNet, also when only some are
edited (the others have W' = W); (B) maps the derived rows onto what the *current* weights make of the
guide (the empty prompt by default), keeps the preserved prompts at the current weights' outputs
(``preserve_at="current"``) and always preserves the empty prompt, the unconditional branch of
classifier-free guidance (``preserve_empty=True``), in the UCE start too.

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

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..anatomy import Selector, as_list, parts as all_parts, select
from ..edits import Edit, Timer
from ..embed import check_prompt, encode, last_word
from .solver import Gram, System
from .uce import XATTN, aligned_rows, cross_attention_parts, edit_weights

#: Where RECE's epochs hold the preserved prompts: at the current weights' outputs (the reference) or the original's.
PRESERVE_AT = ("current", "original")


def derive_embedding(base: dict[str, torch.Tensor], current: dict[str, torch.Tensor],
                     keys: torch.Tensor, ridge: float) -> torch.Tensor:
    """Rows c' = (sum W'^T W' + ridge I)^-1 (sum W'^T W) c for every row c of ``keys``.

    Summed in float64 on the weights' device; returned as float32 on the device of ``keys``.
    """
    d = keys.shape[-1]
    device = next(iter(current.values())).device
    A = ridge * torch.eye(d, dtype=torch.float64, device=device)
    B = torch.zeros(d, d, dtype=torch.float64, device=device)
    for name, W in base.items():
        Wc = current[name].double()
        A += Wc.T @ Wc
        B += Wc.T @ W.to(device, torch.float64)
    X = torch.linalg.solve(A, B)  # A X = B, A symmetric positive definite
    rows = keys.reshape(-1, d).to(device, torch.float64) @ X.T
    return rows.reshape(keys.shape).to(keys.device, torch.float32)


@dataclass
class _Run:
    """What RECE carries from epoch to epoch: the original and current weights (of every cross-attention
    k/v: the derived embeddings sum over all of them), the concept's rows, and the growing erase set
    (keys, and per edited matrix their targets)."""

    names: list[str]  # the edited matrices
    base: dict[str, torch.Tensor]  # every cross-attention k/v, original
    current: dict[str, torch.Tensor]  # every cross-attention k/v, now (the unedited ones stay original)
    full: torch.Tensor  # [k, tokens, width]: the concepts' embeddings
    at: list[int]  # the first row of each concept's last word
    guide: torch.Tensor  # [k, tokens, width]: the guide's embedding, once per concept
    guide_at: int  # the first row of the guide's last word (0 for the empty prompt)
    keep: Gram | None
    erase_keys: list[torch.Tensor]
    targets: dict[str, list[torch.Tensor]]

    def edit(self, method: str) -> Edit:
        return Edit.between({f"{n}.weight": self.base[n] for n in self.names},
                            {f"{n}.weight": self.current[n] for n in self.names}, method=method, concept="")


def _start(pipe, concepts: list[str], guide: str, preserve: Sequence[str], names: list[str], uce_lam: float,
           uce_preserve_scale: float, preserve_empty: bool) -> _Run:
    """UCE: map the concepts' rows onto the guide's; the erase set starts with them. The preserve set is
    ``preserve``, with the empty prompt first when ``preserve_empty``."""
    k = len(concepts)
    emb = encode(pipe, concepts + [guide, ""] + list(preserve))
    full = emb[:k]
    at = last_word(pipe, concepts + [guide])
    guide_emb = emb[k].expand(k, -1, -1)
    keys, guide_rows = aligned_rows(full, at[:k], guide_emb, [at[k]] * k)
    kept = emb[k + 1:] if preserve_empty else emb[k + 2:]  # ["", *preserve] or preserve
    keep = Gram.of(kept) if len(kept) else None
    base_w, first_w = edit_weights(pipe, names, keys, guide_rows, keep, uce_lam, 1.0, uce_preserve_scale)
    table = all_parts(pipe)
    everything = select(pipe, XATTN)  # (A) sums over every cross-attention k/v, edited or not
    base = {n: base_w[f"{n}.weight"] if n in names else table[n].weight.detach() for n in everything}
    current = {n: first_w[f"{n}.weight"] if n in names else base[n] for n in everything}
    targets = {n: [guide_rows.to(base[n].device, torch.float64) @ base[n].double().T] for n in names}
    return _Run(names, base, current, full, at[:k], guide_emb, at[k], keep, [keys.double()], targets)


def _epoch(run: _Run, ridge: float, lam: float, preserve_scale: float, preserve_at: str) -> torch.Tensor:
    """(A) derive the embeddings that still regenerate the concepts; (B) add them to the erase set, each
    row mapped to what the current weights make of the guide, and re-solve, the preserved prompts held at
    the current (or original) weights' outputs. Returns (A)'s rows."""
    k = len(run.at)
    derived = derive_embedding(run.base, run.current, run.full, ridge)
    rows, guide_rows = aligned_rows(derived, run.at, run.guide, [run.guide_at] * k)
    run.erase_keys.append(rows.double())
    K = torch.cat(run.erase_keys)
    device = run.current[run.names[0]].device
    system = System.build(Gram.of(K), K, run.keep, lam, 1.0, preserve_scale, device)
    for n in run.names:
        Wc = run.current[n]
        run.targets[n].append(guide_rows.to(Wc.device, torch.float64) @ Wc.double().T)
        held = None if preserve_at == "current" else run.base[n]
        run.current[n] = system.solve(Wc, torch.cat(run.targets[n]), preserve_weight=held)
    return derived[0] if k == 1 else derived


def _choose(candidates: list[Edit], validate: Callable[[Edit], float] | None) -> tuple[int, list[float]]:
    """The best epoch by ``validate`` (higher is better; the last one without it), and the scores."""
    if validate is None:
        return len(candidates) - 1, []
    scores = [float(validate(c)) for c in candidates]
    return max(range(len(candidates)), key=lambda i: scores[i]), scores


def rece(pipe, concept: str | Sequence[str], guide: str = "", preserve: Sequence[str] = (),
         parts: Selector = XATTN, epochs: int = 3, ridge: float = 1e-3, lam: float = 0.1,
         preserve_scale: float = 0.1, uce_lam: float = 0.5, uce_preserve_scale: float = 1.0,
         preserve_at: str = "current", preserve_empty: bool = True,
         validate: Callable[[Edit], float] | None = None) -> Edit:
    """Erase ``concept`` with UCE (``uce_lam``, ``uce_preserve_scale``), then ``epochs`` rounds of
    derived-embedding erasure (``ridge``, ``lam``, ``preserve_scale``), each mapping the derived rows
    onto the current weights' outputs for ``guide``.

    ``preserve_at``: ``"current"`` (the reference) holds the preserved prompts at the current weights'
    outputs in each epoch, ``"original"`` at the original model's. ``preserve_empty`` (the reference:
    True) adds the empty prompt to ``preserve``. The derived embeddings sum over every cross-attention
    k/v of the UNet, whatever ``parts`` edits.

    ``validate(edit) -> score`` (higher is better) is called after each epoch and the best epoch is kept.
    The derived embeddings are returned as ``edit.extras["derived.{epoch}"]``.
    """
    concepts = as_list(concept)
    for text in concepts:
        check_prompt(pipe, text)
    if preserve_at not in PRESERVE_AT:
        raise ValueError(f"preserve_at must be one of {', '.join(map(repr, PRESERVE_AT))}, not {preserve_at!r}")
    names = cross_attention_parts(pipe, parts, "RECE")
    with Timer() as timer:
        run = _start(pipe, concepts, guide, preserve, names, uce_lam, uce_preserve_scale, preserve_empty)
        candidates, derived = [run.edit("uce")], {}
        for epoch in range(epochs):
            derived[f"derived.{epoch}"] = _epoch(run, ridge, lam, preserve_scale, preserve_at)
            candidates.append(run.edit("rece"))
    best, scores = _choose(candidates, validate)
    chosen = candidates[best]
    chosen.method, chosen.concept, chosen.seconds = "rece", ", ".join(concepts), timer.seconds
    chosen.params = dict(erase=concepts, guide=guide, preserve=list(preserve), parts=names, epochs=epochs,
                         best_epoch=best, ridge=ridge, lam=lam, preserve_scale=preserve_scale,
                         uce_lam=uce_lam, uce_preserve_scale=uce_preserve_scale, preserve_at=preserve_at,
                         preserve_empty=preserve_empty, scores=scores)
    chosen.extras = derived
    return chosen
