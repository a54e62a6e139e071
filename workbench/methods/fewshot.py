"""Few-shot unlearning (Fuchi & Takagi, BMVC 2024): update only the text encoder, from a few images.

The loss is the *negative* denoising loss of the concept's images under concept prompts; the denoiser
(UNet or transformer) and VAE stay frozen, gradients reach only the selected text-encoder parts. On a
flow-matching transformer (FLUX.1, SD 3) the loss is the flow-matching one (the velocity noise - x_0 as
target, :meth:`~workbench.families.Family.training_pair`) and the image latents are shifted and scaled as
the transformer sees them; FLUX.1-dev's distilled guidance input is the pipeline's default. The parts may
lie in any text encoder: FLUX's CLIP (``text.*``, the pooled vector) or T5 (``text2.*``, the token rows),
SD 3's two CLIPs (``text.*``, ``text2.*``) or T5 (``text3.*``), one or several. Those parts are trained as
float32 master copies while every forward pass runs in the pipeline's own dtype and device, so a
float16 or bfloat16 pipeline loses no update below its weights' last bit.

The defaults are the reference code's: Adam (lr 1e-5, betas (0.9, 0.98), eps 1e-6, weight decay 1e-8),
prompts drawn from textual inversion's 27 object or 19 style templates (:data:`REFERENCE_TEMPLATES`), and
each image flipped at random and encoded once with a *sampled* VAE latent; every draw comes from the
generator seeded with ``seed``.

>>> import workbench
>>> from workbench.methods import fewshot
>>> from workbench.toy import TOY_CONCEPTS
>>> pipe = workbench.load("toy")
>>> edit = fewshot(pipe, "apple", images=TOY_CONCEPTS.image_folder("apple"), progress=False)
>>> sorted({p.split(".")[2] for p in edit.parts})
['attn', 'ffn']
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from ..anatomy import Selector, n_text_layers, parts as all_parts, select, text_encoders
from ..edits import Edit, Timer, parameter
from ..embed import check_prompt
from ..families import family_of
from ..hooks import frozen, trainable_attention
from ..sampling import seeded


#: The prompt pools of the reference code (textual inversion's ``imagenet_templates_small`` and
#: ``imagenet_style_templates_small``); ``{}`` is the concept, as written (no article fixing).
REFERENCE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": (
        "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
        "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
        "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
        "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
        "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
        "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
        "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
        "a photo of a cool {}", "a photo of a small {}",
    ),
    "style": (
        "a painting in the style of {}", "a rendering in the style of {}",
        "a cropped painting in the style of {}", "the painting in the style of {}",
        "a clean painting in the style of {}", "a dirty painting in the style of {}",
        "a dark painting in the style of {}", "a picture in the style of {}",
        "a cool painting in the style of {}", "a close-up painting in the style of {}",
        "a bright painting in the style of {}", "a cropped painting in the style of {}",
        "a good painting in the style of {}", "a close-up painting in the style of {}",
        "a rendition in the style of {}", "a nice painting in the style of {}",
        "a small painting in the style of {}", "a weird painting in the style of {}",
        "a large painting in the style of {}",
    ),
}
#: How an image becomes a latent: a draw from the VAE's posterior (the reference) or its mean.
LATENTS = ("sample", "mean")


def default_parts(pipe) -> list[str]:
    """Every FFN of the text encoder plus the last layer's attention (the paper's default); on a model
    with several text encoders (SDXL, FLUX's CLIP and T5, SD 3's two CLIPs and T5), the same in each."""
    return select(pipe, [p for e in text_encoders(pipe) for p in (f"{e}.*.ffn", f"{e}.{n_text_layers(pipe, e) - 1}.attn")])


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


@torch.no_grad()
def image_latents(pipe, images: Sequence[Image.Image], sample: torch.Generator | None = None) -> torch.Tensor:
    """The VAE's latents of ``images``, scaled as the denoiser sees them, in the pipeline's dtype: the
    posterior means, or one draw from each posterior with the generator ``sample``."""
    pixels = torch.stack([torch.from_numpy(np.array(im)) for im in images]).permute(0, 3, 1, 2)
    return family_of(pipe).image_latents(pipe, pixels, sample)


def flipped(images: Sequence[Image.Image], gen: torch.Generator) -> list[Image.Image]:
    """Each image mirrored left-right with probability 1/2 (one draw per image from ``gen``)."""
    flips = (torch.rand(len(images), generator=gen) < 0.5).tolist()
    return [im.transpose(Image.FLIP_LEFT_RIGHT) if f else im for im, f in zip(images, flips)]


def _masters(pipe, names: list[str]) -> dict[str, torch.Tensor]:
    """Float32 trainable copies of the named parts' parameters, keyed ``"<part>.<weight|bias>"``."""
    table = all_parts(pipe)
    return {f"{name}.{attr}": p.detach().float().clone().requires_grad_(True)
            for name in names for attr, p in table[name].named_parameters(recurse=False)}


