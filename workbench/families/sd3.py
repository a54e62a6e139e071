"""Stable Diffusion 3 / 3.5: two CLIP encoders and T5, a joint-attention transformer (see :mod:`.mmdit`).

The token rows are CLIP-L's and CLIP-G's penultimate states side by side (768 + 1,280 wide on the real
model), zero-padded to T5's 4,096 and followed by T5's 256 rows (zeros without ``text_encoder_3``):
333 rows that ``context_embedder`` projects. The two CLIPs' projected pooled outputs, concatenated,
are the pooled vector. Sampling uses classifier-free guidance with the empty prompt.
"""
from __future__ import annotations

import torch
from PIL import Image
from torch.nn import functional as F

from .base import Conditioning, register
from .mmdit import MMDiT
from .sd import masked


class StableDiffusion3(MMDiT):
    """``StableDiffusion3Pipeline``: ``text_encoder``, ``text_encoder_2`` (CLIP with projection),
    ``text_encoder_3`` (T5, optional) and ``transformer`` (``SD3Transformer2DModel``)."""

    name = "sd3"
    description = ("two CLIP text encoders and T5 (text_encoder_3) with an SD3Transformer2DModel of joint-attention "
                   "blocks (SD 3 / 3.5)")
    ENCODERS = {"text": ("text_encoder", "tokenizer"), "text2": ("text_encoder_2", "tokenizer_2"),
                "text3": ("text_encoder_3", "tokenizer_3")}
    T5_LENGTH = 256

    TRANSFORMER = "SD3Transformer2DModel"

    def encoders(self, pipe):
        return {k: getattr(pipe, e) for k, (e, _) in self.ENCODERS.items() if getattr(pipe, e, None) is not None}

    def tokenizers(self, pipe):
        return {k: getattr(pipe, t) for k, (e, t) in self.ENCODERS.items() if getattr(pipe, e, None) is not None}

    def components(self, pipe):
        return {"transformer": pipe.transformer,
                **{e: getattr(pipe, e) for e, _ in self.ENCODERS.values() if getattr(pipe, e, None) is not None},
                "vae": pipe.vae}

    def row_segments(self, pipe) -> tuple[tuple[str, int], ...]:
        clip = self.tokenizers(pipe)["text"].model_max_length
        return (("text", 0),) + ((("text3", clip),) if "text3" in self.encoders(pipe) else ())

    def _states(self, pipe, ids, params) -> Conditioning:
        rows, pooled = [], []
        for key in ("text", "text2"):
            module = self.encoders(pipe)[key]
            tokens, mask = ids[key]
            out = self._call(pipe, module, params, (tokens.to(module.device),),
                             {"attention_mask": mask.to(module.device) if masked(module) else None,
                              "output_hidden_states": True})
            rows.append(out.hidden_states[-2])
            pooled.append(out[0])
        n = len(rows[0])
        t5 = self._t5(pipe, "text3", ids, params, n)
        clip = torch.cat([r.to(t5.device) for r in rows], dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning(torch.cat([clip, t5.to(clip.dtype)], dim=1), torch.cat([p.to(t5.device) for p in pooled], -1))

    def image_size(self, pipe) -> int:
        return int(pipe.transformer.config.sample_size * pipe.vae_scale_factor)

    def _forward(self, pipe, latents, t, cond, params, guidance) -> torch.Tensor:
        kwargs = dict(hidden_states=latents, timestep=t, encoder_hidden_states=cond.tokens,
                      pooled_projections=cond.pooled, return_dict=False)
        return self._call(pipe, pipe.transformer, params, (), kwargs)[0]

    def draw(self, pipe, cond: Conditioning, negative: Conditioning, steps: int, guidance: float,
             generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
             size: int | None = None) -> list[Image.Image]:
        cond, negative, size = self._to_draw(pipe, cond, negative, size)
        return pipe(prompt_embeds=cond.tokens, negative_prompt_embeds=negative.tokens,
                    pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=negative.pooled,
                    num_inference_steps=steps, guidance_scale=guidance, generator=generator, latents=latents,
                    height=size, width=size).images


register(StableDiffusion3, first=True)
