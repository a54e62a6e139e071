"""Prompt embeddings: the text encoder's per-token output, exactly as the pipeline conditions on it.

>>> import workbench
>>> from workbench.embed import encode
>>> pipe = workbench.load("toy")
>>> encode(pipe, ["a red apple", "a car"]).shape
torch.Size([2, 20, 384])
"""
from __future__ import annotations

import torch


@torch.no_grad()
def encode(pipe, prompts: str | list[str], batch: int = 256) -> torch.Tensor:
    """``[n_prompts, tokens, width]`` text-encoder output, float32 on the CPU; one pass per batch."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    device = pipe.text_encoder.device
    out = []
    for i in range(0, len(prompts), batch):
        emb, _ = pipe.encode_prompt(prompts[i:i + batch], device, 1, do_classifier_free_guidance=False)
        out.append(emb.float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def check_prompt(pipe, text: str) -> None:
    """Raise ``ValueError`` if ``text`` tokenizes to nothing (only special tokens)."""
    ids = pipe.tokenizer(text, add_special_tokens=False).input_ids
    if not text.strip() or not ids:
        raise ValueError(
            f"the concept {text!r} tokenizes to nothing for this model's tokenizer; give a word or phrase "
            "such as 'apple' or 'van gogh'"
        )