def _train(pipe, concept: str, prompts: list[str], latents: torch.Tensor, masters: dict[str, torch.Tensor],
           adam: dict, batch: int, steps: int, gen: torch.Generator, progress: bool) -> None:
    """Gradient ascent on the denoising loss, updating ``masters`` in place; the pipeline is untouched.
    ``adam``: the optimiser's settings (lr, betas, eps, weight_decay)."""
    family = family_of(pipe)
    table = all_parts(pipe)
    dtypes = {k: parameter(table, k).dtype for k in masters}
    opt = torch.optim.Adam(masters.values(), **adam)
    tokens = {e: family.tokenize(pipe, prompts, encoder=e) for e in text_encoders(pipe)}
    n_train = family.train_timesteps(pipe)
    device = family.denoiser(pipe).device
    for _ in tqdm(range(steps), desc=f"few-shot {concept}", disable=not progress):
        idx = torch.randint(len(latents), (batch,), generator=gen)
        pidx = torch.randint(len(prompts), (batch,), generator=gen)
        noise = torch.randn(latents[idx].shape, generator=gen).to(device, latents.dtype)
        t = torch.randint(0, n_train, (batch,), generator=gen).to(device)
        noisy, target = family.training_pair(pipe, latents[idx.to(latents.device)], noise, t)
        weights = {k: m.to(dtypes[k]) for k, m in masters.items()}
        cond = family.conditioning(pipe, {e: (ids[pidx], mask[pidx]) for e, (ids, mask) in tokens.items()}, weights)
        pred = family.denoise(pipe, noisy, t, cond)
        loss = -(pred.float() - target.float()).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def fewshot(pipe, concept: str, images: str | Path | Sequence[Image.Image] | None = None,
            kind: str = "object", prompts: Sequence[str] | None = None, parts: Selector | None = None,
            lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6,
            weight_decay: float = 1e-8, batch: int = 2, steps: int = 8, epochs: int | None = None,
            latent: str = "sample", flip: bool = True, seed: int = 0, progress: bool = True) -> Edit:
    """Unlearn ``concept`` from the text encoder with gradient ascent on the denoising loss.

    ``images``: a folder or list of a few images of the concept (``erase()`` takes them from the model's
    concept set). ``prompts`` default to the reference pool of ``kind`` (``"object"``: 27 templates,
    ``"style"``: 19, :data:`REFERENCE_TEMPLATES`), one drawn per training example. Adam with ``lr``,
    ``betas``, ``eps`` and ``weight_decay``. ``latent``: ``"sample"`` draws each image's latent once from
    the VAE's posterior, ``"mean"`` takes its mean; ``flip`` mirrors each image with probability 1/2
    first. ``epochs``, when given, overrides ``steps`` (one epoch = one pass over the images in batches).
    """
    check_prompt(pipe, concept)
    if kind not in REFERENCE_TEMPLATES:
        raise ValueError(f"kind must be one of {', '.join(REFERENCE_TEMPLATES)}, not {kind!r}")
    if latent not in LATENTS:
        raise ValueError(f"latent must be one of {', '.join(map(repr, LATENTS))}, not {latent!r}")
    prompts = list(prompts) if prompts is not None else [t.format(concept) for t in REFERENCE_TEMPLATES[kind]]
    names = default_parts(pipe) if parts is None else select(pipe, parts)
    bad = [n for n in names if n.split(".")[0] not in text_encoders(pipe)]
    if bad:
        what = "transformer" if bad[0].startswith("dit.") else "UNet"
        raise ValueError(f"few-shot unlearning updates the text encoders only ({', '.join(text_encoders(pipe))}); "
                         f"{', '.join(bad[:4])} are {what} parts: use uce, rece or esd for those")
    if images is None:
        raise ValueError(f"few-shot unlearning needs a few images of {concept!r}: pass images=<folder or list of "
                         "PIL images>; erase(pipe, concept, 'fewshot') takes them from the model's concept set")
    imgs = load_images(images, family_of(pipe).image_size(pipe))
    total = steps if epochs is None else epochs * math.ceil(len(imgs) / batch)

    with Timer() as timer:
        torch.manual_seed(seed)
        gen = seeded(seed)  # every draw below comes from it: flips, latents, then the training batches
        latents = image_latents(pipe, flipped(imgs, gen) if flip else imgs, gen if latent == "sample" else None)
        masters = _masters(pipe, names)
        adam = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        with frozen(*family_of(pipe).components(pipe).values()), trainable_attention(pipe):
            _train(pipe, concept, prompts, latents, masters, adam, batch, total, gen, progress)
        table = all_parts(pipe)
        base = {k: parameter(table, k).detach() for k in masters}
    hyper = dict(parts=names, kind=kind, prompts=prompts, n_images=len(imgs), lr=lr, betas=list(betas), eps=eps,
                 weight_decay=weight_decay, batch=batch, steps=total, latent=latent, flip=flip)
    return Edit.between(base, {k: m.detach() for k, m in masters.items()}, method="fewshot", concept=concept,
                        params=hyper, seed=seed, seconds=timer.seconds)
