"""What every attack shares: what it returns, the prompts it is judged on, the concept's target images,
the original weights under an applied edit, and soft tokens trained with the denoising loss.

Soft tokens are vectors at the text encoder's *input* (its token-embedding table's output), placed at
the positions of a placeholder word in a template; a hook on the embedding table puts them there, so the
rest of the encoder, and any edit of it, runs as usual. With several text encoders a soft token is every
encoder's input vector side by side (SDXL's two CLIPs; FLUX's CLIP and T5, whose ``shared`` table is
its input), or only some encoders' (:class:`SoftTokens`' ``encoders``) while the others read the
template without the slot: an attack that projects onto real tokens needs one vocabulary, and FLUX's
CLIP and T5 (SD 3's CLIPs and T5) tokenize differently (:func:`vocabulary_encoders`).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from PIL import Image

from ..anatomy import parts
from ..embed import conditioning
from ..concepts import ConceptSet, a
from ..edits import Edit, applied
from ..families import Conditioning, family_of
from ..hooks import hooked
from ..interventions import suspended
from ..methods.fewshot import image_latents, load_images
from ..sampling import generate_from

#: The word that stands in for the concept where an attack needs a concept-free prompt.
NEUTRAL = "thing"
#: How many target images an attack optimises on when the concept set has no image folder.
TARGET_IMAGES = 4
#: The seed of the unedited model's target images (never an evaluation seed).
TARGET_SEED = 31_337


@dataclass
class Crafted:
    """What an attack made: prompt embeddings ``[m, tokens, width]`` (float32, CPU; a
    :class:`~workbench.families.Conditioning` where the family has pooled embeddings), one per attack
    prompt, and what each stands for (``"a photo of <v>"``, or the readable prompt of a projected attack)."""

    embeds: torch.Tensor | Conditioning
    prompts: list[str]
    info: dict = field(default_factory=dict)


def eval_prompts(concept_set: ConceptSet, concept: str, n: int = 4) -> list[str]:
    """The prompts an attack is judged on: held-out probe wordings of the concept, never an erase prompt."""
    return concept_set.held_out(concept, n)


def fill(template: str, word: str) -> str:
    """A concept template (``{a}``, ``{c}``, ``{subject}``) filled with ``word`` instead of the concept."""
    return template.format(a=a(word), c=word, subject="a thing")


def slot(prompt: str, concept: str) -> str:
    """``prompt`` with the concept's words replaced by ``{}`` (a template for :class:`SoftTokens`).

    >>> slot("a blue apple", "apple"), slot("a cat by van gogh", "van gogh")
    ('a blue {}', 'a cat by {}')
    """
    escaped = prompt.replace("{", "{{").replace("}", "}}")
    out = re.sub(rf"\b{re.escape(concept)}\b", "{}", re.sub(rf"\b(?:an?) {re.escape(concept)}\b", "a {}", escaped))
    if "{}" not in out:
        raise ValueError(f"{prompt!r} does not contain the concept {concept!r}")
    return out


def swap(prompt: str, concept: str, word: str) -> str:
    """``prompt`` with ``word`` in place of the concept, its article fixed.

    >>> swap("an apple by seurat", "apple", "thing"), swap("a blue apple", "apple", "thing")
    ('a thing by seurat', 'a blue thing')
    """
    out = re.sub(rf"\b(?:an?) {re.escape(concept)}\b", a(word), prompt)
    return re.sub(rf"\b{re.escape(concept)}\b", word, out)


def original_weights(pipe, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The named parts' weights (float32) as they were before every edit now applied to ``pipe``."""
    table = parts(pipe)
    out = {n: table[n].weight.detach().float().clone() for n in names}
    for edit in applied(pipe):
        for n in names:
            delta = edit.deltas.get(f"{n}.weight")
            if delta is not None:
                out[n] -= delta.to(out[n].device)
    return out


