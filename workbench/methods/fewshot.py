"""Few-shot unlearning (Fuchi & Takagi, BMVC 2024): update only the text encoder, from a few images.

The loss is the *negative* denoising loss of the concept's images under concept prompts; the UNet and
VAE stay frozen, gradients reach only the selected text-encoder parts.

>>> import workbench
>>> from workbench.methods import fewshot
>>> pipe = workbench.load("toy")
>>> edit = fewshot(pipe, "apple", progress=False)
>>> sorted({p.split(".")[2] for p in edit.parts})
['attn', 'ffn']
"""
from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from ..anatomy import Selector, parts as all_parts, select
from ..edits import Edit, Timer
from ..embed import check_prompt
from ..models import DATA, seeded
from ..toy.world import a as with_article

OBJECT_TEMPLATES = ("a photo of {a}", "a picture of {a}", "an icon of {a}", "{c}")
STYLE_TEMPLATES = ("a painting in the style of {c}", "a painting by {c}", "art by {c}", "{c}")


def concept_prompts(concept: str, kind: str = "object") -> list[str]:
    """The prompt templates of ``kind`` (``"object"`` or ``"style"``) filled in with ``concept``.

    >>> concept_prompts("apple")
    ['a photo of an apple', 'a picture of an apple', 'an icon of an apple', 'apple']
    """
    if kind not in ("object", "style"):
        raise ValueError(f"kind must be 'object' or 'style', not {kind!r}")
    templates = OBJECT_TEMPLATES if kind == "object" else STYLE_TEMPLATES
    return [t.format(a=with_article(concept), c=concept) for t in templates]


def default_parts(pipe) -> list[str]:
    """Every FFN of the text encoder plus the last layer's attention (the paper's default)."""
    last = max(int(n.split(".")[1]) for n in select(pipe, "text.*"))
    return select(pipe, ["text.*.ffn", f"text.{last}.attn"])


def load_images(images: str | Path | Sequence[Image.Image | str | Path], size: int) -> list[Image.Image]:
    """Images from a folder or a list, as RGB squares of ``size``; non-images are skipped with a warning."""
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if not folder.is_dir():
            raise FileNotFoundError(f"no image folder at {folder}; give a folder of a few (about 4) images "
                                    "of the concept, or a list of PIL images")
        images = sorted(p for p in folder.iterdir() if p.is_file())
    out = []
    for item in images:
        if isinstance(item, Image.Image):
            img = item
        else:
            try:
                img = Image.open(item)
                img.load()
            except (UnidentifiedImageError, OSError):
                warnings.warn(f"skipping {item}: not an image", stacklevel=2)
                continue
        img = img.convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
        out.append(img if img.size == (size, size) else img.resize((size, size), Image.BICUBIC))
    if not out:
        raise ValueError("no usable images of the concept were given; few-shot unlearning needs a few "
                         "(about 4) images, e.g. the folder data/fewshot/<concept>/ for the toy model")
    return out


def fewshot(pipe, concept: str, images: str | Path | Sequence[Image.Image] | None = None,
            kind: str = "object", parts: Selector | None = None, lr: float = 1e-5,
            betas: tuple[float, float] = (0.9, 0.98), batch: int = 2, epochs: int = 4,
            steps: int | None = None, seed: int = 0, progress: bool = True) -> Edit:
    """Unlearn ``concept`` from the text encoder with gradient ascent on the denoising loss.

    ``images`` defaults to the toy world's few-shot set ``data/fewshot/<concept>/``; ``kind`` picks the
    prompt templates (``"object"`` or ``"style"``); ``steps`` overrides ``epochs``.
    """
    check_prompt(pipe, concept)
    prompts = concept_prompts(concept, kind)
    names = default_parts(pipe) if parts is None else select(pipe, parts)
    bad = [n for n in names if not n.startswith("text.")]
    if bad:
        raise ValueError(f"few-shot unlearning updates the text encoder only; {', '.join(bad[:4])} are UNet "
                         "parts: use uce or rece for those")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if images is None:
        images = DATA / "fewshot" / concept.replace(" ", "-")
    imgs = load_images(images, size)

    with Timer() as timer:
        torch.manual_seed(seed)
        gen = seeded(seed)
        device = pipe.unet.device
        encoder = copy.deepcopy(pipe.text_encoder).train(False).requires_grad_(False)
        pipe_parts, copy_parts = all_parts(pipe), all_parts(_Shim(encoder, pipe.unet))
        params = {}
        for n in names:
            for attr, p in copy_parts[n].named_parameters(recurse=False):
                p.requires_grad_(True)
                params[f"{n}.{attr}"] = p
        opt = torch.optim.Adam(params.values(), lr=lr, betas=betas)
        with torch.no_grad():
            pixels = torch.stack([torch.from_numpy(np.array(im)) for im in imgs])
            pixels = pixels.permute(0, 3, 1, 2).to(device, pipe.vae.dtype) / 127.5 - 1
            latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        tok = pipe.tokenizer(prompts, padding="max_length", truncation=True,
                             max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
        use_mask = getattr(encoder.config, "use_attention_mask", False)
        sched = DDPMScheduler.from_config(pipe.scheduler.config)  # add_noise at any training timestep
        n_train = sched.config.num_train_timesteps
        total = steps if steps is not None else epochs * math.ceil(len(imgs) / batch)
        frozen = _Frozen(pipe.unet, pipe.vae)
        try:
            for _ in tqdm(range(total), desc=f"few-shot {concept}", disable=not progress):
                idx = torch.randint(len(imgs), (batch,), generator=gen)
                pidx = torch.randint(len(prompts), (batch,), generator=gen)
                noise = torch.randn(latents[idx].shape, generator=gen).to(device, latents.dtype)
                t = torch.randint(0, n_train, (batch,), generator=gen).to(device)
                noisy = sched.add_noise(latents[idx], noise, t)
                cond = encoder(tok.input_ids[pidx].to(device),
                               attention_mask=tok.attention_mask[pidx].to(device) if use_mask else None)[0]
                pred = pipe.unet(noisy, t, cond.to(pipe.unet.dtype)).sample
                loss = -(pred.float() - noise.float()).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        finally:
            frozen.restore()
        base, new = {}, {}
        for key, p in params.items():
            part, attr = key.rsplit(".", 1)
            base[key] = getattr(pipe_parts[part], attr).detach()
            new[key] = p.detach()
    hyper = dict(parts=names, kind=kind, prompts=prompts, n_images=len(imgs), lr=lr, betas=list(betas),
                 batch=batch, steps=total)
    return Edit.between(base, new, method="fewshot", concept=concept, params=hyper, seed=seed,
                        seconds=timer.seconds)


class _Shim:
    """Just enough of a pipeline for :func:`workbench.anatomy.parts` to name a copied text encoder."""

    def __init__(self, text_encoder, unet) -> None:
        self.text_encoder, self.unet = text_encoder, unet


class _Frozen:
    """Turn gradients off for modules (so no .grad is written into the pipeline); restore the flags."""

    def __init__(self, *modules) -> None:
        self.flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
        for p, _ in self.flags:
            p.requires_grad_(False)

    def restore(self) -> None:
        for p, flag in self.flags:
            p.requires_grad_(flag)
