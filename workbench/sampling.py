"""Seeded sampling: one helper every measurement and figure draws its images with.

>>> import workbench
>>> from workbench.sampling import generate
>>> images = generate(workbench.load("toy"), ["a red apple", "a cat by seurat"], seed=0)
>>> len(images), images[0].size
(2, (32, 32))
"""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from .families import Conditioning, family_of

#: The sampler settings every measurement uses unless told otherwise.
STEPS, GUIDANCE, BATCH = 20, 5.0, 32


def seeded(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator for ``pipe(..., generator=seeded(0))``: same seed, same images (on any device:
    diffusers draws the noise on the generator's device and moves it to the pipeline's)."""
    return torch.Generator(device=device).manual_seed(seed)


def generate(pipe, prompts: Sequence[str], seed: int = 0, steps: int = STEPS, guidance: float = GUIDANCE,
             batch: int = BATCH) -> list[Image.Image]:
    """Images for ``prompts``, ``batch`` at a time; the batch starting at prompt ``i`` is seeded ``seed + i``.
    The same images as ``pipe(prompts, ...)`` at the model's own size, with the prompts encoded as the
    workbench encodes them (on FLUX and SD 3: T5's rows up to its tokenizer's length, at most the
    pipeline's default)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    family = family_of(pipe)
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        images += family.draw(pipe, family.encode(pipe, chunk), family.empty(pipe, len(chunk)), steps, guidance,
                              seeded(seed + i))
    return images


@torch.no_grad()
def generate_from(pipe, embeds: torch.Tensor | Conditioning, seed: int = 0, steps: int = STEPS, guidance: float = GUIDANCE,
                  batch: int = BATCH) -> list[Image.Image]:
    """Images for prompt embeddings ``[n, tokens, width]`` (the text encoder's output, e.g. from
    :func:`workbench.embed.encode`) or a :class:`~workbench.families.Conditioning` (which a family with
    pooled embeddings, SDXL, needs), seeded like :func:`generate`; the unconditional branch of guidance
    is the pipeline's own (the empty prompt's embedding, or SDXL's zeros).

    >>> import workbench
    >>> from workbench.embed import encode
    >>> pipe = workbench.load("toy")
    >>> [a.tobytes() == b.tobytes() for a, b in zip(generate_from(pipe, encode(pipe, ["an apple"])),
    ...                                             generate(pipe, ["an apple"]))]
    [True]
    """
    cond = embeds if isinstance(embeds, Conditioning) else Conditioning(embeds)
    if cond.tokens.ndim != 3:
        raise ValueError(f"give prompt embeddings as [prompts, tokens, width], not a tensor of shape {tuple(cond.shape)}")
    family = family_of(pipe)
    images: list[Image.Image] = []
    for i in range(0, len(cond), batch):
        chunk = cond[i:i + batch]
        images += family.draw(pipe, chunk, family.empty(pipe, len(chunk)), steps, guidance, seeded(seed + i))
    return images
