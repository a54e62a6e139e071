"""Load a text-to-image pipeline: the bundled toy model, a local Stable Diffusion folder, or a hub id.

>>> import workbench
>>> pipe = workbench.load("toy")
>>> images = pipe(["a red apple", "a car by van gogh"], num_inference_steps=20,
...               generator=workbench.seeded(0)).images
>>> images[0].size
(32, 32)
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from transformers.utils import logging as transformers_logging

from .families import family_of
from .judges import ascii_clip_tokenizer
from .sampling import seeded
from .toy import model as toy_model

__all__ = ["load", "seeded", "build_tiny_sd", "build_tiny_sdxl", "stable_diffusion_or_tiny"]


def load(name: str | os.PathLike = "toy", *, dtype: torch.dtype | None = None,
         device: str | torch.device | None = None) -> StableDiffusionPipeline:
    """Load a pipeline: ``"toy"`` (bundled), a local diffusers folder, or a hub id such as
    ``"CompVis/stable-diffusion-v1-4"`` (SD 1.x / 2.x) or ``"stabilityai/stable-diffusion-xl-base-1.0"``
    (SDXL). Progress bars are off; images come back as PIL.
    """
    diffusers_logging.disable_progress_bar()  # loading bars, not sampling ones (those are per pipeline)
    transformers_logging.disable_progress_bar()
    if str(name) == "toy":
        pipe = toy_model.load_toy(dtype or torch.float32, toy_model.TOY_DIR)
    else:
        pipe = _from_pretrained(str(name), dtype)
    try:
        family_of(pipe)
    except TypeError as e:
        raise ValueError(f"{str(name)!r}: {e}") from None
    if device is not None:
        pipe = pipe.to(device)
    return pipe


#: The pipelines the workbench loads, by the class name in model_index.json.
PIPELINES = {"StableDiffusionPipeline": StableDiffusionPipeline, "StableDiffusionXLPipeline": StableDiffusionXLPipeline}
_ACCEPTED = ("Accepted: 'toy' (the bundled model), a folder written by `pipe.save_pretrained(...)` (with "
             "model_index.json), or a hub id in your local Hugging Face cache such as "
             "'CompVis/stable-diffusion-v1-4' or 'stabilityai/stable-diffusion-xl-base-1.0'.")


def _from_pretrained(name: str, dtype: torch.dtype | None) -> DiffusionPipeline:
    """A Stable Diffusion 1.x/2.x or SDXL pipeline from a folder or a cached hub id."""
    path = Path(os.path.expanduser(name))
    if path.exists() and not (path / "model_index.json").is_file():
        raise ValueError(f"{str(path)!r} is not a diffusers pipeline folder: it has no model_index.json. {_ACCEPTED}")
    if not path.exists() and (name.count("/") != 1 or name.startswith((".", "/", "~"))):
        raise ValueError(f"unknown model {name!r}: not 'toy', not an existing folder, and not a hub id of the "
                         f"form 'owner/name'. {_ACCEPTED}")
    source = str(path) if path.exists() else name
    try:
        index = DiffusionPipeline.load_config(source)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load {name!r}: not a pipeline folder, and not in your local Hugging Face cache "
                         f"({str(e).splitlines()[0]}). {_ACCEPTED}") from e
    found = index.get("_class_name", "diffusers")
    if found not in PIPELINES:
        raise ValueError(f"{name!r} holds a {found}; the workbench loads {', '.join(PIPELINES)} "
                         f"(Stable Diffusion 1.x/2.x and XL). {_ACCEPTED}")
    kwargs: dict[str, Any] = {} if dtype is None else {"torch_dtype": dtype}
    if "safety_checker" in index:
        kwargs |= dict(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = PIPELINES[found].from_pretrained(source, **kwargs)
    except OSError as e:
        raise ValueError(f"could not load {name!r} as a {found} ({e}). {_ACCEPTED}") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sd(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny, randomly initialised pipeline shaped like Stable Diffusion 1.x to ``folder``.

    Same component classes and UNet block layout as SD 1.4 (CLIP text encoder, 16 cross-attention
    layers, 4-block VAE), only narrow; its CLIP tokenizer's vocabulary is written here, printable ASCII
    with no merges. It draws noise, but every code path of the workbench runs on it without a download.

    >>> import tempfile, workbench
    >>> pipe = workbench.load(build_tiny_sd(tempfile.mkdtemp()))
    >>> type(pipe.text_encoder).__name__
    'CLIPTextModel'
    """
    transformers_logging.disable_progress_bar()
    folder = Path(folder)
    tokenizer = ascii_clip_tokenizer(32)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, projection_dim=32,
    ))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=64,
    )
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def build_tiny_sdxl(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny, randomly initialised pipeline shaped like SDXL to ``folder``.

    The same classes and layout as SDXL base: two CLIP text encoders of different widths (the second with
    a projection, whose pooled output is added conditioning), their penultimate states concatenated
    (32 + 48 = 80 wide) for a UNet with ``addition_embed_type="text_time"``, one block without
    attention and deeper transformer stacks further down (``transformer_layers_per_block`` 1, 2), an
    Euler scheduler. It draws noise; every code path runs on it without a download.

    >>> import tempfile, workbench
    >>> pipe = workbench.load(build_tiny_sdxl(tempfile.mkdtemp()))
    >>> type(pipe).__name__, pipe.unet.config.cross_attention_dim
    ('StableDiffusionXLPipeline', 80)
    """
    transformers_logging.disable_progress_bar()
    folder = Path(folder)
    tokenizer = ascii_clip_tokenizer(32)
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.eos_token_id, hidden_act="gelu")
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, projection_dim=32, **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, intermediate_size=96,
                                                                projection_dim=32, **common))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), use_linear_projection=True,
        cross_attention_dim=80, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=64,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=ascii_clip_tokenizer(32), unet=unet,
                                     scheduler=scheduler)
    pipe.save_pretrained(folder)
    return folder


#: The tiny stand-in of each family.
TINY = {"sd": build_tiny_sd, "sdxl": build_tiny_sdxl}


def stable_diffusion_or_tiny(source: str | os.PathLike = "CompVis/stable-diffusion-v1-4",
                             folder: str | os.PathLike | None = None,
                             family: str = "sd") -> tuple[DiffusionPipeline, str]:
    """Stable Diffusion from ``source`` (a local folder or cached hub id) on a GPU, if both are there;
    otherwise the tiny pipeline of ``family`` (``"sd"`` or ``"sdxl"``; written to ``folder`` or a
    temporary one). Returns the pipeline and a sentence saying plainly which one it is.

    >>> pipe, which = stable_diffusion_or_tiny("/no/such/folder")
    >>> which.startswith("tiny SD-shaped")
    True
    """
    if family not in TINY:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(TINY)}")
    why = "no GPU is available"
    if torch.cuda.is_available():
        try:
            return (load(source, dtype=torch.float16, device="cuda"),
                    f"Stable Diffusion from {source} on {torch.cuda.get_device_name()}")
        except ValueError as e:
            why = f"{source} could not be loaded ({str(e).split('. ')[0]})"
    pipe = load(TINY[family](folder or tempfile.mkdtemp(prefix=f"tiny-{family}-")))
    shape = {"sd": "SD", "sdxl": "SDXL"}[family]
    return pipe, (f"tiny {shape}-shaped pipeline with random weights, because {why}: it draws noise, so the "
                  "images and numbers below show how the analyses run, not what Stable Diffusion does")
