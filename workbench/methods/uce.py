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

from ..anatomy import Selector, as_list, component_of, parts as all_parts, select
from ..edits import Edit, Timer
from ..embed import check_prompt, encode, last_word
from .solver import Gram, System, groups, stack, unstack

XATTN = "unet.*.xattn.[kv]"


def cross_attention_parts(pipe, selector: Selector, method: str) -> list[str]:
    """Selected part names, all of which must be UNet cross-attention k/v projections."""
    names = select(pipe, selector)
    bad = [n for n in names if not n.startswith("unet.")]
    if bad:
        raise ValueError(f"{method} edits UNet cross-attention k/v projections (e.g. 'unet.*.xattn.k'); "
                         f"{', '.join(bad[:4])} are text-encoder parts: use the few-shot method for those")
    other = [n for n in names if component_of(n) not in ("xattn.k", "xattn.v")]
    if other:
        raise ValueError(f"{method} edits UNet cross-attention k/v projections only; {', '.join(other[:4])}"
                         + (f" (and {len(other) - 4} more)" if len(other) > 4 else "")
                         + " are not: select them with 'unet.*.xattn.k', 'unet.*.xattn.v' or "
                         "'unet.*.xattn.[kv]', or train other UNet parts with ESD ('esd')")
    return names


def weights_device(pipe, names: Sequence[str]) -> torch.device:
    """Where the named parts' weights are: the device an edit of them is computed on."""
    return all_parts(pipe)[names[0]].weight.device


def aligned_rows(prompts: torch.Tensor, at: Sequence[int], guides: torch.Tensor,
                 guide_at: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of each erased prompt that carry its concept, and the guide's rows they map to.

    A prompt's rows run from the first token of its last word (``at``, from :func:`~workbench.embed.last_word`)
    to the end of the sequence (the word, the end token and the padding, which see the whole prompt in
    context); the guide's run from its own last word (its start token when it is empty); both are cut to
    the same length. Rows before the last word ("a photo of",
    the start token) are shared with prompts that must not change, so they stay out of the erase set.
    ``prompts`` and ``guides`` are ``[n, tokens, width]``; returns two ``[rows, width]`` tensors.
    """
    tokens = prompts.shape[1]
    keys, targets = [], []
    for p, a, g, b in zip(prompts, at, guides, guide_at):
        n = tokens - max(a, b)
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
        parts: Selector = XATTN, lam: float = 0.5, erase_scale: float = 1.0,
        preserve_scale: float = 1.0, preserve_empty: bool = False) -> Edit:
    """Erase ``erase`` (concept prompts) by mapping their keys/values to those of ``guide``.

    Each prompt is erased through the rows that carry its concept (:func:`aligned_rows`); ``preserve``
    prompts keep their outputs on every row. ``preserve_empty`` adds the empty prompt (the unconditional
    branch of classifier-free guidance) to them: False as in the UCE authors' current script
    (``uce_sd_erase.py`` preserves only the given prompts; their earlier ``train_erase.py`` preserved ""
    only when no preserve list was given; RECE's copy of UCE always does, see ``rece(preserve_empty=...)``).
    The pipeline is not changed: apply the returned edit.
    """
    erase, preserve = as_list(erase), as_list(preserve)
    guides = as_list(guide) * (len(erase) if isinstance(guide, str) else 1)
    if len(guides) != len(erase):
        raise ValueError(f"give one guide or one per erased prompt ({len(erase)}), not {len(guides)}")
    for text in erase:
        check_prompt(pipe, text)
    names = cross_attention_parts(pipe, parts, "UCE")
    with Timer() as timer:
        kept = ([""] if preserve_empty else []) + preserve
        emb = encode(pipe, erase + guides + kept, device=weights_device(pipe, names))
        at = last_word(pipe, erase + guides)
        keys, guide_keys = aligned_rows(emb[:len(erase)], at[:len(erase)], emb[len(erase):2 * len(erase)],
                                        at[len(erase):])
        keep = Gram.of(emb[2 * len(erase):]) if kept else None
        base, new = edit_weights(pipe, names, keys, guide_keys, keep, lam, erase_scale, preserve_scale)
    params = dict(erase=erase, guide=guides, preserve=preserve, parts=names, lam=lam,
                  erase_scale=erase_scale, preserve_scale=preserve_scale, preserve_empty=preserve_empty)
    return Edit.between(base, new, method="uce", concept=", ".join(erase), params=params,
                        seconds=timer.seconds)
