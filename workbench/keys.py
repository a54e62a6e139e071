"""The rows each text-reading matrix sees: the keys of the closed-form methods (UCE, RECE, the derived
embedding).

Every matrix a closed-form edit may change reads one *space* (``family.text_entries(pipe)``):

====================  =======================================================================
``"tokens"``          the conditioning's token rows: every UNet cross-attention k/v, FLUX's and
                      SD 3's ``context_embedder`` (``dit.context.proj``)
``"pooled"``          the pooled text vector, one row per prompt (``dit.pooled.in``)
``"dit.{i}.text"``    what double block i's text stream feeds its k/v (``dit.{i}.text.[kv]``)
====================  =======================================================================

In joint attention a block's text keys are not the encoder's output: the text stream is modulated by
the timestep and pooled vector and changed by every earlier block, and it attends to the image. They
are captured (:func:`workbench.hooks.cache`) in forward passes of the unedited transformer on seeded
Gaussian latents at the family's ``KEY_TIMESTEPS`` (750, 500, 250 of 1,000), one set of rows per
prompt and timestep.

>>> import workbench
>>> pipe = workbench.load("toy")
>>> rows(pipe, ["an apple"], ["tokens"])["tokens"].shape
torch.Size([1, 20, 384])
"""
from __future__ import annotations

from typing import Sequence

import torch

from .anatomy import as_list
from .embed import conditioning
from .families import family_of
from .hooks import cache
from .sampling import seeded

#: The seed of the latents a block's text keys are captured on.
KEY_SEED = 0


def samples(pipe, space: str) -> int:
    """How many sets of rows each prompt has in ``space`` (one per capture timestep for a block's keys)."""
    return len(family_of(pipe).KEY_TIMESTEPS) if space.startswith("dit.") else 1


@torch.no_grad()
def rows(pipe, prompts: str | Sequence[str], spaces: Sequence[str], device: torch.device | str | None = "cpu",
         batch: int = 16) -> dict[str, torch.Tensor]:
    """``{space: [n_prompts * samples, tokens, width]}`` float32 on ``device`` (``None``: where they were
    made): prompt p's rows are ``p * samples .. (p + 1) * samples - 1`` (see :func:`samples`)."""
    prompts = as_list(prompts)
    family = family_of(pipe)
    known = set(family.text_entries(pipe).values())
    unknown = [s for s in spaces if s not in known]
    if unknown:
        raise ValueError(f"{', '.join(map(repr, unknown))}: no matrix of this model reads such rows; its spaces: "
                         f"{', '.join(sorted(known))}")
    cond = conditioning(pipe, prompts, device=None)
    out: dict[str, torch.Tensor] = {}
    if "tokens" in spaces:
        out["tokens"] = cond.tokens
    if "pooled" in spaces:
        out["pooled"] = cond.pooled[:, None]
    blocks = [s for s in spaces if s.startswith("dit.")]
    if blocks:
        out |= _captured(pipe, cond, blocks, batch)
    where = lambda t: t.to(t.device if device is None else torch.device(device), torch.float32)
    return {s: where(out[s]) for s in spaces}


def _captured(pipe, cond, blocks: list[str], batch: int) -> dict[str, torch.Tensor]:
    """Each block's text-stream rows (its k projection's input), per prompt and capture timestep."""
    family = family_of(pipe)
    dit = family.denoiser(pipe)
    steps = family.KEY_TIMESTEPS
    noise = family.noise(pipe, seeded(KEY_SEED))
    names = [f"{b}.k" for b in blocks]
    found: dict[str, list[torch.Tensor]] = {b: [] for b in blocks}
    for i in range(0, len(cond), batch):
        part = cond[i:i + batch].to(dit.device, dit.dtype)
        n = len(part)
        with cache(pipe, names, inputs=True) as seen:
            for t in steps:
                family.denoise(pipe, noise.expand(n, -1, -1, -1), torch.tensor(t), part)
        for b, name in zip(blocks, names):
            found[b].append(torch.stack(seen[name], dim=1).flatten(0, 1))  # [n * steps, tokens, width]
    return {b: torch.cat(found[b]) for b in blocks}
