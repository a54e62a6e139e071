"""Cross-attention maps (the DAAM idea): where in the image each layer where text meets image looks for a word.

While the pipeline draws one image, an attention processor installed on every such layer records the
softmax attention of each image position to the word's tokens (summed over the word's tokens,
averaged over heads and denoising steps, conditional branch of guidance only). Each layer's map is
upsampled bilinearly to the image; their sum is the word's overall map. The image itself is drawn by
the layers' own processors (the recorder computes the probabilities beside them, in float32), so it
is exactly the image :func:`workbench.sampling.generate` draws; on exit every processor is put back,
the same objects.

In a UNet the layers are the cross-attentions (attn2, ``unet.mid.0``...). A transformer (FLUX, SD 3)
has no cross-attention: image and text tokens attend jointly, in each double block's attention
(``dit.{i}``) and, on FLUX, each single block's (``dit.single.{j}``). There the recorder computes the
softmax over all keys (text and image) as the block's processor does (query/key norms, FLUX's rotary
embedding) and keeps the image-query, text-key block: the image positions' attention to the word's
rows (every run of rows that carries it, :func:`workbench.embed.word_positions`), on the grid of image
tokens (2 x 2 latent patches).

>>> import workbench
>>> pipe = workbench.load("toy")
>>> maps = attention_maps(pipe, "a red apple", "apple", steps=4)
>>> list(maps.layers)[:3], maps.total.shape
(['unet.down.1.0', 'unet.down.2.0', 'unet.mid.0'], (32, 32))
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from .anatomy import as_list, parts
from .embed import word_positions
from .families import family_of
from .hooks import hooked, processors
from .sampling import GUIDANCE, STEPS, generate


def cross_attention_layers(pipe) -> dict[str, torch.nn.Module]:
    """Every layer where text meets image by its anatomy name, in network order: a UNet's cross-attention
    layers (``"unet.mid.0"``), a transformer's joint attentions (``"dit.0"``, ``"dit.single.0"``)."""
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