def target_images(pipe, concept_set: ConceptSet, concept: str, n: int = TARGET_IMAGES) -> list[Image.Image]:
    """The concept's images an attack optimises on: the concept set's image folder when it has one,
    otherwise ``n`` images the *unedited* model makes from the concept's erase prompts, at the model's
    own size (the images :func:`~workbench.sampling.generate` makes on SD and SDXL)."""
    folder = concept_set.image_folder(concept)
    size = family_of(pipe).image_size(pipe)
    if folder is not None and folder.is_dir():
        return load_images(folder, size)
    prompts = (concept_set.prompts(concept) * n)[:n]
    with unedited(pipe):
        return generate_from(pipe, conditioning(pipe, prompts, device=None), TARGET_SEED)


@contextmanager
def unedited(pipe) -> Iterator[None]:
    """A context in which ``pipe`` is as it was before the erasures now applied to it (edits' weights to
    float32 rounding; interventions' hooks off); they are exactly back afterwards."""
    undo: dict[str, torch.Tensor] = {}
    for edit in applied(pipe):
        for key, delta in edit.deltas.items():
            undo[key] = undo.get(key, 0) - delta
    with suspended(pipe), Edit(undo, "undo", "").apply(pipe):
        yield


def placeholder(pipe, templates: Sequence[str], encoders: Sequence[str] | None = None) -> str:
    """A one-token word (for the tokenizers of ``encoders``, default every one) that appears in none of
    ``templates``: the slot soft tokens go into."""
    family = family_of(pipe)
    tokenizers = [family.tokenizer(pipe, e) for e in (family.encoders(pipe) if encoders is None else encoders)]
    for word in ("x", "z", "q", "xx"):
        if (all(len(tok(word, add_special_tokens=False).input_ids) == 1 for tok in tokenizers)
                and not any(word in t.split() for t in templates)):
            return word
    raise ValueError("no one-token placeholder word fits these templates")


def input_tables(pipe, encoders: Sequence[str] | None = None) -> dict[str, torch.nn.Embedding]:
    """Each text encoder's token-embedding table (of ``encoders``, default every one), by part-name prefix."""
    family = family_of(pipe)
    return {e: family.input_embeddings(pipe, e) for e in family.encoders(pipe) if encoders is None or e in encoders}


def vocabulary_encoders(pipe) -> list[str]:
    """The encoders whose tokenizer has the vocabulary of the one that makes the conditioning's first
    token rows: where one token id means one word in every encoder, so a token's input rows side by side
    are well defined. Every encoder on SD and SDXL (two CLIPs); T5 alone on FLUX (CLIP only gives the
    pooled vector, and its tokens are not T5's); the two CLIPs on SD 3 (T5 tokenizes differently).

    >>> import workbench
    >>> vocabulary_encoders(workbench.load("toy"))
    ['text']
    """
    family = family_of(pipe)
    first = family.row_segments(pipe)[0][0]
    vocab = family.tokenizer(pipe, first).get_vocab()
    return [e for e in family.encoders(pipe) if e == first or family.tokenizer(pipe, e).get_vocab() == vocab]


