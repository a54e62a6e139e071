"""Prompt embeddings: the text encoder's per-token output at any layer, pooled vectors in any space, and
the text-encoder lens (images generated from an intermediate layer's output).

A *space* names where a prompt's vector lives (``spaces(pipe)`` lists them):

==============================  ================================================================
``"text"``                      the token rows the pipeline conditions on (SDXL: both encoders' side
                                by side; FLUX: T5's; SD 3: the CLIP rows, then T5's)
``"text.{i}"``                  the output of text-encoder layer i (``text.{i}`` in ``anatomy``),
                                made conditioning-ready (through CLIP's final layer norm);
                                ``text2.{i}``, ``text3.{i}`` in the other encoders (T5 on FLUX, SD 3)
``"unet.{block}.xattn.{k,v}"``  a UNet cross-attention layer's key or value space: ``W c`` for the
                                prompt's token rows c, with the layer's current weights
``"dit.context.proj"``          a transformer's context embedder, which projects the token rows into
                                it: ``W c + b``
==============================  ================================================================

Every matrix that reads the token rows themselves is a space (``text_entries`` of the family whose
input is ``"tokens"``); a transformer block's text keys and values (``dit.{i}.text.k``) are not: they
read the block's own text stream, which the timestep and every earlier block have changed.

A vector is the mean of token rows: over the prompt's real tokens (``pool="mean"``; special tokens
included, padding not) or over the concept word's own tokens (``pool="concept"``).

>>> import workbench
>>> from workbench.embed import embed, encode
>>> pipe = workbench.load("toy")
>>> encode(pipe, ["a red apple", "a car"]).shape
torch.Size([2, 20, 384])
>>> encode(pipe, "a car", layer=2).shape
torch.Size([1, 20, 384])
>>> embed(pipe, ["apple", "car"], space="unet.mid.0.xattn.k").shape
(2, 128)
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .anatomy import as_list, middle_layer, n_text_layers, parts, text_encoders
from .edits import applied
from .families import Conditioning, family_of
from .sampling import GUIDANCE, STEPS, seeded

POOLS = ("mean", "concept")
_CACHE_SIZE = 32
_cache: weakref.WeakKeyDictionary[object, OrderedDict] = weakref.WeakKeyDictionary()


def _tokenize(pipe, prompts: list[str], padding: str = "max_length",
              encoder: str = "text") -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and the real-token mask, truncated as the pipeline does; padded to the pipeline's
    length, or (``padding="longest"``) only as far as the longest prompt."""
    return family_of(pipe).tokenize(pipe, prompts, padding, encoder)


@torch.no_grad()
def _states(pipe, ids: torch.Tensor, mask: torch.Tensor, layer: int | None,
            device: torch.device | str = "cpu", encoder: str = "text") -> torch.Tensor:
    """``[layers + 1, n, tokens, width]`` (``layer=None``) or layer ``{encoder}.{layer}``'s
    ``[n, tokens, width]``, conditioning-ready, float32 on ``device``."""
    states = family_of(pipe).hidden_states(pipe, ids, mask, encoder)
    return (torch.stack(states) if layer is None else states[layer + 1]).to(device, torch.float32)


def hidden_states(pipe, prompts: str | Sequence[str], batch: int = 256, encoder: str = "text") -> torch.Tensor:
    """``[layers + 1, n_prompts, tokens, width]``: index 0 is the token embeddings entering layer 0,
    index ``i + 1`` the output of layer ``{encoder}.{i}``; every entry conditioning-ready, float32 on the CPU."""
    prompts = as_list(prompts)
    if not prompts:
        raise ValueError("no prompts given: pass a prompt or a list of prompts")
    return torch.cat([_states(pipe, *_tokenize(pipe, prompts[i:i + batch], encoder=encoder), None, encoder=encoder)
                      for i in range(0, len(prompts), batch)], dim=1)


def _layer_index(pipe, layer: int, encoder: str = "text") -> int:
    n = n_text_layers(pipe, encoder)
    if not -n <= layer < n:
        raise ValueError(f"layer {layer} does not exist: this text encoder has {n} layers, "
                         f"give 0..{n - 1} (or -1 for the last)")
    return layer % n


