"""UCE: Unified Concept Editing (Gandikota et al., 2024), closed form on cross-attention k/v.

>>> import workbench
>>> from workbench.methods import uce
>>> pipe = workbench.load("toy")
>>> edit = uce(pipe, "apple", preserve=["a pear", "a cherry"])
>>> len(edit.parts)
14
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..anatomy import Selector, as_list, parts as all_parts, select
from ..edits import Edit, Timer
from ..embed import check_prompt, concept_spans
from ..families import family_of
from ..keys import rows as entry_rows, samples
from .solver import Gram, System, groups, stack, unstack

XATTN = "unet.*.xattn.[kv]"
#: Rows of a prompt that carry its concept: ``(start, stop)`` runs.
Spans = list[tuple[int, int]]


def cross_attention_parts(pipe, selector: Selector | None, method: str) -> list[str]:
    """Selected part names (default: the family's, ``family.default_entries``), all of which must be
    matrices that read text directly (``family.text_entries``): UNet cross-attention k/v; a
    transformer's ``context_embedder``, pooled projection and double blocks' text k/v."""
    family = family_of(pipe)
    entries = family.text_entries(pipe)
    names = family.default_entries(pipe) if selector is None else select(pipe, selector)
    bad = [n for n in names if n.startswith("text")]
    if bad:
        raise ValueError(f"{method} edits the matrices where text enters the denoiser ({_examples(entries)}); "
                         f"{', '.join(bad[:4])} are text-encoder parts: use the few-shot method for those")
    other = [n for n in names if n not in entries]
    if other:
        raise ValueError(f"{method} edits the matrices that read text directly; {', '.join(other[:4])}"
                         + (f" (and {len(other) - 4} more)" if len(other) > 4 else "")
                         + f" are not: select them with {_examples(entries)}, or train other denoiser parts "
                         "with ESD ('esd')")
    return names


def _examples(entries: dict[str, str]) -> str:
    if any(n.startswith("unet.") for n in entries):
        return "'unet.*.xattn.k', 'unet.*.xattn.v' or 'unet.*.xattn.[kv]'"
    return "'dit.context.proj', 'dit.pooled.in', 'dit.*.text.[kv]' or 'dit.3.text.k'"


def by_space(pipe, names: Sequence[str]) -> dict[str, list[str]]:
    """The names grouped by the space of rows they read, in the order of ``names``."""
    entries = family_of(pipe).text_entries(pipe)
    out: dict[str, list[str]] = {}
    for name in names:
        out.setdefault(entries[name], []).append(name)
    return out


def weights_device(pipe, names: Sequence[str]) -> torch.device:
    """Where the named parts' weights are: the device an edit of them is computed on."""
    return all_parts(pipe)[names[0]].weight.device


def spans_in(pipe, prompts: Sequence[str], space: str) -> list[Spans]:
    """The concept rows of each prompt's row sets in ``space`` (one set per capture timestep for a
    block's keys, the single row of the pooled vector)."""
    if space == "pooled":
        return [[(0, 1)] for _ in prompts]
    per = concept_spans(pipe, list(prompts))
    return [spans for spans in per for _ in range(samples(pipe, space))]


def aligned_rows(prompts: torch.Tensor, at: Sequence[Spans], guides: torch.Tensor,
                 guide_at: Sequence[Spans]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of each erased prompt that carry its concept, and the guide's rows they map to.

    A prompt's rows run from the first token of its last word to the end of the run of rows one
    tokenizer made (``at``, from :func:`~workbench.embed.concept_spans`: the word, the end token and the
    padding, which see the whole prompt in context); the guide's run from its own last word (its first
    row when it is empty); both are cut to the same length, run by run. Rows before the last word
    ("a photo of", the start token) are shared with prompts that must not change, so they stay out of
    the erase set. ``prompts`` and ``guides`` are ``[n, tokens, width]``; returns two ``[rows, width]``
    tensors.
    """
    keys, targets = [], []
    for p, spans, g, guide_spans in zip(prompts, at, guides, guide_at):
        for (a, a_end), (b, b_end) in zip(spans, guide_spans):
            n = min(a_end - a, b_end - b)
            keys.append(p[a:a + n])
            targets.append(g[b:b + n])
    return torch.cat(keys), torch.cat(targets)


def edit_weights(pipe, names: list[str], keys: torch.Tensor, guide_keys: torch.Tensor,
                 keep: Gram | None, lam: float, erase_scale: float, preserve_scale: float):
    """(base, new) weights of the named parts after mapping ``keys`` to the guide's values, solved
    together (:func:`~workbench.methods.solver.groups`)."""
    modules = all_parts(pipe)
    base = {f"{name}.weight": modules[name].weight.detach() for name in names}
    device = base[f"{names[0]}.weight"].device
    system = System.build(Gram.of(keys), keys, keep, lam, erase_scale, preserve_scale, device)
    guides = guide_keys.reshape(-1, keys.shape[-1]).to(system.keys.device, torch.float64)
    new = {}
    for group in groups(base):
        W0 = stack(base[key] for key in group)
        new |= unstack(system.solve_(W0, guides @ W0.T), {key: base[key] for key in group})
    return base, new


def uce(pipe, erase: str | Sequence[str], guide: str | Sequence[str] = "", preserve: Sequence[str] = (),
        parts: Selector | None = None, lam: float = 0.5, erase_scale: float = 1.0,
        preserve_scale: float = 1.0, preserve_empty: bool = False) -> Edit:
    """Erase ``erase`` (concept prompts) by mapping their keys/values to those of ``guide``.

    Each prompt is erased through the rows that carry its concept (:func:`aligned_rows`); ``preserve``
    prompts keep their outputs on every row. ``preserve_empty`` adds the empty prompt (the unconditional
    branch of classifier-free guidance) to them: False as in the UCE authors' current script
    (``uce_sd_erase.py`` preserves only the given prompts; their earlier ``train_erase.py`` preserved ""
    only when no preserve list was given; RECE's copy of UCE always does, see ``rece(preserve_empty=...)``).
    ``parts`` (default: every cross-attention k/v of a UNet; a transformer's ``context_embedder`` and
    pooled projection, as the UCE authors' FLUX code) may be any matrices that read text directly; those
    reading the same rows (:mod:`workbench.keys`) are solved together, one system per space.
    The pipeline is not changed: apply the returned edit.
    """
    erase, preserve = as_list(erase), as_list(preserve)
    guides = as_list(guide) * (len(erase) if isinstance(guide, str) else 1)
    if len(guides) != len(erase):
        raise ValueError(f"give one guide or one per erased prompt ({len(erase)}), not {len(guides)}")
    for text in erase:
        check_prompt(pipe, text)
    names = cross_attention_parts(pipe, parts, "UCE")
    k = len(erase)
    with Timer() as timer:
        kept = ([""] if preserve_empty else []) + preserve
        grouped = by_space(pipe, names)
        found = entry_rows(pipe, erase + guides + kept, list(grouped), device=weights_device(pipe, names))
        base, new = {}, {}
        for space, group in grouped.items():
            emb, s = found[space], samples(pipe, space)
            spans = spans_in(pipe, erase + guides, space)
            keys, guide_keys = aligned_rows(emb[:k * s], spans[:k * s], emb[k * s:2 * k * s], spans[k * s:])
            keep = Gram.of(emb[2 * k * s:]) if kept else None
            b, n = edit_weights(pipe, group, keys, guide_keys, keep, lam, erase_scale, preserve_scale)
            base |= b
            new |= n
    params = dict(erase=erase, guide=guides, preserve=preserve, parts=names, lam=lam,
                  erase_scale=erase_scale, preserve_scale=preserve_scale, preserve_empty=preserve_empty)
    return Edit.between(base, new, method="uce", concept=", ".join(erase), params=params,
                        seconds=timer.seconds)
