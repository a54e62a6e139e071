"""FLUX.1 (dev and schnell): CLIP for the pooled vector, T5 for the token rows, a transformer with
double- and single-stream blocks over 2x2-packed latents (see :mod:`.mmdit` for the part names).

``text_encoder`` (CLIP ViT-L, parts ``text.*``) gives only its pooled output; ``text_encoder_2``
(T5-XXL, parts ``text2.*``) gives the token rows, 512 of them, that ``context_embedder`` projects.
FLUX.1-dev takes its guidance as an input (``guidance_embeds``): it is sampled in one pass, not with
two branches; schnell takes none. A model without guidance input (the toy DiT) gets classifier-free
guidance with the pipeline's ``true_cfg_scale``.
"""
from __future__ import annotations


import torch
from PIL import Image

from .base import Conditioning, register
from .mmdit import MMDiT, pack, unpack


class Flux(MMDiT):
    """``FluxPipeline``: ``text_encoder`` + ``tokenizer`` (CLIP), ``text_encoder_2`` + ``tokenizer_2`` (T5),
    ``transformer`` (``FluxTransformer2DModel``)."""

    name = "flux"
    description = ("CLIP (pooled) and T5 (tokens) text encoders and a FluxTransformer2DModel with double- and "
                   "single-stream blocks (FLUX.1 dev / schnell)")
    ENCODERS = {"text": ("text_encoder", "tokenizer"), "text2": ("text_encoder_2", "tokenizer_2")}
    SEGMENTS = (("text2", 0),)
    T5_LENGTH = 512

    TRANSFORMER = "FluxTransformer2DModel"

    def _states(self, pipe, ids, params) -> Conditioning:
        clip = pipe.text_encoder
        tokens, _ = ids["text"]
        pooled = self._call(pipe, clip, params, (tokens.to(clip.device),), {"output_hidden_states": False}).pooler_output
        rows = self._t5(pipe, "text2", ids, params, len(tokens))
        return Conditioning(rows, pooled.to(rows.device))

    def image_size(self, pipe) -> int:
        return int(pipe.vae.config.sample_size)

    def distilled(self, pipe) -> bool:
        return bool(pipe.transformer.config.guidance_embeds)

    def branches_apart(self, pipe, guidance: float) -> bool:
        return not self.distilled(pipe) and guidance > 1  # FluxPipeline's true_cfg_scale

    def _forward(self, pipe, latents, t, cond, params, guidance) -> torch.Tensor:
        dit = pipe.transformer
        n, _, h, w = latents.shape
        img_ids = pipe._prepare_latent_image_ids(n, h // 2, w // 2, dit.device, dit.dtype)
        txt_ids = torch.zeros(cond.tokens.shape[1], 3, device=dit.device, dtype=dit.dtype)
        kwargs = dict(hidden_states=pack(latents), timestep=t / 1000, pooled_projections=cond.pooled,
                      encoder_hidden_states=cond.tokens, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)
        if self.distilled(pipe):
            g = 3.5 if guidance is None else guidance
            kwargs["guidance"] = torch.full((n,), g, device=dit.device, dtype=torch.float32)
        return unpack(self._call(pipe, dit, params, (), kwargs)[0], h, w)

    def draw(self, pipe, cond: Conditioning, negative: Conditioning, steps: int, guidance: float,
             generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
             size: int | None = None) -> list[Image.Image]:
        cond, negative, size = self._to_draw(pipe, cond, negative, size)
        kwargs = dict(prompt_embeds=cond.tokens, pooled_prompt_embeds=cond.pooled, num_inference_steps=steps,
                      generator=generator, height=size, width=size, max_sequence_length=cond.tokens.shape[1])
        if self.distilled(pipe):
            kwargs["guidance_scale"] = guidance
        elif guidance > 1:
            kwargs |= dict(true_cfg_scale=guidance, negative_prompt_embeds=negative.tokens,
                           negative_pooled_prompt_embeds=negative.pooled)
        if latents is not None:
            kwargs["latents"] = pack(latents.to(cond.tokens.device, cond.tokens.dtype))
        return pipe(**kwargs).images


register(Flux, first=True)