@torch.no_grad()
def encode(pipe, prompts: str | Sequence[str], batch: int = 256, layer: int | None = None,
           device: torch.device | str | None = "cpu") -> torch.Tensor:
    """``[n_prompts, tokens, width]`` text-encoder output, float32 on ``device`` (``None``: the text
    encoder's own, so nothing leaves the GPU); one pass per batch.

    ``layer=None`` is what the pipeline conditions on; ``layer=i`` is the output of layer ``text.{i}``
    (negative counts from the end, so ``-1`` equals ``None``), conditioning-ready.
    """
    prompts = as_list(prompts)
    if layer is not None:
        index = _layer_index(pipe, layer)
        where = family_of(pipe).encoders(pipe)["text"].device if device is None else device
        out = [_states(pipe, *_tokenize(pipe, prompts[i:i + batch]), index, where)
               for i in range(0, len(prompts), batch)]
        return torch.cat(out) if out else torch.empty(0)
    return conditioning(pipe, prompts, batch, device).tokens


@torch.no_grad()
def conditioning(pipe, prompts: str | Sequence[str], batch: int = 256,
                 device: torch.device | str | None = "cpu") -> Conditioning:
    """What the pipeline conditions on for ``prompts``: the token rows (as :func:`encode` gives them) and,
    for a family that has one (SDXL), the pooled embedding; float32 on ``device`` (``None``: where the
    text encoder made them).

    >>> import workbench
    >>> conditioning(workbench.load("toy"), ["an apple"]).pooled is None
    True
    """
    prompts = as_list(prompts)
    family = family_of(pipe)
    out = [family.encode(pipe, prompts[i:i + batch]) for i in range(0, len(prompts), batch)]
    if not out:
        return Conditioning(torch.empty(0))
    made = out[0] if len(out) == 1 else Conditioning.cat(out)
    return made.to(made.tokens.device if device is None else torch.device(device), torch.float32)


def _row_encoder(pipe, encoder: str | None) -> str:
    """``encoder``, or the encoder whose tokenizer made the conditioning's first token rows (T5 on FLUX)."""
    return family_of(pipe).row_segments(pipe)[0][0] if encoder is None else encoder


def row_encoder(pipe) -> str:
    """The text encoder that makes the conditioning's (first) token rows, the one :func:`lens` draws from:
    ``"text"``, or ``"text2"`` on FLUX (T5's slot; its ``"text"``, CLIP's, makes only the pooled vector).

    >>> import workbench
    >>> row_encoder(workbench.load("toy")), row_encoder(workbench.load("toy-dit"))
    ('text', 'text2')
    """
    return _row_encoder(pipe, None)


def last_word(pipe, prompts: str | Sequence[str], encoder: str | None = None) -> list[int]:
    """Position of the first token of each prompt's last word (after the start token, if the tokenizer
    has one); the first position for an empty prompt. A word the tokenizer splits keeps all its pieces.
    ``encoder``: whose tokenizer (default: the one that made the conditioning's first rows).

    >>> import workbench
    >>> last_word(workbench.load("toy"), ["", "apple", "a photo of an apple", "a painting by mondrian"])
    [0, 1, 5, 4]
    """
    prompts = as_list(prompts)
    _, masks = _tokenize(pipe, prompts + [" ".join(text.split()[:-1]) for text in prompts],
                         encoder=_row_encoder(pipe, encoder))
    mask, prefix_mask = masks[:len(prompts)], masks[len(prompts):]
    # with a start token (CLIP, BERT) the prefix's tokens sit at 1..P; without one (T5) at 0..P-1; either
    # way the mask counts one special token more than the position after the prefix
    last = (mask.sum(1) - 2).clamp(min=0)
    first = (prefix_mask.sum(1) - 1).clamp(min=0).minimum(last)
    return [f if text.split() else 0 for f, text in zip(first.tolist(), prompts)]