def _projections(attn, x: torch.Tensor, added: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys ``[n, tokens, heads, head width]`` of the image stream (``added``: the text
    stream's ``add_*_proj``), through the layer's query/key norms, as its joint processor makes them."""
    if getattr(attn, "fused_projections", False):
        q, k, _ = (attn.to_added_qkv if added else attn.to_qkv)(x).chunk(3, dim=-1)
    elif added:
        q, k = attn.add_q_proj(x), attn.add_k_proj(x)
    else:
        q, k = attn.to_q(x), attn.to_k(x)
    width = q.shape[-1] // attn.heads
    q, k = q.unflatten(-1, (-1, width)), k.unflatten(-1, (-1, width))
    norm_q, norm_k = ((getattr(attn, "norm_added_q", None), getattr(attn, "norm_added_k", None)) if added
                      else (getattr(attn, "norm_q", None), getattr(attn, "norm_k", None)))
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k))


class _JointRecorder:
    """The recorder of a transformer's joint attention (``dit.{i}``: image and text streams given apart)
    or single-stream attention (``dit.single.{j}``: one sequence, the text rows first, their count in
    ``text["rows"]``): runs the layer's own processor and adds the attention of the last batch row's
    image queries to the word's text keys, softmax over every key, to ``sums``; it skips the calls that
    ``text["conditional"]`` marks as an unconditional branch run apart."""

    def __init__(self, inner, name: str, positions: list[int], sums: dict[str, torch.Tensor],
                 text: dict[str, int]) -> None:
        self.inner, self.name, self.positions, self.sums, self.text = inner, name, positions, sums, text

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 **kwargs):
        rope = () if image_rotary_emb is None else (image_rotary_emb,)
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *rope, **kwargs)
        if not self.text.get("conditional", True):
            return out
        with torch.no_grad():
            context = None if encoder_hidden_states is None else encoder_hidden_states[-1:]
            self._record(attn, hidden_states[-1:], context, image_rotary_emb)
        return out

    def _record(self, attn, h: torch.Tensor, context: torch.Tensor | None, rope) -> None:
        q, k = _projections(attn, h)
        if context is None:
            text = self.text["rows"]
        else:  # FLUX's processor puts the text first (its rotary table is laid out so); SD 3 has none, and
            # a softmax over keys does not depend on their order
            text = context.shape[1]
            cq, ck = _projections(attn, context, added=True)
            q, k = torch.cat([cq, q], dim=1), torch.cat([ck, k], dim=1)
        if rope is not None:
            q, k = _rotary(q, rope), _rotary(k, rope)
        q, k = q[:, text:].float().transpose(1, 2), k.float().transpose(1, 2)  # [1, heads, tokens, width]
        probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)[0]  # [heads, image, text + image]
        word = probs[:, :, self.positions].sum(-1).mean(0).cpu()
        self.sums[self.name] = self.sums.get(self.name, 0) + word
        self.sums[f"{self.name}#steps"] = self.sums.get(f"{self.name}#steps", 0) + 1


def _rotary(x: torch.Tensor, rope) -> torch.Tensor:
    """FLUX's rotary position embedding on ``[n, tokens, heads, width]``, as its processor applies it."""
    from diffusers.models.embeddings import apply_rotary_emb
    return apply_rotary_emb(x, rope, sequence_dim=1)


@contextmanager
def recording(pipe, positions: list[int], layers: Sequence[str] | None = None,
              branches_apart: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Install recorders on the named layers where text meets image (default all); yields the dict they
    fill. ``branches_apart``: the sampler calls the denoiser twice per step, the conditional branch
    first; only those calls are recorded. On exit every layer gets back the very processor object it had."""
    sums: dict[str, torch.Tensor] = {}
    text: dict[str, Any] = {"conditional": True}

    def make(name: str, inner):
        if name.startswith("dit."):
            return _JointRecorder(inner, name, positions, sums, text)
        return _Recorder(inner, name, positions, sums)

    chosen = _chosen(pipe, layers)
    rows = []
    if any(name.startswith("dit.") for name in chosen):  # how many text rows lead a single block's sequence
        rows = [(parts(pipe)["dit.context.proj"], lambda module, inputs, output: text.update(rows=output.shape[1]))]
    if branches_apart:  # after each denoiser call the next one is the other branch
        rows.append((family_of(pipe).denoiser(pipe),
                     lambda module, inputs, output: text.update(conditional=not text["conditional"])))
    with hooked(rows), processors(chosen, make):
        yield sums


def _chosen(pipe, layers: Sequence[str] | None) -> dict[str, torch.nn.Module]:
    everything = cross_attention_layers(pipe)
    if layers is None:
        return everything
    wanted = as_list(layers)
    missing = [x for x in wanted if x not in everything]
    if missing:
        raise ValueError(f"{', '.join(map(repr, missing))} is not a layer where text meets image in this model; "
                         f"its layers: {', '.join(everything)}")
    return {name: everything[name] for name in wanted}


@dataclass
class AttentionMaps:
    """One image and, per layer where text meets image, the attention to a word, upsampled to the image."""

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
    layer's attention to ``word`` (or only the ``layers`` named, e.g. ``["unet.mid.0"]`` or
    ``["dit.0", "dit.single.1"]``). Apply an edit around the call (``with edit.apply(pipe):``) to see
    what an erasure changed."""
    if not isinstance(prompt, str):
        raise TypeError("attention_maps takes one prompt (a string); call it once per prompt")
    positions = word_positions(pipe, prompt, word)
    with recording(pipe, positions, layers, family_of(pipe).branches_apart(pipe, guidance)) as sums:
        image = generate(pipe, [prompt], seed, steps=steps, guidance=guidance)[0]
    maps = _upsampled(sums, _latent_of(pipe, image), (image.height, image.width))
    order = [name for name in cross_attention_layers(pipe) if name in maps]
    return AttentionMaps(prompt, word, positions, image, {name: maps[name] for name in order}, seed)


def compare_table(maps: dict[str, AttentionMaps]) -> pd.DataFrame:
    """:meth:`AttentionMaps.table` of several maps (e.g. ``{"before": ..., "after rece": ...}``) in one table."""
    return pd.concat([m.table().assign(model=name) for name, m in maps.items()],
                     ignore_index=True)[["model", "layer", "mean", "share"]]
