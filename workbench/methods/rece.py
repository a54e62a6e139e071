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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..anatomy import Selector, as_list, parts as all_parts
from ..edits import Edit, Timer
from ..embed import check_prompt
from ..families import family_of
from ..keys import rows as entry_rows, samples
from .solver import Gram, System, groups, stack, unstack
from .uce import Spans, aligned_rows, by_space, cross_attention_parts, edit_weights, spans_in, weights_device

#: Where RECE's epochs hold the preserved prompts: at the current weights' outputs (the reference) or the original's.
PRESERVE_AT = ("current", "original")


def derive_embedding(base: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
                     current: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
                     keys: torch.Tensor, ridge: float) -> torch.Tensor:
    """Rows c' = (sum W'^T W' + ridge I)^-1 (sum W'^T W) c for every row c of ``keys``.

    ``base`` (W) and ``current`` (W') give the matrices by part name, or as two lists in the same order
    whose entries may be several matrices stacked row-wise (:func:`~workbench.methods.solver.stack`).
    Summed in float64 on the weights' device; returned as float32 on the device of ``keys``.
    """
    if isinstance(base, Mapping):
        base, current = list(base.values()), [current[name] for name in base]
    d, device = keys.shape[-1], current[0].device
    A = ridge * torch.eye(d, dtype=torch.float64, device=device)
    B = torch.zeros(d, d, dtype=torch.float64, device=device)
    for W, Wc in zip(base, current):
        Wc = Wc.to(device, torch.float64)
        A.addmm_(Wc.T, Wc)
        B.addmm_(Wc.T, W.to(device, torch.float64))
    X = torch.cholesky_solve(B, torch.linalg.cholesky(A))  # A X = B; A is positive definite
    rows = keys.reshape(-1, d).to(device, torch.float64) @ X.T
    return rows.reshape(keys.shape).to(keys.device, torch.float32)


@dataclass
class _Group:
    """Cross-attention k/v matrices solved together (:func:`~workbench.methods.solver.groups`): their
    original and current rows, stacked in float64, the rows the edit changes, and those rows' targets."""

    names: list[str]  # every matrix of the group, edited or not
    base: torch.Tensor  # [rows, width]
    current: torch.Tensor  # [rows, width]; the unedited rows stay original
    edited: slice | torch.Tensor | None  # the edited rows (None: none of them)
    targets: torch.Tensor | None  # [erase rows, edited rows]
    rounded: torch.Tensor | None  # the edited rows in the dtype the edit keeps (None: float64)


@dataclass
class _Run:
    """What RECE carries from epoch to epoch in one space of rows (:mod:`workbench.keys`): every matrix
    reading that space in groups (the derived embeddings sum over all of them), the concepts' rows, and
    the growing erase set."""

    space: str
    weights: dict[str, torch.Tensor]  # the edited matrices' original weights, as the model holds them
    groups: list[_Group]
    full: torch.Tensor  # [k * samples, tokens, width]: the concepts' rows
    at: list[Spans]  # the rows that carry each concept
    guide: torch.Tensor  # [k * samples, tokens, width]: the guide's rows, once per concept
    guide_at: list[Spans]  # the guide's rows from its last word (its first row for the empty prompt)
    keep: Gram | None
    erase_keys: list[torch.Tensor]

    def new(self) -> dict[str, torch.Tensor]:
        out = {}
        for g in self.groups:
            if g.edited is not None:
                out |= unstack(g.current[g.edited], {f"{n}.weight": self.weights[f"{n}.weight"]
                                                     for n in g.names if f"{n}.weight" in self.weights})
        return out


def _edit(runs: list[_Run], method: str) -> Edit:
    weights, new = {}, {}
    for run in runs:
        weights |= run.weights
        new |= run.new()
    return Edit.between(weights, new, method=method, concept="")


def _rows_of(names: list[str], group: list[str], sizes: list[int]) -> slice | torch.Tensor | None:
    """The stacked rows of ``names`` in ``group`` (matrices of ``sizes`` rows): a slice when they are
    one run, None when there are none."""
    offsets = torch.tensor([0] + sizes).cumsum(0).tolist()
    spans = [(offsets[i], offsets[i + 1]) for i, n in enumerate(group) if n in names]
    if not spans:
        return None
    if all(a[1] == b[0] for a, b in zip(spans, spans[1:])):
        return slice(spans[0][0], spans[-1][1])
    return torch.cat([torch.arange(a, b) for a, b in spans])


def _group(table: dict, group: list[str], names: list[str], first: dict[str, torch.Tensor],
           guide_rows: torch.Tensor) -> _Group:
    """One group at the start: original rows, the UCE start's rows where edited, their first targets."""
    base = stack(table[n].weight for n in group)
    current = base.clone()
    edited = _rows_of(names, group, [table[n].weight.shape[0] for n in group])
    if edited is None:
        return _Group(group, base, current, None, None, None)
    current[edited] = stack((first[f"{n}.weight"] for n in group if n in names), base.device)
    targets = guide_rows.to(base.device, torch.float64) @ base[edited].T
    master = torch.promote_types(table[group[0]].weight.dtype, torch.float32)  # the model's, >= float32
    rounded = None if master == torch.float64 else torch.empty(current[edited].shape, dtype=master,
                                                                 device=base.device)
    return _Group(group, base, current, edited, targets, rounded)