def concept_spans(pipe, prompts: str | Sequence[str]) -> list[list[tuple[int, int]]]:
    """For each prompt, the runs of token rows ``(start, stop)`` that carry its concept: from its last
    word to the end of each run of rows one tokenizer made (one run on SD, SDXL and FLUX; CLIP's and
    T5's on SD 3).

    >>> import workbench
    >>> concept_spans(workbench.load("toy"), ["a photo of an apple"])
    [[(5, 20)]]
    """
    prompts = as_list(prompts)
    family = family_of(pipe)
    segments = family.row_segments(pipe)
    per = []
    for i, (encoder, offset) in enumerate(segments):
        width = _tokenize(pipe, [""], encoder=encoder)[0].shape[1]
        stop = segments[i + 1][1] if i + 1 < len(segments) else offset + width
        per.append([(offset + a, stop) for a in last_word(pipe, prompts, encoder)])
    return [list(spans) for spans in zip(*per)]


def occurrence(tokens: Sequence[int], word: Sequence[int]) -> list[int]:
    """The positions of the last occurrence of the token run ``word`` in ``tokens`` (empty if none).

    >>> occurrence([1, 5, 6, 2, 5, 6], [5, 6])
    [4, 5]
    """
    starts = [i for i in range(len(tokens) - len(word) + 1) if word and list(tokens[i:i + len(word)]) == list(word)]
    return list(range(starts[-1], starts[-1] + len(word))) if starts else []


def word_tokens(pipe, word: str, encoder: str | None = None) -> list[int]:
    """``word``'s own tokens (no special tokens) under the tokenizer of ``encoder`` (default: the one that
    made the conditioning's first rows)."""
    tok = family_of(pipe).tokenizer(pipe, _row_encoder(pipe, encoder))
    return [t for t in tok(word, add_special_tokens=False).input_ids if t not in tok.all_special_ids]


def word_positions(pipe, prompt: str, word: str) -> list[int]:
    """The conditioning rows of ``word`` (all its pieces; its last occurrence) in ``prompt`` as the
    pipeline tokenizes it, in every run of rows (CLIP's and T5's on SD 3); an error listing the prompt's
    words when it is not there.

    >>> import workbench
    >>> word_positions(workbench.load("toy"), "a painting by mondrian", "mondrian")
    [4, 5, 6]
    """
    positions = []
    for encoder, offset in family_of(pipe).row_segments(pipe):
        ids, _ = _tokenize(pipe, [prompt], encoder=encoder)
        found = occurrence(ids[0].tolist(), word_tokens(pipe, word, encoder))
        if not found:
            limit = family_of(pipe).tokenizer(pipe, encoder).model_max_length
            raise ValueError(f"the word {word!r} is not in the prompt {prompt!r} (or was cut off at the tokenizer's "
                             f"{limit} tokens); words of the prompt: {', '.join(prompt.split())}")
        positions += [offset + p for p in found]
    return positions


def check_prompt(pipe, text: str) -> None:
    """Raise ``ValueError`` if ``text`` tokenizes to nothing (only special tokens)."""
    ids = family_of(pipe).tokenizer(pipe)(text, add_special_tokens=False).input_ids
    if not text.strip() or not ids:
        raise ValueError(
            f"the concept {text!r} tokenizes to nothing for this model's tokenizer; give a word or phrase "
            "such as 'apple' or 'van gogh'"
        )


def _projections(pipe) -> list[str]:
    """The matrices that read the conditioning's token rows (UNet cross-attention k/v, a context embedder)."""
    return [n for n, reads in family_of(pipe).text_entries(pipe).items() if reads == "tokens"]


def spaces(pipe) -> list[str]:
    """Every space name ``embed`` accepts for ``pipe``: ``text``, each encoder's layers, then every
    matrix that reads the token rows.

    >>> import workbench
    >>> spaces(workbench.load("toy"))[:3], spaces(workbench.load("toy"))[-1]
    (['text', 'text.0', 'text.1'], 'unet.up.1.1.xattn.v')
    """
    layers = [f"{e}.{i}" for e in text_encoders(pipe) for i in range(n_text_layers(pipe, e))]
    return ["text", *layers, *_projections(pipe)]


