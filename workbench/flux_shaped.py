"""A FLUX.1-dev-shaped pipeline with random weights, at the real width and any depth, for benchmarks.

Same classes and shapes as ``black-forest-labs/FLUX.1-dev`` (the configs below are its published ones):
CLIP ViT-L/14's text tower for the pooled vector (``text_encoder``, SD 1.4's, with CLIP's real BPE
tokenizer, :func:`workbench.sd14.clip_tokenizer`), the T5 v1.1 XXL encoder for 512 token rows
(``text_encoder_2``), a ``FluxTransformer2DModel`` of 19 double- and 38 single-stream blocks, 3,072
wide, with guidance input, FLUX's 16-channel VAE and its dynamically shifted flow-matching scheduler.
The weights are noise, so are the images. Nothing is downloaded and nothing is written to disk: the
modules are made directly on the target device in the target dtype, seeded.

The full model is 16.9 B parameters (34 GB in bfloat16), so :func:`flux_pipeline` builds it at the
real width with fewer blocks (``double``, ``single``) and T5 layers (``t5_layers``) when asked; a
block's cost does not depend on how many others there are, so the full model's forward is about
19 x a double block + 38 x a single block plus the rest (``benchmarks/dit_scale.py`` times them).

T5's tokenizer (:func:`t5_tokenizer`) is *not* T5's SentencePiece model, which cannot be downloaded
here: it is a unigram tokenizer built as :func:`workbench.judges.ascii_t5_tokenizer` (pad 0, ``</s>``
1, ``<unk>`` 2, printable ASCII characters) whose other pieces are CLIP's whole words, 32,000 pieces
and 100 ``<extra_id_*>`` sentinels as T5's (32,100 ids; the embedding has 32,128 rows, as T5's).
Prompts therefore split into different, though similarly word-sized, pieces; every prompt is padded
to the pipeline's 512 tokens regardless, so time and memory do not depend on it.

>>> counts = parameter_counts()
>>> {name: round(n / 1e6, 2) for name, n in counts.items()}
{'text': 123.06, 'text2': 4762.31, 'transformer': 11901.41, 'vae': 83.82}
"""
from __future__ import annotations

import json
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

from .judges import ascii_t5_tokenizer
from .sd14 import SD14_TEXT, SD14_VAE, _quiet, clip_tokenizer, clip_tokenizer_files
from .sdxl_shaped import _default_dtype

__all__ = ["flux_modules", "parameter_counts", "t5_tokenizer", "flux_pipeline", "DOUBLE", "SINGLE", "T5_LAYERS"]

DOUBLE, SINGLE, T5_LAYERS = 19, 38, 24
T5_LENGTH = 512
T5_PIECES, T5_EXTRA_IDS = 32_000, 100

#: ``text_encoder``: CLIP ViT-L/14's text tower, as SD 1.4's; FLUX uses only its pooled output.
FLUX_TEXT: dict[str, Any] = dict(SD14_TEXT)
#: ``text_encoder_2``: T5 v1.1 XXL's encoder (google/t5-v1_1-xxl).
FLUX_T5: dict[str, Any] = dict(
    vocab_size=32_128, d_model=4096, d_kv=64, d_ff=10_240, num_layers=T5_LAYERS, num_heads=64,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6, dropout_rate=0.1, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
    decoder_start_token_id=0,
)
FLUX_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=DOUBLE, num_single_layers=SINGLE, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_VAE: dict[str, Any] = {
    **SD14_VAE, "latent_channels": 16, "sample_size": 1024, "shift_factor": 0.1159, "scaling_factor": 0.3611,
    "use_quant_conv": False, "use_post_quant_conv": False,
}
FLUX_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)


def flux_modules(double: int = DOUBLE, single: int = SINGLE, t5_layers: int = T5_LAYERS,
                 dtype: torch.dtype | None = None) -> dict[str, torch.nn.Module]:
    """Randomly initialised ``text``, ``text2``, ``transformer`` and ``vae`` modules on torch's current
    device, made in ``dtype`` (default: torch's default dtype): FLUX.1-dev's, with ``double`` and
    ``single`` transformer blocks and ``t5_layers`` T5 layers.

    >>> with torch.device("meta"):
    ...     modules = flux_modules(1, 2, 3, dtype=torch.bfloat16)
    >>> len(modules["transformer"].single_transformer_blocks), modules["text2"].config.num_layers
    (2, 3)
    """
    with _default_dtype(dtype):
        text = CLIPTextModel(CLIPTextConfig(**FLUX_TEXT))
        text2 = T5EncoderModel(T5Config(**{**FLUX_T5, "num_layers": t5_layers}))
        transformer = FluxTransformer2DModel(**{**FLUX_TRANSFORMER, "num_layers": double, "num_single_layers": single})
        vae = AutoencoderKL(**FLUX_VAE)
    return {"text": text.eval(), "text2": text2.eval(), "transformer": transformer.eval(), "vae": vae.eval()}


def parameter_counts(double: int = DOUBLE, single: int = SINGLE, t5_layers: int = T5_LAYERS) -> dict[str, int]:
    """Parameters per component, counted on the ``meta`` device (no memory, a few seconds)."""
    with torch.device("meta"):
        modules = flux_modules(double, single, t5_layers)
    return {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}


def t5_tokenizer() -> T5Tokenizer:
    """A stand-in for T5's tokenizer with its sizes (see the module doc): 32,000 unigram pieces, the
    ASCII ones of :func:`~workbench.judges.ascii_t5_tokenizer` and then CLIP's whole words, each
    word one piece; 100 sentinels; 512 tokens.

    >>> tok = t5_tokenizer()
    >>> len(tok), tok.convert_ids_to_tokens(tok("a photo of a church").input_ids)
    (32100, ['▁a', '▁photo', '▁of', '▁a', '▁church', '</s>'])
    """
    model = json.loads(ascii_t5_tokenizer(T5_LENGTH).backend_tokenizer.to_str())["model"]
    pieces = [(piece, score) for piece, score in model["vocab"]]
    known = {piece for piece, _ in pieces}
    vocab = json.loads((clip_tokenizer_files() / "vocab.json").read_text(encoding="utf-8"))
    for token in vocab:
        word = "\u2581" + token[:-4]
        if len(pieces) == T5_PIECES:
            break
        if token.endswith("</w>") and len(token) > 5 and word not in known:
            pieces.append((word, -0.5))
            known.add(word)
    pieces += [(f"<filler_{i}>", -20.0) for i in range(T5_PIECES - len(pieces))]
    return T5Tokenizer(vocab=pieces, extra_ids=T5_EXTRA_IDS, model_max_length=T5_LENGTH)


def flux_pipeline(double: int = DOUBLE, single: int = SINGLE, t5_layers: int = T5_LAYERS,
                  dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                  seed: int = 0) -> FluxPipeline:
    """A FLUX.1-dev-shaped ``FluxPipeline`` with random weights (seeded with ``seed``), made on ``device``
    in ``dtype``, with ``double`` / ``single`` transformer blocks and ``t5_layers`` T5 layers (default:
    FLUX.1-dev's 19, 38 and 24). Nothing is cached: on 2 CPU cores one block of each and 2 T5 layers
    (1.27 B parameters in all) take about 20 s and 3 GB."""
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        modules = flux_modules(double, single, t5_layers, dtype=dtype)
    with _quiet():
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=modules["vae"],
                            text_encoder=modules["text"], tokenizer=clip_tokenizer(), text_encoder_2=modules["text2"],
                            tokenizer_2=t5_tokenizer(), transformer=modules["transformer"])
    pipe.set_progress_bar_config(disable=True)
    return pipe
