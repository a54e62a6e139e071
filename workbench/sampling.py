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

#: The sampler settings every measurement uses unless told otherwise.
STEPS, GUIDANCE, BATCH = 20, 5.0, 32


def seeded(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator for ``pipe(..., generator=seeded(0))``: same seed, same images (on any device:
    diffusers draws the noise on the generator's device and moves it to the pipeline's)."""
    return torch.Generator(device=device).manual_seed(seed)


def generate(pipe, prompts: Sequence[str], seed: int = 0, steps: int = STEPS, guidance: float = GUIDANCE,
             batch: int = BATCH) -> list[Image.Image]:
    """Images for ``prompts``, ``batch`` at a time; the batch starting at prompt ``i`` is seeded ``seed + i``."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch):
        images += pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance,
                       generator=seeded(seed + i)).images
    return images


@torch.no_grad()
def generate_from(pipe, embeds: torch.Tensor, seed: int = 0, steps: int = STEPS, guidance: float = GUIDANCE,
                  batch: int = BATCH) -> list[Image.Image]:
    """Images for prompt embeddings ``[n, tokens, width]`` (the text encoder's output, e.g. from
    :func:`workbench.embed.encode`), seeded like :func:`generate`; the unconditional branch of guidance
    is the pipeline's own embedding of the empty prompt.

    >>> import workbench
    >>> from workbench.embed import encode
    >>> pipe = workbench.load("toy")
    >>> [a.tobytes() == b.tobytes() for a, b in zip(generate_from(pipe, encode(pipe, ["an apple"])),
    ...                                             generate(pipe, ["an apple"]))]
    [True]
    """
    if embeds.ndim != 3:
        raise ValueError(f"give prompt embeddings as [prompts, tokens, width], not a tensor of shape {tuple(embeds.shape)}")
    device, dtype = pipe.unet.device, pipe.unet.dtype
    empty, _ = pipe.encode_prompt([""], device, 1, do_classifier_free_guidance=False)
    images: list[Image.Image] = []
    for i in range(0, len(embeds), batch):
        chunk = embeds[i:i + batch].to(device, dtype)
        images += pipe(prompt_embeds=chunk, negative_prompt_embeds=empty.expand(len(chunk), -1, -1),
                       num_inference_steps=steps, guidance_scale=guidance, generator=seeded(seed + i)).images
    return images
