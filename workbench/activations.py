"""What a model computes inside while it draws: named parts' activations per denoising step, the conditional
branch of guidance only, reduced as they come so that nothing of a real model's size is kept whole.

Text-encoder parts run once per prompt (no timesteps); denoiser parts and blocks run once per step (or twice,
when the sampler calls the branches of guidance apart, :meth:`~workbench.families.base.Family.branches_apart`).
Either way :func:`during_sampling` returns, per name, one reduced tensor per denoising step from the rows of
the prompts themselves, never the empty prompt's.

>>> import torch, workbench
>>> pipe = workbench.load("toy")
>>> seen = during_sampling(pipe, ["unet.mid.0.ffn.out"], ["an apple", "a cat"], steps=3, inputs=True,
...                        reduce=lambda x: x.shape[0])
>>> seen["unet.mid.0.ffn.out"]           # 3 steps, the two prompts' rows each time
[2, 2, 2]
>>> text = in_text(pipe, ["text.0.ffn.out"], ["an apple"], inputs=True, reduce=lambda x: tuple(x.shape))
>>> text["text.0.ffn.out"]
(1, 20, 1536)
"""
from __future__ import annotations

import zlib
from typing import Callable, Sequence

import torch

from .families import family_of
from .hooks import cache, hooked, modules
from .sampling import GUIDANCE, STEPS, seeded

Reduce = Callable[[torch.Tensor], object]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def keeper(pipe, prompts: int, guidance: float, inputs: bool, reduce: Reduce, into: list) -> Callable:
    """A hook that appends ``reduce`` of the prompts' rows of each step's call to ``into``: the second half
    of a guidance batch, or only the first of the two calls a step makes when the branches run apart."""
    apart, calls = family_of(pipe).branches_apart(pipe, guidance), [0]

    def hook(module, args, output):
        calls[0] += 1
        if apart and calls[0] % 2 == 0:
            return
        x = args[0] if inputs else output[0] if isinstance(output, tuple) else output
        into.append(reduce(x[-prompts:] if len(x) == 2 * prompts else x))
    return hook


@torch.no_grad()
def during_sampling(pipe, names: Sequence[str], prompts: Sequence[str], seed: int = 0, steps: int = STEPS,
                    guidance: float = GUIDANCE, inputs: bool = False,
                    reduce: Reduce = _identity) -> dict[str, list]:
    """Draw ``prompts`` (in one batch, each from its own noise, :func:`prompt_seed`) and return, for each
    named denoiser part or block, ``reduce`` of its output (with ``inputs``: its input) at every step, the
    prompts' rows only, reduced as each step comes."""
    prompts = list(prompts)
    out: dict[str, list] = {n: [] for n in names}
    found = modules(pipe, list(names))
    family = family_of(pipe)
    noise = torch.cat([family.noise(pipe, seeded(prompt_seed(p, seed))) for p in prompts])
    with hooked([(found[n], keeper(pipe, len(prompts), guidance, inputs, reduce, out[n])) for n in names]):
        family.draw(pipe, family.encode(pipe, prompts), family.empty(pipe, len(prompts)), steps, guidance,
                    latents=noise)
    return out


def prompt_seed(prompt: str, seed: int = 0) -> int:
    """The seed of ``prompt``'s starting noise in :func:`during_sampling`: ``seed`` and the prompt's text,
    so that a prompt's activations do not depend on the prompts drawn beside it.

    >>> prompt_seed("an apple") == prompt_seed("an apple"), prompt_seed("an apple") == prompt_seed("a cat")
    (True, False)
    """
    return seed * 1_000_003 + zlib.crc32(prompt.encode())


@torch.no_grad()
def in_text(pipe, names: Sequence[str], prompts: Sequence[str], inputs: bool = False,
            reduce: Reduce = _identity) -> dict[str, object]:
    """``reduce`` of each named text-encoder part's output (with ``inputs``: its input) when ``prompts`` are
    encoded, every token row of every prompt."""
    with cache(pipe, list(names), inputs=inputs) as seen:
        family_of(pipe).encode(pipe, list(prompts))
    return {n: reduce(torch.cat(calls)) for n, calls in seen.items()}