def _start(pipe, concepts: list[str], guide: str, preserve: Sequence[str], names: list[str], uce_lam: float,
           uce_preserve_scale: float, preserve_empty: bool) -> list[_Run]:
    """UCE: map the concepts' rows onto the guide's, one system per space; each erase set starts with
    them. The preserve set is ``preserve``, with the empty prompt first when ``preserve_empty``."""
    k = len(concepts)
    grouped = by_space(pipe, names)
    found = entry_rows(pipe, concepts + [guide, ""] + list(preserve), list(grouped), device=weights_device(pipe, names))
    table = all_parts(pipe)
    entries = family_of(pipe).text_entries(pipe)
    runs = []
    for space, edited in grouped.items():
        emb, s = found[space], samples(pipe, space)
        spans = spans_in(pipe, concepts + [guide], space)
        full, at = emb[:k * s], spans[:k * s]
        guide_emb, guide_at = emb[k * s:(k + 1) * s].repeat(k, 1, 1), spans[k * s:] * k
        keys, guide_rows = aligned_rows(full, at, guide_emb, guide_at)
        kept = emb[(k + 1) * s:] if preserve_empty else emb[(k + 2) * s:]  # ["", *preserve] or preserve
        keep = Gram.of(kept) if len(kept) else None
        weights, first = edit_weights(pipe, edited, keys, guide_rows, keep, uce_lam, 1.0, uce_preserve_scale)
        # (A) sums over every matrix reading this space, edited or not (every cross-attention k/v of a UNet)
        everything = {n: table[n].weight for n, where in entries.items() if where == space}
        run_groups = [_group(table, group, edited, first, guide_rows) for group in groups(everything)]
        runs.append(_Run(space, weights, run_groups, full, at, guide_emb, guide_at, keep, [keys.double()]))
    return runs


def _epoch(run: _Run, ridge: float, lam: float, preserve_scale: float, preserve_at: str) -> torch.Tensor:
    """(A) derive the embeddings that still regenerate the concepts; (B) add them to the erase set, each
    row mapped to what the current weights make of the guide, and re-solve, the preserved prompts held at
    the current (or original) weights' outputs. Returns (A)'s rows."""
    derived = derive_embedding([g.base for g in run.groups], [g.current for g in run.groups], run.full, ridge)
    rows, guide_rows = aligned_rows(derived, run.at, run.guide, run.guide_at)
    run.erase_keys.append(rows.double())
    K = torch.cat(run.erase_keys)
    system = System.build(Gram.of(K), K, run.keep, lam, 1.0, preserve_scale, run.groups[0].base.device)
    guides = guide_rows.to(system.keys.device, torch.float64)
    for g in run.groups:
        if g.edited is None:
            continue
        now = g.current[g.edited]  # a view of the stack when the edited rows are one run, else a copy
        g.targets = torch.cat([g.targets, guides @ now.T])
        held = None if preserve_at == "current" else g.base[g.edited]
        system.solve_(now, g.targets, preserve_weight=held)
        if g.rounded is not None:  # rounded as the edit's weights are, without a new stack-sized tensor
            now.copy_(g.rounded.copy_(now))
        if not isinstance(g.edited, slice):
            g.current[g.edited] = now
    return derived[0] if len(derived) == 1 else derived


def _choose(candidates: list[Edit], validate: Callable[[Edit], float] | None) -> tuple[int, list[float]]:
    """The best epoch by ``validate`` (higher is better; the last one without it), and the scores."""
    if validate is None:
        return len(candidates) - 1, []
    scores = [float(validate(c)) for c in candidates]
    return max(range(len(candidates)), key=lambda i: scores[i]), scores


def rece(pipe, concept: str | Sequence[str], guide: str = "", preserve: Sequence[str] = (),
         parts: Selector | None = None, epochs: int = 3, ridge: float = 1e-3, lam: float = 0.1,
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
    The derived embeddings are returned as ``edit.extras["derived.{epoch}"]`` (token rows), and those
    of other spaces as ``"derived.{space}.{epoch}"`` (a transformer's pooled vector or a block's keys).
    """
    concepts = as_list(concept)
    for text in concepts:
        check_prompt(pipe, text)
    if preserve_at not in PRESERVE_AT:
        raise ValueError(f"preserve_at must be one of {', '.join(map(repr, PRESERVE_AT))}, not {preserve_at!r}")
    names = cross_attention_parts(pipe, parts, "RECE")
    every = validate is not None  # without a validator only the last epoch's edit is made
    with Timer() as timer:
        runs = _start(pipe, concepts, guide, preserve, names, uce_lam, uce_preserve_scale, preserve_empty)
        candidates, derived = [_edit(runs, "uce")] if every or not epochs else [], {}
        for epoch in range(epochs):
            for run in runs:
                key = "derived" if run.space == "tokens" else f"derived.{run.space}"
                derived[f"{key}.{epoch}"] = _epoch(run, ridge, lam, preserve_scale, preserve_at)
            if every or epoch == epochs - 1:
                candidates.append(_edit(runs, "rece"))
    best, scores = _choose(candidates, validate)
    chosen, best = candidates[best], best if every else epochs
    chosen.method, chosen.concept, chosen.seconds = "rece", ", ".join(concepts), timer.seconds
    chosen.params = dict(erase=concepts, guide=guide, preserve=list(preserve), parts=names, epochs=epochs,
                         best_epoch=best, ridge=ridge, lam=lam, preserve_scale=preserve_scale,
                         uce_lam=uce_lam, uce_preserve_scale=uce_preserve_scale, preserve_at=preserve_at,
                         preserve_empty=preserve_empty, scores=scores)
    chosen.extras = derived
    return chosen
