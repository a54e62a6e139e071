"""The base of every model-family adapter: :class:`Conditioning`, :class:`Family` and the registry."""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn

__all__ = ["Conditioning", "Family", "FAMILIES", "register", "family_of", "refusal"]


@dataclass
class Conditioning:
    """What prompts condition the denoiser with: ``tokens`` ``[n, tokens, width]`` (what the
    cross-attention keys and values see) and, for a family that has one, ``pooled`` ``[n, width']``.

    It behaves like a batch of rows: ``len``, indexing and slicing, ``+``, ``-`` and scaling act on both.

    >>> c = Conditioning(torch.ones(2, 3, 4), torch.zeros(2, 5))
    >>> len(c), c[:1].tokens.shape, (2 * c - c).pooled.shape
    (2, torch.Size([1, 3, 4]), torch.Size([2, 5]))
    """

    tokens: torch.Tensor
    pooled: torch.Tensor | None = None

    def _map(self, fn, other: Any = None) -> "Conditioning":
        if isinstance(other, Conditioning):
            pooled = None if self.pooled is None else fn(self.pooled, other.pooled)
            return Conditioning(fn(self.tokens, other.tokens), pooled)
        return Conditioning(fn(self.tokens), None if self.pooled is None else fn(self.pooled))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index) -> "Conditioning":
        return self._map(lambda t: t[index])

    def __add__(self, other: "Conditioning") -> "Conditioning":
        return self._map(torch.add, other)

    def __sub__(self, other: "Conditioning") -> "Conditioning":
        return self._map(torch.sub, other)

    def __mul__(self, scale: float) -> "Conditioning":
        return self._map(lambda t: t * scale)

    __rmul__ = __mul__

    @property
    def shape(self) -> torch.Size:
        """The token rows' shape."""
        return self.tokens.shape

    def mean(self, dim: int = 0) -> "Conditioning":
        """The mean over rows, as one row (``dim`` must be 0)."""
        if dim != 0:
            raise ValueError("a Conditioning is averaged over its rows only (dim=0)")
        return self._map(lambda t: t.mean(0, keepdim=True))

    def to(self, *args, **kwargs) -> "Conditioning":
        return self._map(lambda t: t.to(*args, **kwargs))

    def float(self) -> "Conditioning":
        return self._map(lambda t: t.float())

    def cpu(self) -> "Conditioning":
        return self._map(lambda t: t.cpu())

    def detach(self) -> "Conditioning":
        return self._map(lambda t: t.detach())

    def expand(self, n: int) -> "Conditioning":
        """One row repeated ``n`` times (a view)."""
        return self._map(lambda t: t.expand(n, *t.shape[1:]))

    def compact(self) -> "torch.Tensor | Conditioning":
        """The token rows alone when there is no pooled vector (SD 1.x/2.x), else this conditioning."""
        return self.tokens if self.pooled is None else self

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        items = list(items)
        pooled = None if items[0].pooled is None else torch.cat([c.pooled for c in items])
        return Conditioning(torch.cat([c.tokens for c in items]), pooled)


