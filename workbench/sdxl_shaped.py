"""An SDXL base 1.0-shaped pipeline with random weights, for tests and benchmarks at full scale.

Same classes and shapes as ``stabilityai/stable-diffusion-xl-base-1.0`` (the configs below are its
published ones): CLIP ViT-L/14's text tower (``text_encoder``, the one SD 1.4 has) beside OpenCLIP
bigG's with its projection (``text_encoder_2``), their penultimate layers concatenated into
2,048-wide keys for the 70 cross-attention layers of a 2.567 B parameter UNet with ``text_time``
added conditioning, SDXL's VAE and Euler scheduler, and CLIP's real BPE tokenizer for both text
encoders (:func:`workbench.sd14.clip_tokenizer`; the second pads with ``"!"``, as SDXL's does). Memory,
time and tokenization behave as on the real model; the weights are noise, so are the images. Nothing
is downloaded from a model hub.

Files are kept under ``$WORKBENCH_CACHE`` (default ``~/.cache/workbench``), as :mod:`workbench.sd14`'s.

>>> counts = parameter_counts()
>>> {name: round(n / 1e6, 2) for name, n in counts.items()}
{'text': 123.06, 'text2': 694.66, 'unet': 2567.46, 'vae': 83.65}
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .models import load
from .sd14 import (
    CLIP_VOCAB_SIZE, COMPONENTS, SD14_TEXT, SD14_VAE, SMALL_TEXT, SMALL_VAE, _check_components, _quiet,
    already_built, clip_tokenizer, shaped_folder,
)

__all__ = ["sdxl_modules", "parameter_counts", "build_sdxl", "sdxl_pipeline", "COMPONENTS"]

_MARKER = "workbench-sdxl.json"
#: The padding token of SDXL's second tokenizer (its tokenizer_2/special_tokens_map.json): id 0.
PAD_2 = "!"

#: ``text_encoder``: CLIP ViT-L/14's text tower, the same as SD 1.4's (hidden 768, 12 layers, 12 heads,
#: quick_gelu); SDXL conditions on its penultimate layer.
SDXL_TEXT: dict[str, Any] = dict(SD14_TEXT)
#: ``text_encoder_2``: OpenCLIP ViT-bigG/14's text tower with its projection (``CLIPTextModelWithProjection``).
#: Token ids are the tokenizer's, as in :data:`workbench.sd14.SD14_TEXT` (the published configs keep
#: transformers' placeholders 0, 2, 1, which pool at the same end token: it is the largest id).
SDXL_TEXT_2: dict[str, Any] = dict(
    vocab_size=CLIP_VOCAB_SIZE, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
    num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
    bos_token_id=CLIP_VOCAB_SIZE - 2, eos_token_id=CLIP_VOCAB_SIZE - 1, pad_token_id=0,
)
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=768 + 1280, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=6 * 256 + 1280,  # the six time ids, 256 each, and the pooled text
    norm_num_groups=32,
)
SDXL_VAE: dict[str, Any] = {**SD14_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
SDXL_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False,
    timestep_spacing="leading", steps_offset=1,
)

# Stand-ins for the components left out of ``build_sdxl(components=...)``: narrow, but with the same
# interfaces (CLIP's vocabulary; a 1,280-wide second encoder, so the conditioning stays 768 + 1,280 =
# 2,048 wide and the pooled projection 1,280; the 70 cross-attention layers with text_time conditioning;
# an 8x VAE with SDXL's scaling factor).
SMALL_TEXT_2: dict[str, Any] = {**SDXL_TEXT_2, "num_hidden_layers": 1, "intermediate_size": 1280}
SMALL_UNET: dict[str, Any] = {
    **SDXL_UNET, "sample_size": 8, "block_out_channels": (32, 32, 64), "attention_head_dim": (2, 4, 8),
    "norm_num_groups": 8,
}
SMALL_VAE_XL: dict[str, Any] = {**SMALL_VAE, "scaling_factor": SDXL_VAE["scaling_factor"]}


@contextmanager
def _default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Modules built inside are made in ``dtype`` (``None``: leave torch's default as it is)."""
    before = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def sdxl_modules(components: Sequence[str] = COMPONENTS,
                 dtype: torch.dtype | None = None) -> dict[str, torch.nn.Module]:
    """Randomly initialised ``text``, ``text2``, ``unet`` and ``vae`` modules on torch's current device,
    made in ``dtype`` (default: torch's default dtype, float32) so that no float32 copy of the model
    is ever held: SDXL-sized for ``components`` (``"text"`` is both text encoders), small stand-ins
    (``SMALL_*``) for the rest.

    >>> with torch.device("meta"):
    ...     modules = sdxl_modules(("text",), dtype=torch.bfloat16)
    >>> type(modules["text2"]).__name__, modules["text2"].dtype, modules["unet"].config.cross_attention_dim
    ('CLIPTextModelWithProjection', torch.bfloat16, 2048)
    """
    full = _check_components(components)
    with _default_dtype(dtype):
        text = CLIPTextModel(CLIPTextConfig(**(SDXL_TEXT if "text" in full else SMALL_TEXT)))
        text2 = CLIPTextModelWithProjection(CLIPTextConfig(**(SDXL_TEXT_2 if "text" in full else SMALL_TEXT_2)))
        unet = UNet2DConditionModel(**(SDXL_UNET if "unet" in full else SMALL_UNET))
        vae = AutoencoderKL(**(SDXL_VAE if "vae" in full else SMALL_VAE_XL))
    return {"text": text.eval(), "text2": text2.eval(), "unet": unet.eval(), "vae": vae.eval()}


