"""Cross-attention maps (the DAAM idea): where in the image each UNet cross-attention layer looks for a word.

While the pipeline draws one image, an attention processor installed on every cross-attention layer
(attn2) records the softmax attention of each pixel to the word's tokens (summed over the word's
tokens, averaged over heads and denoising steps, conditional branch of guidance only). Each layer's
map is upsampled bilinearly to the image; their sum is the word's overall map. The image itself is
drawn by the layers' own processors (the recorder computes the probabilities beside them, in float32),
so it is exactly the image :func:`workbench.sampling.generate` draws; on exit every processor is put
back, the same objects.

>>> import workbench
>>> pipe = workbench.load("toy")
>>> maps = attention_maps(pipe, "a red apple", "apple", steps=4)
>>> list(maps.layers)[:3], maps.total.shape
(['unet.down.1.0', 'unet.down.2.0', 'unet.mid.0'], (32, 32))
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from .anatomy import as_list
from .embed import word_positions
from .families import family_of
from .hooks import processors
from .sampling import GUIDANCE, STEPS, generate


def cross_attention_layers(pipe) -> dict[str, torch.nn.Module]:
    """Every cross-attention layer of the UNet by its anatomy name (``"unet.mid.0"``), in network order."""
    return family_of(pipe).cross_attention(pipe)


class _Recorder:
    """An attention processor that runs the layer's own processor and, beside it, adds the attention
    of the last batch row (the conditional branch of the one prompt) to the word's tokens to ``sums``."""

    def __init__(self, inner, name: str, positions: list[int], sums: dict[str, torch.Tensor]) -> None:
        self.inner, self.name, self.positions, self.sums = inner, name, positions, sums

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        with torch.no_grad():
            self._record(attn, hidden_states[-1:], encoder_hidden_states[-1:], temb)
        return out

    def _record(self, attn, h: torch.Tensor, context: torch.Tensor, temb) -> None:
        if attn.spatial_norm is not None:
            h = attn.spatial_norm(h, temb)
        if h.ndim == 4:
            h = h.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q = attn.head_to_batch_dim(attn.to_q(h)).float()
        k = attn.head_to_batch_dim(attn.to_k(context)).float()
        probs = (q @ k.transpose(1, 2) * attn.scale).softmax(-1)  # [heads, pixels, tokens]
        word = probs[:, :, self.positions].sum(-1).mean(0).cpu()
        self.sums[self.name] = self.sums.get(self.name, 0) + word
        self.sums[f"{self.name}#steps"] = self.sums.get(f"{self.name}#steps", 0) + 1


@contextmanager
def recording(pipe, positions: list[int], layers: Sequence[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Install recorders on the named cross-attention layers (default all); yields the dict they fill.
    On exit every layer gets back the very processor object it had."""
    sums: dict[str, torch.Tensor] = {}
    with processors(_chosen(pipe, layers), lambda name, inner: _Recorder(inner, name, positions, sums)):
        yield sums


def _chosen(pipe, layers: Sequence[str] | None) -> dict[str, torch.nn.Module]:
    everything = cross_attention_layers(pipe)
    if layers is None:
        return everything
    wanted = as_list(layers)
    missing = [x for x in wanted if x not in everything]
    if missing:
        raise ValueError(f"{', '.join(map(repr, missing))} is not a cross-attention layer of this UNet; its "
                         f"layers: {', '.join(everything)}")
    return {name: everything[name] for name in wanted}


@dataclass
class AttentionMaps:
    """One image and, per cross-attention layer, the attention to a word, upsampled to the image."""

    prompt: str
    word: str
    positions: list[int]
    image: Image.Image
    layers: dict[str, np.ndarray] = field(default_factory=dict)
    seed: int = 0

    @property
    def total(self) -> np.ndarray:
        """The sum of the layers' maps."""
        return np.sum(list(self.layers.values()), axis=0)

    def table(self) -> pd.DataFrame:
        """Per layer: its resolution, the mean attention to the word (of a pixel's attention, summed
        over the word's tokens) and the share of the summed map it contributes."""
        total = float(self.total.sum()) or 1.0
        return pd.DataFrame([{"layer": name, "mean": float(m.mean()), "share": float(m.sum()) / total}
                             for name, m in self.layers.items()])


def _upsampled(sums: dict[str, torch.Tensor], latent: tuple[int, int], size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Each layer's time-averaged map, reshaped to its own grid and upsampled to ``size``."""
    out = {}
    for name, total in sums.items():
        if name.endswith("#steps"):
            continue
        mean = total / sums[f"{name}#steps"]
        scale = round((latent[0] * latent[1] / mean.numel()) ** 0.5)
        grid = mean.reshape(1, 1, latent[0] // scale, latent[1] // scale)
        out[name] = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
    return out


def _latent_of(pipe, image: Image.Image) -> tuple[int, int]:
    """The latent grid an image of this size was drawn on."""
    family = family_of(pipe)
    _, height, width = family.latent_shape(pipe)
    factor = family.image_size(pipe) // height
    return image.height // factor, image.width // factor


def attention_maps(pipe, prompt: str, word: str, seed: int = 0, steps: int = STEPS, guidance: float = GUIDANCE,
                   layers: Sequence[str] | None = None) -> AttentionMaps:
    """Draw ``prompt`` (seed ``seed``, as :func:`workbench.sampling.generate` does) and record every
    cross-attention layer's attention to ``word`` (or only the ``layers`` named, e.g. ``["unet.mid.0"]``).
    Apply an edit around the call (``with edit.apply(pipe):``) to see what an erasure changed."""
    if not isinstance(prompt, str):
        raise TypeError("attention_maps takes one prompt (a string); call it once per prompt")
    positions = word_positions(pipe, prompt, word)
    with recording(pipe, positions, layers) as sums:
        image = generate(pipe, [prompt], seed, steps=steps, guidance=guidance)[0]
    maps = _upsampled(sums, _latent_of(pipe, image), (image.height, image.width))
    order = [name for name in cross_attention_layers(pipe) if name in maps]
    return AttentionMaps(prompt, word, positions, image, {name: maps[name] for name in order}, seed)


def compare_table(maps: dict[str, AttentionMaps]) -> pd.DataFrame:
    """:meth:`AttentionMaps.table` of several maps (e.g. ``{"before": ..., "after rece": ...}``) in one table."""
    return pd.concat([m.table().assign(model=name) for name, m in maps.items()],
                     ignore_index=True)[["model", "layer", "mean", "share"]]