class Family:
    """One kind of pipeline. Subclasses say which pipelines they take (:meth:`matches`) and implement
    the rest; every method takes the pipeline, so one adapter serves every pipeline of its family."""

    name: str = ""
    #: What the family is, for error messages.
    description: str = ""

    @classmethod
    def matches(cls, pipe) -> bool:
        raise NotImplementedError

    # components (only adapters, loaders and the hooks module reach inside a pipeline)
    def encoders(self, pipe) -> dict[str, nn.Module]:
        """The text encoders by the prefix of their part names (``"text"``, ``"text2"``)."""
        raise NotImplementedError

    def tokenizers(self, pipe) -> dict[str, Any]:
        raise NotImplementedError

    def denoiser(self, pipe) -> nn.Module:
        raise NotImplementedError

    def components(self, pipe) -> dict[str, nn.Module]:
        """Every weight-bearing component by its diffusers name (``"unet"``, ``"text_encoder"``, ...)."""
        raise NotImplementedError

    def parts(self, pipe) -> dict[str, nn.Module]:
        """Stable part name -> ``nn.Linear`` / ``nn.Conv2d``, text encoders first, then the denoiser."""
        raise NotImplementedError

    def text_layers(self, pipe, encoder: str = "text") -> nn.ModuleList:
        raise NotImplementedError

    def input_embeddings(self, pipe, encoder: str = "text") -> nn.Embedding:
        return self.encoders(pipe)[encoder].get_input_embeddings()

    # text
    def tokenizer(self, pipe, encoder: str = "text"):
        return self.tokenizers(pipe)[encoder]

    def tokenize(self, pipe, prompts: Sequence[str], padding: str = "max_length",
                 encoder: str = "text") -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and the real-token mask of ``encoder``'s tokenizer, truncated as the pipeline does."""
        raise NotImplementedError

    def encode(self, pipe, prompts: Sequence[str]) -> Conditioning:
        """What the pipeline conditions on for ``prompts`` (no gradients), on the text encoder's device."""
        raise NotImplementedError

    def conditioning(self, pipe, ids: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     params: dict[str, torch.Tensor] | None = None) -> Conditioning:
        """The conditioning of token ids (``{encoder: (ids, mask)}`` from :meth:`tokenize`), with
        gradients; ``params`` (``"<part>.<weight|bias>"`` -> tensor) replace those parameters in the
        forward pass only."""
        raise NotImplementedError

    def hidden_states(self, pipe, ids: torch.Tensor, mask: torch.Tensor, encoder: str = "text") -> tuple[torch.Tensor, ...]:
        """``encoder``'s input embeddings and every layer's output (``layers + 1`` tensors), made
        conditioning-ready (through CLIP's final layer norm)."""
        raise NotImplementedError

    def empty(self, pipe, n: int = 1) -> Conditioning:
        """The unconditional branch of classifier-free guidance, as the pipeline makes it."""
        raise NotImplementedError

    # image side
    def latent_shape(self, pipe) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one latent at the model's own size."""
        raise NotImplementedError

    def image_size(self, pipe) -> int:
        """The side of the model's images in pixels."""
        raise NotImplementedError

    def image_latents(self, pipe, pixels: torch.Tensor, sample: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def denoise(self, pipe, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                params: dict[str, torch.Tensor] | None = None, guidance: float | None = None) -> torch.Tensor:
        """The denoiser's prediction; ``params`` as in :meth:`conditioning`; ``guidance`` is the
        distilled guidance of a model that takes one as input (ignored by the others)."""
        raise NotImplementedError

    def distilled(self, pipe) -> bool:
        """Whether the model takes its guidance as an input (FLUX.1-dev) instead of from two branches."""
        return False

    def branches_apart(self, pipe, guidance: float) -> bool:
        """Whether :meth:`draw` at ``guidance`` runs the conditional and unconditional branches as two
        denoiser calls per step, the conditional first (rather than one batch, or one distilled pass)."""
        return False

    def training_pair(self, pipe, clean: torch.Tensor, noise: torch.Tensor,
                      t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noisy latents, target)`` of the diffusion loss at training timesteps ``t``."""
        raise NotImplementedError

    def train_timesteps(self, pipe) -> int:
        raise NotImplementedError

    def draw(self, pipe, cond: Conditioning, negative: Conditioning, steps: int, guidance: float,
             generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
             size: int | None = None) -> list[Image.Image]:
        """Images from conditioning rows with the pipeline's own sampler."""
        raise NotImplementedError

    # where text meets image
    def cross_attention(self, pipe) -> dict[str, nn.Module]:
        """Every layer where text meets image by its layer name, in network order."""
        raise NotImplementedError

    def blocks(self, pipe) -> dict[str, nn.Module]:
        """The denoiser's blocks a causal trace restores, by name, in the order data flows."""
        raise NotImplementedError

    def text_entries(self, pipe) -> dict[str, str]:
        """Every matrix the closed-form methods may edit, by part name -> the space of its inputs:
        ``"tokens"`` (the conditioning's token rows, what every cross-attention k/v reads), ``"pooled"``
        (the pooled vector) or a block's own text stream (``"dit.{i}.text"``, captured in a forward pass)."""
        raise NotImplementedError

    def default_entries(self, pipe) -> list[str]:
        """The matrices UCE and RECE edit when no parts are given."""
        raise NotImplementedError

    def row_segments(self, pipe) -> tuple[tuple[str, int], ...]:
        """The token rows' runs: ``(encoder whose tokenizer made them, first row)``, in order."""
        raise NotImplementedError


#: The registered families, the most specific first.
FAMILIES: list[Family] = []
_CHOSEN: "weakref.WeakKeyDictionary[object, Family]" = weakref.WeakKeyDictionary()


def register(family: type[Family], first: bool = False) -> type[Family]:
    """Register a family (a decorator); ``first`` puts it before the others (a more specific family)."""
    FAMILIES.insert(0 if first else len(FAMILIES), family())
    return family


def refusal(pipe) -> str:
    """Why no registered family takes ``pipe``: what it has and what each family needs."""
    has = [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer")
           if getattr(pipe, n, None) is not None]
    return (f"no model family takes this {type(pipe).__name__} (it has {', '.join(has) or 'none of the known components'}); "
            "the workbench knows " + "; ".join(f"{f.name}: {f.description}" for f in FAMILIES))


def family_of(pipe) -> Family:
    """The family adapter of ``pipe`` (chosen once per pipeline); ``TypeError`` when none takes it."""
    try:
        chosen = _CHOSEN.get(pipe)
    except TypeError:
        chosen = None
    if chosen is not None and chosen.matches(pipe):
        return chosen
    for family in FAMILIES:
        if family.matches(pipe):
            try:
                _CHOSEN[pipe] = family
            except TypeError:
                pass
            return family
    raise TypeError(refusal(pipe))

