"""Stable Diffusion XL: two CLIP text encoders and a UNet with added text and time conditioning.

``text_encoder`` (CLIP ViT-L, parts ``text.{i}...``) and ``text_encoder_2`` (OpenCLIP bigG with a
projection, parts ``text2.{i}...``) each give their *penultimate* layer's token rows; concatenated
(768 + 1,280 = 2,048 wide on the real model) they are what every cross-attention layer's keys and values
see. The second encoder's projected pooled output and the time ids (original size, crop, target size)
enter the UNet as added conditioning (``unet.time.added.{in,out}``). With ``force_zeros_for_empty_prompt``
(SDXL base) the unconditional branch is all zeros, as the pipeline makes it.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import Conditioning, register
from .sd import EncodedByStates, StableDiffusion, masked


class StableDiffusionXL(EncodedByStates, StableDiffusion):
    """SDXL: ``text_encoder`` + ``tokenizer``, ``text_encoder_2`` + ``tokenizer_2``, ``unet`` with
    ``addition_embed_type="text_time"``."""

    name = "sdxl"
    description = ("two CLIP text encoders (text_encoder, text_encoder_2) and a UNet2DConditionModel with "
                   "text_time added conditioning (SDXL)")
    ENCODERS = {"text": ("text_encoder", "tokenizer"), "text2": ("text_encoder_2", "tokenizer_2")}

    @classmethod
    def matches(cls, pipe) -> bool:
        unet = getattr(pipe, "unet", None)
        return (super().matches(pipe) and unet.config.get("addition_embed_type") == "text_time")

    def _states(self, pipe, ids: dict[str, tuple[torch.Tensor, torch.Tensor]],
                params: dict[str, torch.Tensor] | None) -> Conditioning:
        rows, pooled = [], None
        for key, module in self.encoders(pipe).items():
            tokens, mask = ids[key]
            kwargs = {"attention_mask": mask.to(module.device) if masked(module) else None,
                      "output_hidden_states": True}
            out = self._call(pipe, module, params, (tokens.to(module.device),), kwargs)
            if out[0].ndim == 2:  # the projected pooled output of the encoder with a projection
                pooled = out[0]
            rows.append(out.hidden_states[-2])
        device = rows[0].device
        return Conditioning(torch.cat([r.to(device) for r in rows], dim=-1), pooled.to(device))

    def empty(self, pipe, n: int = 1) -> Conditioning:
        unet = pipe.unet
        if pipe.config.force_zeros_for_empty_prompt:
            made = self.encode(pipe, [""])
            zero = Conditioning(torch.zeros_like(made.tokens), torch.zeros_like(made.pooled))
            return zero.to(unet.device, unet.dtype).expand(n)
        return self.encode(pipe, [""]).to(unet.device, unet.dtype).expand(n)

    def added(self, pipe, cond: Conditioning) -> dict[str, Any]:
        if cond.pooled is None:
            raise ValueError("SDXL's UNet needs a pooled text embedding beside the token rows: give a Conditioning "
                             "(workbench.embed.conditioning(pipe, prompts)), not token rows alone")
        size = self.image_size(pipe)
        ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=cond.tokens.dtype, device=cond.tokens.device)
        return {"added_cond_kwargs": {"text_embeds": cond.pooled, "time_ids": ids.expand(len(cond), -1)}}

    def draw(self, pipe, cond: Conditioning, negative: Conditioning, steps: int, guidance: float,
             generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
             size: int | None = None):
        if cond.pooled is None or negative.pooled is None:
            self.added(pipe, Conditioning(cond.tokens))
        size = size or self.image_size(pipe)
        return super().draw(pipe, cond, negative, steps, guidance, generator, latents, size)


register(StableDiffusionXL, first=True)