def key_space(pipe) -> str:
    """A key space where an edit of the denoiser's text inputs shows: the middle cross-attention layer's
    keys (:func:`workbench.anatomy.middle_layer`) when they read the token rows, else the first matrix that
    reads them (a transformer's context embedder: its blocks' keys read their own text streams).

    >>> import workbench
    >>> key_space(workbench.load("toy")), key_space(workbench.load("toy-dit"))
    ('unet.mid.0.xattn.k', 'dit.context.proj')
    """
    projections = _projections(pipe)
    middle = middle_layer(pipe)
    return next((s for s in projections if s.startswith(middle + ".") and s.endswith(".k")), projections[0])


def _check_space(pipe, space: str) -> None:
    valid = spaces(pipe)
    if space in valid:
        return
    reads = family_of(pipe).text_entries(pipe).get(space)
    if reads is not None:
        what = "the pooled text vector" if reads == "pooled" else f"block {reads.rsplit('.', 1)[0]}'s own text stream"
        raise ValueError(f"{space!r} is not a landing space: its inputs are {what}, not the conditioning's token "
                         f"rows. Spaces of this model: {', '.join(valid)}")
    raise ValueError(f"unknown space {space!r}. Spaces of this model: {', '.join(valid)}")


def _check_pool(pool: str) -> None:
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}: use 'mean' (all real tokens) or 'concept' (the word's own tokens)")


#: Token ids and real-token mask ``[n, tokens]`` of one run of rows, and the encoder whose tokenizer made them.
Segment = tuple[str, torch.Tensor, torch.Tensor]


def _weights(pipe, segments: Sequence[Segment], prompts: list[str], pool: str,
             words: list[str] | None) -> torch.Tensor:
    """``[n, tokens]`` pooling weights (rows sum to 1) over each prompt's token positions, across the
    runs of rows ``segments`` (one per tokenizer, side by side: CLIP's then T5's on SD 3)."""
    if pool == "mean":
        w = torch.cat([mask for _, _, mask in segments], dim=1).float()
        return w / w.sum(1, keepdim=True)
    w = torch.zeros((len(prompts), sum(ids.shape[1] for _, ids, _ in segments)), dtype=torch.float32)
    for row, (prompt, word) in enumerate(zip(prompts, words or prompts)):
        hits, offset = [], 0
        for encoder, ids, mask in segments:
            real = [int(t) for t, m in zip(ids[row], mask[row]) if m]
            if word is prompt or word == prompt:
                special = set(family_of(pipe).tokenizer(pipe, encoder).all_special_ids)
                found = [j for j, t in enumerate(real) if t not in special]
            else:
                found = occurrence(real, word_tokens(pipe, word, encoder))
            hits += [offset + j for j in found]
            offset += ids.shape[1]
        if not hits:
            raise ValueError(f"the word {word!r} has no tokens of its own in the prompt {prompt!r} (empty, or cut "
                             "off by the tokenizer's length limit); use pool='mean' or a shorter prompt")
        w[row, hits] = 1.0 / len(hits)
    return w


@torch.no_grad()
def _to_space(pipe, pooled: torch.Tensor, space: str) -> torch.Tensor:
    if space not in _projections(pipe):
        return pooled
    linear = parts(pipe)[space]
    # the pooling weights sum to one, so projecting the pooled row equals pooling the projected rows
    # W c + b (a bias included)
    return linear(pooled.to(linear.weight.device, linear.weight.dtype)).float().cpu()


def _row_segments(pipe, prompts: list[str], rows: int) -> list[Segment]:
    """The runs of the conditioning's ``rows`` token rows, tokenized as the pipeline does; rows no
    tokenizer made (SD 3's T5 rows without T5: zeros) are padding."""
    segments = [(e, *_tokenize(pipe, prompts, encoder=e)) for e, _ in family_of(pipe).row_segments(pipe)]
    short = rows - sum(ids.shape[1] for _, ids, _ in segments)
    if short > 0:
        segments.append((segments[-1][0], torch.zeros((len(prompts), short), dtype=torch.long),
                         torch.zeros((len(prompts), short), dtype=torch.long)))
    return segments


def _rows(pipe, prompts: list[str], space: str) -> tuple[list[Segment], torch.Tensor]:
    """The runs of token ids and masks, and the token rows of ``space`` (before any projection)."""
    family = family_of(pipe)
    encoders = text_encoders(pipe)
    if len(encoders) > 1 and (space == "text" or space in _projections(pipe)):  # the conditioning's rows
        ids = {e: _tokenize(pipe, prompts, encoder=e) for e in encoders}
        with torch.no_grad():
            rows = family.conditioning(pipe, ids).tokens.float().cpu()
        return _row_segments(pipe, prompts, rows.shape[1]), rows
    encoder, _, layer = space.partition(".") if space.split(".")[0] in encoders else ("text", "", "")
    layer = int(layer) if layer.isdigit() else n_text_layers(pipe, encoder) - 1
    # pooled rows ignore padding, so pad only to the longest prompt when the encoder cannot see padding
    padding = "longest" if family.padding_is_invisible(pipe, encoder) else "max_length"
    ids, mask = _tokenize(pipe, prompts, padding, encoder)
    return [(encoder, ids, mask)], _states(pipe, ids, mask, layer, encoder=encoder)


def _key(pipe, *rest) -> tuple:
    return (tuple(id(e) for e in applied(pipe)), *rest)


def embed(pipe, words: str | Sequence[str], space: str = "text", pool: str = "mean",
          template: str = "{}", batch: int = 256) -> np.ndarray:
    """``[n_words, width]`` float32 vectors of ``template.format(word)`` in ``space`` (see the module doc).

    Results are cached in memory per pipeline, keyed by the edits applied to it (``Edit.apply``), the
    space, pool, template and words; the returned array is read-only. Weights changed in place by other
    means are not noticed: call :func:`clear_cache` after such a change.
    """
    words = as_list(words)
    if not words:
        raise ValueError("no words given: pass a word or a list of words")
    _check_space(pipe, space)
    _check_pool(pool)
    if "{}" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' where the word goes, e.g. 'a photo of {{}}'")
    key = _key(pipe, space, pool, template, tuple(words))
    store = _cache.setdefault(pipe, OrderedDict())
    if key in store:
        store.move_to_end(key)
        return store[key][1]
    prompts = [template.format(w) for w in words]
    vectors = []
    for i in range(0, len(prompts), batch):
        segments, rows = _rows(pipe, prompts[i:i + batch], space)
        w = _weights(pipe, segments, prompts[i:i + batch], pool, words[i:i + batch] if template != "{}" else None)
        vectors.append(torch.einsum("nt,ntd->nd", w, rows))
    out = _to_space(pipe, torch.cat(vectors), space).numpy().astype(np.float32)
    out.flags.writeable = False
    store[key] = (applied(pipe), out)  # holding the edits keeps their ids unique while the entry lives
    while len(store) > _CACHE_SIZE:
        store.popitem(last=False)
    return out


def embed_rows(pipe, rows: torch.Tensor, prompts: str | Sequence[str], space: str = "text",
               pool: str = "mean") -> np.ndarray:
    """Pool token rows given in the conditioning's space (e.g. RECE's derived embeddings, ``[tokens,
    width]`` or ``[n, tokens, width]``, one full token sequence per prompt) into ``space``.

    ``prompts`` are the prompts the rows stand for; their tokenization says which positions are real.
    Projection spaces (``unet.*.xattn.k``, ``dit.context.proj``) project with the current weights.
    Intermediate ``text.{i}`` spaces are refused: the rows live in the output space, not in layer i's.
    """
    prompts = as_list(prompts)
    _check_space(pipe, space)
    _check_pool(pool)
    last = f"text.{n_text_layers(pipe) - 1}" if len(text_encoders(pipe)) == 1 else "text"
    if space.startswith("text") and space not in ("text", last):
        raise ValueError(f"rows in the text encoder's output space cannot be placed in {space!r}; use 'text', "
                         f"{last!r} or a projection space such as {spaces(pipe)[-1]!r}")
    rows = rows.detach().float().cpu()
    rows = rows.unsqueeze(0) if rows.dim() == 2 else rows
    if rows.dim() != 3 or len(rows) != len(prompts):
        raise ValueError(f"rows of shape {tuple(rows.shape)} do not match {len(prompts)} prompt(s): give "
                         "[tokens, width] for one prompt or [n, tokens, width] for n prompts")
    length = family_of(pipe).empty(pipe).tokens.shape[1] if len(text_encoders(pipe)) > 1 else 0
    w = _weights(pipe, _row_segments(pipe, prompts, length), prompts, pool, None)
    if w.shape[1] != rows.shape[1]:
        raise ValueError(f"rows have {rows.shape[1]} token positions, this model's prompts have {w.shape[1]}")
    return _to_space(pipe, torch.einsum("nt,ntd->nd", w, rows), space).numpy().astype(np.float32)


def clear_cache(pipe=None) -> None:
    """Forget cached embeddings of ``pipe`` (of every pipeline when None)."""
    if pipe is None:
        _cache.clear()
    else:
        _cache.pop(pipe, None)


@torch.no_grad()
def lens(pipe, prompt: str, layers: Sequence[int] | None = None, seed: int = 0, steps: int = STEPS,
         guidance: float = GUIDANCE, batch: int = 8) -> list[Image.Image]:
    """The text-encoder lens: one image per layer, generated from that layer's output of ``prompt``
    (Diffusion Lens; CLIP's states go through its final layer norm, BERT's are used as they are).

    Every image starts from the same noise, ``workbench.seeded(seed)`` as a plain ``pipe(prompt)`` call
    draws it, so the last layer's image is the pipeline's own. The unconditional embedding for
    guidance is the empty prompt at the same layer. ``layers`` defaults to every layer; apply an edit
    (``with edit.apply(pipe):``) to see where an erasure takes hold. Show them with
    ``plots.image_grid([before, after], ["before", "after"], [f"layer {i}" for i in layers])``.

    The layers are those of the encoder that makes the token rows (:func:`row_encoder`); a pooled vector
    (FLUX's, from its other encoder) is kept as the prompt's own. A model that conditions on several
    encoders' rows side by side (SDXL, SD 3) is refused.

    >>> import workbench
    >>> len(lens(workbench.load("toy-dit"), "an apple", layers=[0, -1], steps=2))
    2
    """
    if not isinstance(prompt, str):
        raise TypeError("lens takes one prompt (a string); call it once per prompt")
    family = family_of(pipe)
    encoder = row_encoder(pipe)
    n = n_text_layers(pipe, encoder)
    layers = list(range(n)) if layers is None else [_layer_index(pipe, i, encoder) for i in layers]
    states = hidden_states(pipe, [prompt, ""], encoder=encoder)  # [layers + 1, 2, tokens, width]
    own = conditioning(pipe, [prompt, ""]) if len(text_encoders(pipe)) > 1 else None
    pooled = None if own is None else own.pooled
    if own is not None and states.shape[2:] != own.tokens.shape[1:]:
        raise ValueError("the text-encoder lens draws from one encoder's layer outputs, and this model conditions "
                         f"on {len(text_encoders(pipe))} encoders' states side by side; use it on SD 1.x/2.x, FLUX or "
                         "the toy models, or trace the encoders' layers with workbench.tracing.trace")
    states = states[[i + 1 for i in layers]]
    noise = family.noise(pipe, seeded(seed))
    images: list[Image.Image] = []
    for i in range(0, len(layers), batch):
        chunk = states[i:i + batch]
        cond, empty = Conditioning(chunk[:, 0]), Conditioning(chunk[:, 1])
        if pooled is not None:
            cond.pooled, empty.pooled = pooled[:1].expand(len(chunk), -1), pooled[1:].expand(len(chunk), -1)
        images += family.draw(pipe, cond, empty, steps, guidance,
                              latents=noise.expand(len(chunk), -1, -1, -1).clone(), size=family.image_size(pipe))
    return images