def parameter_counts(components: Sequence[str] = COMPONENTS) -> dict[str, int]:
    """Parameters per component, counted on the ``meta`` device (no memory, a few seconds)."""
    with torch.device("meta"):
        modules = sdxl_modules(components)
    return {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}


def tokenizers(cache: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """SDXL's two tokenizers: CLIP's BPE tokenizer, padded with the end token, and the same padded
    with ``"!"`` (id 0), as ``tokenizer_2`` of SDXL base is."""
    second = clip_tokenizer(cache)
    second.pad_token = PAD_2
    return clip_tokenizer(cache), second


def build_sdxl(folder: str | os.PathLike | None = None, seed: int = 0,
               components: Sequence[str] = COMPONENTS, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a random-weight SDXL-shaped ``StableDiffusionXLPipeline`` with ``save_pretrained`` and
    return its folder.

    ``components`` are built at SDXL's size, the others as small stand-ins, so ``components=("text",)``
    gives both real text towers with a fast UNet (still 2,048-wide keys and ``text_time`` conditioning)
    and VAE. The modules are made directly in ``dtype`` (bfloat16 by default: 6.9 GB on disk for the
    full model instead of 14 GB; about a minute and 7 GB of memory to build), so float32 never has to
    fit. Load with ``workbench.load(folder, dtype=...)``: without a dtype the text encoders stay in
    ``dtype`` while diffusers makes the UNet and VAE float32, and sampling fails. ``folder`` defaults to
    ``$WORKBENCH_CACHE/sdxl-shaped/``; a folder already built with the same arguments is reused (a
    marker file, written last, says it is complete).
    """
    full = _check_components(components)
    folder = (Path(folder).expanduser() if folder is not None else
              shaped_folder("sdxl-shaped", full, COMPONENTS, seed, dtype, torch.bfloat16))
    recipe = {"components": list(full), "seed": seed, "dtype": str(dtype)}
    if already_built(folder, _MARKER, recipe):
        return folder
    tokenizer, tokenizer_2 = tokenizers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = sdxl_modules(full, dtype=dtype)
    with _quiet():
        pipe = StableDiffusionXLPipeline(
            vae=modules["vae"], text_encoder=modules["text"], text_encoder_2=modules["text2"],
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=modules["unet"],
            scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), add_watermarker=False,
        )
        pipe.save_pretrained(folder)
    del pipe, modules
    (folder / _MARKER).write_text(json.dumps(recipe))
    return folder


def sdxl_pipeline(dtype: torch.dtype = torch.bfloat16,
                  device: str | torch.device | None = None) -> StableDiffusionXLPipeline:
    """The full SDXL-shaped pipeline (built in bfloat16 on first use, see :func:`build_sdxl`), in
    ``dtype`` on ``device``."""
    return load(build_sdxl(), dtype=dtype, device=device)
