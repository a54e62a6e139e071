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
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel
from transformers.utils import logging as transformers_logging

from .families import family_of
from .judges import ascii_clip_tokenizer, ascii_t5_tokenizer
from .sampling import seeded
from .toy import model as toy_model

__all__ = ["load", "seeded", "build_tiny_sd", "build_tiny_sdxl", "build_tiny_flux", "build_tiny_sd3",
           "stable_diffusion_or_tiny"]


def load(name: str | os.PathLike = "toy", *, dtype: torch.dtype | None = None,
         device: str | torch.device | None = None) -> StableDiffusionPipeline:
    """Load a pipeline: ``"toy"`` (the bundled toy UNet), ``"toy-dit"`` (the bundled toy DiT, a FLUX
    transformer), a local diffusers folder, or a hub id such as
    ``"CompVis/stable-diffusion-v1-4"`` (SD 1.x / 2.x), ``"stabilityai/stable-diffusion-xl-base-1.0"``
    (SDXL), ``"stabilityai/stable-diffusion-3.5-medium"`` (SD 3 / 3.5) or ``"black-forest-labs/FLUX.1-dev"``
    (FLUX.1 dev / schnell). Progress bars are off; images come back as PIL.
    """
    diffusers_logging.disable_progress_bar()  # loading bars, not sampling ones (those are per pipeline)
    transformers_logging.disable_progress_bar()
    if str(name) == "toy":
        pipe = toy_model.load_toy(dtype or torch.float32, toy_model.TOY_DIR)
    elif str(name) == "toy-dit":
        pipe = toy_model.load_toy_dit(dtype or torch.float32, toy_model.TOY_DIT_DIR)
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
PIPELINES = {"StableDiffusionPipeline": StableDiffusionPipeline, "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
             "StableDiffusion3Pipeline": StableDiffusion3Pipeline, "FluxPipeline": FluxPipeline}
_ACCEPTED = ("Accepted: 'toy' (the bundled model), 'toy-dit' (the bundled toy DiT), a folder written by `pipe.save_pretrained(...)` (with "
             "model_index.json), or a hub id in your local Hugging Face cache such as "
             "'CompVis/stable-diffusion-v1-4', 'stabilityai/stable-diffusion-xl-base-1.0', "
             "'stabilityai/stable-diffusion-3.5-medium' or 'black-forest-labs/FLUX.1-dev'.")


def _from_pretrained(name: str, dtype: torch.dtype | None) -> DiffusionPipeline:
    """A pipeline of a known family from a folder or a cached hub id."""
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
                         f"(Stable Diffusion 1.x/2.x, XL, 3 and FLUX.1). {_ACCEPTED}")
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


def _tiny_vae(shift: float, scale: float, sample_size: int) -> AutoencoderKL:
    """A two-block VAE (latents at half the image's side), 4 channels, with a transformer family's
    shift and scale."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=sample_size, shift_factor=shift,
                         scaling_factor=scale, use_quant_conv=False, use_post_quant_conv=False)


def _tiny_t5(tokenizer, width: int) -> T5EncoderModel:
    """A two-layer T5 v1.1 encoder (gated GELU feed-forward, as T5-XXL) ``width`` wide."""
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2,
                                   num_heads=width // 8, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                                   relative_attention_max_distance=16, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id))


def _clip_config(tokenizer, width: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                          projection_dim=32, hidden_act="gelu")


def build_tiny_flux(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny, randomly initialised pipeline shaped like FLUX.1-dev to ``folder``.

    The classes and layout of FLUX.1-dev: CLIP for the pooled vector, a T5 v1.1 encoder (from a
    ``T5Config``, with a T5 tokenizer written here) for 32 token rows, a ``FluxTransformer2DModel`` with
    2 double-stream and 2 single-stream blocks (2 heads of 16, rotary axes 4 + 6 + 6) and guidance
    input, a VAE with FLUX's shift and scale, and the dynamically shifted flow-matching scheduler.
    32 x 32 images from 16 x 16 latents (64 packed tokens). It draws noise; every code path runs on it.

    >>> import tempfile, workbench
    >>> pipe = workbench.load(build_tiny_flux(tempfile.mkdtemp()))
    >>> type(pipe).__name__, len(pipe.transformer.single_transformer_blocks)
    ('FluxPipeline', 2)
    """
    transformers_logging.disable_progress_bar()
    folder = Path(folder)
    clip_tok, t5_tok = ascii_clip_tokenizer(32), ascii_t5_tokenizer(32)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(clip_tok, 32))
    text_encoder_2 = _tiny_t5(t5_tok, 32)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=_tiny_vae(0.1159, 0.3611, 32), text_encoder=text_encoder,
                        tokenizer=clip_tok, text_encoder_2=text_encoder_2, tokenizer_2=t5_tok, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


def build_tiny_sd3(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny, randomly initialised pipeline shaped like SD 3.5 to ``folder``.

    The classes and layout of SD 3.5 medium: two CLIP encoders with projections (32 and 48 wide; their
    penultimate rows side by side, zero-padded to T5's width), a T5 v1.1 encoder 96 wide, an
    ``SD3Transformer2DModel`` with 2 joint blocks (the first with SD 3.5's second image attention, RMS
    query/key norms, the last text stream ending after attention), a VAE with SD 3's shift and scale,
    and the flow-matching scheduler with shift 3. It draws noise; every code path runs on it.

    >>> import tempfile, workbench
    >>> pipe = workbench.load(build_tiny_sd3(tempfile.mkdtemp()))
    >>> type(pipe).__name__, pipe.transformer.config.joint_attention_dim
    ('StableDiffusion3Pipeline', 96)
    """
    transformers_logging.disable_progress_bar()
    folder = Path(folder)
    clip_tok, t5_tok = ascii_clip_tokenizer(32), ascii_t5_tokenizer(32)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_clip_config(clip_tok, 32))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(clip_tok, 48))
    text_encoder_3 = _tiny_t5(t5_tok, 96)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=96,
                                        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16,
                                        dual_attention_layers=(0,), qk_norm="rms_norm")
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_tiny_vae(0.0609, 1.5305, 32), text_encoder=text_encoder, tokenizer=clip_tok,
                                    text_encoder_2=text_encoder_2, tokenizer_2=ascii_clip_tokenizer(32),
                                    text_encoder_3=text_encoder_3, tokenizer_3=t5_tok, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


#: The tiny stand-in of each family.
TINY = {"sd": build_tiny_sd, "sdxl": build_tiny_sdxl, "flux": build_tiny_flux, "sd3": build_tiny_sd3}


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
    shape = {"sd": "SD", "sdxl": "SDXL", "flux": "FLUX", "sd3": "SD3"}[family]
    return pipe, (f"tiny {shape}-shaped pipeline with random weights, because {why}: it draws noise, so the "
                  "images and numbers below show how the analyses run, not what Stable Diffusion does")