class SoftTokens:
    """``k`` trainable input vectors (float32 masters) and the templates they are spliced into.

    A vector is as wide as the token embeddings of ``encoders`` (default: every text encoder) side by
    side (SDXL: 768 + 1,280 on the real model), so one soft token sits in the slot of every one of
    those encoders' inputs; any other encoder reads the template without the slot (``"{} an apple"``
    -> ``"an apple"``). ``templates`` contain ``{}`` where the k tokens go (``"a photo of {}"``,
    ``"{} an apple"``). :meth:`encode` runs the pipeline's text encoders on some of the templates with
    the vectors in place and returns the conditioning, which carries gradients to the vectors only.
    """

    def __init__(self, pipe, templates: Sequence[str], init: torch.Tensor, encoders: Sequence[str] | None = None) -> None:
        self.pipe, self.templates = pipe, list(templates)
        self.family = family = family_of(pipe)
        self.tables = input_tables(pipe, encoders)
        if not self.tables:
            raise ValueError(f"no text encoder among {list(encoders or [])}; this model's: {', '.join(family.encoders(pipe))}")
        word = placeholder(pipe, self.templates, list(self.tables))
        k = init.shape[0]
        filled = [t.format(" ".join([word] * k)) for t in self.templates]
        self.ids, self.slots = {}, {}
        self.fixed = {e: family.tokenize(pipe, [" ".join(t.format("").split()) for t in self.templates], encoder=e)
                      for e in family.encoders(pipe) if e not in self.tables}
        for e in self.tables:
            tok = family.tokenizer(pipe, e)
            self.ids[e] = family.tokenize(pipe, filled, encoder=e)
            self.slots[e] = self.ids[e][0] == tok(word, add_special_tokens=False).input_ids[0]
            short = [t for t, s in zip(self.templates, self.slots[e].sum(1).tolist()) if s != k]
            if short:
                raise ValueError(f"the soft tokens do not fit in {short[0]!r} within {tok.model_max_length} tokens")
        self.vectors = init.detach().float().clone().requires_grad_(True)

    def encode(self, rows: Sequence[int] | None = None, vectors: torch.Tensor | None = None) -> Conditioning:
        """The conditioning (``len(rows)`` rows) of templates ``rows`` (default all), with ``vectors``
        (default the trained ones) in their slots."""
        rows = list(range(len(self.templates))) if rows is None else list(rows)
        vectors = self.vectors if vectors is None else vectors
        splices, start = [], 0
        for e, table in self.tables.items():
            width = table.weight.shape[1]
            splices.append((table, self._splice(self.slots[e][rows].to(table.weight.device),
                                                vectors[:, start:start + width], len(rows))))
            start += width
        with hooked(splices):
            chosen = {e: (ids[rows], mask[rows]) for e, (ids, mask) in (self.ids | self.fixed).items()}
            return self.family.conditioning(self.pipe, chosen)

    @staticmethod
    def _splice(slots: torch.Tensor, vectors: torch.Tensor, n: int):
        def splice(module, args, output):
            out = output.clone()
            out[slots] = vectors.to(out.device, out.dtype).repeat(n, 1)
            return out
        return splice


def denoising_loss(pipe, latents: torch.Tensor, cond: Conditioning, gen: torch.Generator) -> torch.Tensor:
    """The ordinary diffusion loss of ``latents`` under conditioning ``cond`` (one row each), at random
    training timesteps and noise drawn from ``gen``; the target is the family's (the noise, or the
    velocity for a v-prediction model)."""
    family = family_of(pipe)
    device = family.denoiser(pipe).device
    noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
    t = torch.randint(0, family.train_timesteps(pipe), (len(latents),), generator=gen).to(device)
    noisy, target = family.training_pair(pipe, latents.to(device), noise, t)
    pred = family.denoise(pipe, noisy, t, cond)
    return (pred.float() - target.float()).pow(2).mean()


def concept_latents(pipe, concept_set: ConceptSet, concept: str) -> torch.Tensor:
    """The VAE latents (posterior means) of the concept's target images."""
    with torch.no_grad():
        return image_latents(pipe, target_images(pipe, concept_set, concept))


def batches(n_latents: int, n_templates: int, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    """One training batch: which latents and which templates (drawn from ``gen``)."""
    idx = torch.randint(n_latents, (batch,), generator=gen)
    rows = torch.randint(n_templates, (batch,), generator=gen).tolist()
    return idx, rows


__all__ = ["Crafted", "NEUTRAL", "SoftTokens", "batches", "concept_latents", "denoising_loss", "eval_prompts",
           "fill", "input_tables", "original_weights", "placeholder", "slot", "swap", "target_images", "unedited",
           "vocabulary_encoders"]
