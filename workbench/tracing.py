"""Causal tracing (Basu et al., ICLR 2024): which layers carry a concept from the prompt to the image.

Three runs of the same prompt and seeds: *clean*; *corrupted*, with Gaussian noise (``noise`` times
the input embeddings' standard deviation, one draw per image) added to the concept's token embeddings
as they enter the text encoder; and *restored*, the corrupted run with one site's clean state put back:

- a text-encoder layer ``text.{i}``: its output at the concept's token positions (or, for the
  per-token heatmap, at one token position);
- a UNet block ``unet.down.{b}``, ``unet.mid`` or ``unet.up.{b}``: its whole output (with the
  skip connections a down block hands on), at every denoising step, from the clean run drawn in the
  same batch from the same noise;
- a transformer block (FLUX, SD 3) ``dit.{i}`` or ``dit.single.{j}``: both streams it hands on, the
  text tokens' and the image tokens', the same way; ``dit.{i}.img`` or ``dit.{i}.text`` restores one
  stream only (listed by ``sites(pipe, streams=True)``; the last block has no text stream to restore:
  nothing reads it).

The concept's tokens are corrupted in every text encoder, each at the word's own tokens in its own
tokenization (on FLUX the CLIP encoder that makes the pooled vector and T5 that makes the token rows).

The judge scores each run by its probability that the images show the concept; a site's *causal
effect* is how much of it restoring the site brings back: P(restored) - P(corrupted). Nothing on the
pipeline changes: every hook is removed on exit, weights are never touched.

>>> import workbench
>>> pipe = workbench.load("toy")
>>> sites(pipe)[:2], sites(pipe)[-1]
(['text.0', 'text.1'], 'unet.up.2')
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import pandas as pd
import torch
from PIL import Image

from .anatomy import as_list, text_encoders, text_layers
from .concepts import ConceptSet
from .embed import occurrence, word_positions, word_tokens
from .families import Conditioning, family_of
from .hooks import hooked, on_states
from .judges import Judge
from .profile import profile_of
from .sampling import BATCH, GUIDANCE, STEPS, seeded

#: Noise on the concept's token embeddings, in standard deviations of the input embedding table.
NOISE = 3.0


#: A transformer block's output streams, by the suffix of the site that restores one alone; both blocks of
#: FLUX and SD 3's joint block return ``(text stream, image stream)``.
STREAMS = {"text": 0, "img": 1}


def unet_blocks(pipe) -> dict[str, torch.nn.Module]:
    """The denoiser's blocks by name, in the order data flows: ``unet.down.{b}``, ``unet.mid``, ``unet.up.{b}``
    in a UNet, ``dit.{i}`` then ``dit.single.{j}`` in a transformer."""
    return family_of(pipe).blocks(pipe)


def _block_sites(pipe, streams: bool) -> dict[str, tuple[str, tuple[int, ...] | None]]:
    """Each block site: ``(block, the output streams it restores)``; ``None``: the whole output."""
    blocks = list(unet_blocks(pipe))
    out: dict[str, tuple[str, tuple[int, ...] | None]] = {}
    for k, name in enumerate(blocks):
        dit = name.startswith("dit.")
        out[name] = (name, tuple(STREAMS.values()) if dit else None)
        if dit and streams:
            out[f"{name}.img"] = (name, (STREAMS["img"],))
            if k < len(blocks) - 1:
                out[f"{name}.text"] = (name, (STREAMS["text"],))
    return out


def text_sites(pipe) -> list[str]:
    """The text-encoder sites of a trace: every encoder's layers, in order.

    >>> import workbench
    >>> text_sites(workbench.load("toy"))[-1], text_sites(workbench.load("toy-dit"))[-1]
    ('text.5', 'text2.5')
    """
    return [f"{e}.{i}" for e in text_encoders(pipe) for i in range(len(text_layers(pipe, e)))]


def sites(pipe, streams: bool = False) -> list[str]:
    """Every site a trace restores: each text encoder's layers (:func:`text_sites`), then the denoiser's
    blocks; with ``streams``, a transformer block's image and text streams alone too (``dit.0.img``,
    ``dit.0.text``)."""
    return text_sites(pipe) + list(_block_sites(pipe, streams))


def _site(name: str) -> tuple[str, int]:
    """``"text2.3"`` -> ``("text2", 3)``."""
    encoder, layer = name.rsplit(".", 1)
    return encoder, int(layer)


def encoder_positions(pipe, prompt: str, word: str) -> dict[str, list[int]]:
    """``word``'s tokens (its last occurrence) in ``prompt`` as each text encoder's tokenizer makes them.

    >>> import workbench
    >>> encoder_positions(workbench.load("toy"), "a painting by mondrian", "mondrian")
    {'text': [4, 5, 6]}
    """
    family = family_of(pipe)
    out = {}
    for e in text_encoders(pipe):
        ids, _ = family.tokenize(pipe, [prompt], encoder=e)
        out[e] = occurrence(ids[0].tolist(), word_tokens(pipe, word, e))
        if not out[e]:
            raise ValueError(f"the word {word!r} is not in the prompt {prompt!r} as {e}'s tokenizer cuts it (or was "
                             f"cut off at its {family.tokenizer(pipe, e).model_max_length} tokens)")
    return out


class Text:
    """The text encoders' conditioning of one prompt, clean, corrupted, or corrupted with one layer's
    clean state restored at some token positions; ``n`` rows, one noise draw each (per encoder, in
    the order of the encoders, from one generator). ``positions``: the concept's tokens, the same in
    every encoder's tokens (a list) or per encoder (``{encoder: positions}``, :func:`encoder_positions`)."""

    def __init__(self, pipe, prompt: str, positions: list[int] | dict[str, list[int]], n: int, noise: float,
                 seed: int) -> None:
        self.pipe, self.prompt, self.n = pipe, prompt, n
        self.family = family_of(pipe)
        self.layers = {e: text_layers(pipe, e) for e in text_encoders(pipe)}
        self.tables = {e: self.family.input_embeddings(pipe, e) for e in self.layers}
        self.positions = {e: list(positions[e] if isinstance(positions, dict) else positions) for e in self.layers}
        self.clean_states: dict[tuple[str, int], torch.Tensor] = {}
        with hooked([(layer, self._keep(e, i)) for e, layers in self.layers.items() for i, layer in enumerate(layers)]):
            self.clean = self._encode([prompt])
        g = seeded(seed)
        self.noise = {}
        for e, table in self.tables.items():
            std = float(table.weight.detach().float().std())
            width = table.weight.shape[1]
            at = self.positions[e]
            draw = torch.randn((n, len(at), width), generator=g) * noise * std
            tokens = self.clean_states[(e, 0)].shape[1]
            self.noise[e] = torch.zeros((n, tokens, width))
            self.noise[e][:, at] = draw

    def _keep(self, encoder: str, i: int) -> Callable:
        def keep(module, inputs, output):
            self.clean_states[(encoder, i)] = output[0] if isinstance(output, tuple) else output
        return keep

    def _encode(self, prompts: list[str]) -> Conditioning:
        return self.family.encode(self.pipe, prompts)

    def _corrupt(self, encoder: str) -> Callable:
        def corrupt(module, inputs, output):
            return output + self.noise[encoder].to(output.device, output.dtype)
        return corrupt

    def corrupted(self, site: str | None = None, positions: Sequence[int] | None = (),
                  encoders: Sequence[str] | None = None) -> Conditioning:
        """The corrupted conditioning (``n`` rows), with text-encoder layer ``site``'s (``"text.3"``)
        clean output restored at ``positions`` (of that encoder's tokens; ``None``: the concept's) when
        a site is given; only ``encoders``' inputs are corrupted when named (default every encoder's)."""
        pairs = [(table, self._corrupt(e)) for e, table in self.tables.items() if encoders is None or e in encoders]
        if site is not None:
            encoder, layer = _site(site)
            clean = self.clean_states[(encoder, layer)]
            at = self.positions[encoder] if positions is None else list(positions)

            def restore(module, inputs, output):
                def put(h: torch.Tensor) -> torch.Tensor:
                    h = h.clone()
                    h[:, at] = clean[:, at].to(h.dtype)
                    return h
                return on_states(output, put)
            pairs.append((self.layers[encoder][layer], restore))
        with hooked(pairs):
            return self._encode([self.prompt] * self.n)


def _block_restorer(rows: list[int], sources: list[int], half: int,
                    streams: tuple[int, ...] | None = None) -> Callable:
    """A forward hook that overwrites a block's output rows with the clean rows they stand for, in every
    copy of the ``half`` rows a call holds (both halves of a classifier-free-guidance batch, or one
    when the model samples in one pass). ``streams``: the items of a transformer block's output tuple
    to restore (``None``: a UNet block's whole output)."""

    def put(t: torch.Tensor) -> torch.Tensor:
        copies = range(max(1, len(t) // half))
        dst = torch.tensor([r + c * half for c in copies for r in rows], device=t.device)
        src = torch.tensor([s + c * half for c in copies for s in sources], device=t.device)
        t = t.clone()
        t[dst] = t[src]
        return t

    def hook(module, inputs, output):
        if streams is not None:
            return tuple(put(x) if k in streams and x is not None else x for k, x in enumerate(output))
        if isinstance(output, tuple):  # a down block: (hidden states, its skip connections)
            return (put(output[0]), tuple(put(s) for s in output[1]), *output[2:])
        return put(output)
    return hook


@dataclass
class Sampler:
    """Draws images from conditioning rows; row r starts from image ``r % n``'s noise (seeded ``seed + i``).
    ``size``: the images' side in pixels (the model's own when None)."""

    pipe: object
    n: int
    seed: int
    steps: int
    guidance: float
    size: int | None = None

    def __post_init__(self) -> None:
        family = self.family = family_of(self.pipe)
        native = family.image_size(self.pipe)
        self.size = self.size or native
        side = self.size * family.latent_shape(self.pipe)[1] // native
        self.noise = torch.cat([family.noise(self.pipe, seeded(self.seed + i), side) for i in range(self.n)])
        self.empty = family.empty(self.pipe)

    @torch.no_grad()
    def draw(self, embeds: Conditioning, hooks: Sequence[tuple[torch.nn.Module, Callable]] = ()) -> list[Image.Image]:
        rows = len(embeds)
        latents = self.noise[torch.arange(rows) % self.n]
        with hooked(hooks):
            return self.family.draw(self.pipe, embeds, self.empty.expand(rows), self.steps, self.guidance,
                                    latents=latents, size=self.size)


@dataclass
class Trace:
    """A causal trace of one concept in one prompt: the judge's probability of the concept on the clean
    and corrupted runs, and one row per restored site (``table``)."""

    concept: str
    prompt: str
    tokens: list[str]
    positions: list[int]
    clean: float
    corrupted: float
    table: pd.DataFrame
    n: int
    seed: int
    noise: float
    images: dict[str, list[Image.Image]] = field(default_factory=dict, repr=False)

    def layers(self) -> pd.DataFrame:
        """The text-encoder layers (restored at the concept's tokens) and UNet blocks, in network order."""
        return self.table[self.table["kind"] != "token"].reset_index(drop=True)

    def token_grid(self) -> pd.DataFrame:
        """Causal effect per text-encoder layer (rows) and token (columns, ``position:token``)."""
        rows = self.table[self.table["kind"] == "token"]
        if rows.empty:
            raise ValueError("this trace has no per-token rows: run trace(..., tokens=True)")
        grid = rows.assign(column=rows["position"].astype(str) + ":" + rows["token"])
        return grid.pivot_table(index="site", columns="column", values="effect", sort=False)


def probability(judge: Judge, images: list[Image.Image], labels: Sequence[str], concept: str, n: int) -> list[float]:
    """The judge's mean probability of ``concept`` over each consecutive group of ``n`` images."""
    probs = judge.classify(images, list(labels))[:, list(labels).index(concept)]
    return [float(probs[i:i + n].mean()) for i in range(0, len(images), n)]


def concept_setup(pipe, concept: str, prompt: str | None, judge: Judge | None,
                  concept_set: ConceptSet | None) -> tuple[str, Judge, tuple[str, ...]]:
    """``(prompt, judge, labels)`` of an analysis of ``concept``: the prompt given or the concept set's first
    probe prompt, the judge given or the profile's, and the labels the judge chooses among; ``ValueError``
    naming the concepts when ``concept`` is not one of them."""
    profile = profile_of(pipe)
    cs = concept_set if concept_set is not None else profile.concept_set()
    judge = judge if judge is not None else profile.judge()
    if concept not in cs:
        raise ValueError(f"{concept!r} is not in the concept set, so the judge has no label for it; "
                         f"concepts: {', '.join(cs.names)}")
    return (prompt if prompt is not None else cs.probe(concept, 1)[0]), judge, cs.labels(cs.kind(concept))


def trace(pipe, concept: str, prompt: str | None = None, judge: Judge | None = None, *,
          concept_set: ConceptSet | None = None, sites: Sequence[str] | None = None, n: int = 4, seed: int = 0,
          noise: float = NOISE, tokens: bool = False, steps: int = STEPS, guidance: float = GUIDANCE,
          batch: int = BATCH, size: int | None = None) -> Trace:
    """Trace ``concept`` in ``prompt`` (default: the concept set's first probe prompt, e.g. "an apple")
    over the ``sites`` (default every text-encoder layer and denoiser block, :func:`sites`; a
    transformer's single streams, ``"dit.0.img"``, when named), ``n`` images (seeds ``seed``,
    ``seed + 1``, ...) per run; with ``tokens``, also each text-encoder layer at each of its own
    tokens. ``judge`` and ``concept_set`` default to the model profile's; ``size`` is the images' side
    in pixels (the model's own by default). Apply an edit around the call to trace the erased model.
    Block rows are of kind ``"unet"`` or ``"dit"``."""
    prompt, judge, labels = concept_setup(pipe, concept, prompt, judge, concept_set)
    positions = word_positions(pipe, prompt, concept)
    chosen = _check(pipe, sites, n, noise)
    text = Text(pipe, prompt, encoder_positions(pipe, prompt, concept), n, noise, seed)
    sampler = Sampler(pipe, n, seed, steps, guidance, size)
    blocks = _block_sites(pipe, streams=True)
    layers = [s for s in chosen if s not in blocks]
    plan = [("clean", "", "", -1, text.clean.expand(n)), ("corrupted", "", "", -1, text.corrupted())]
    plan += [("text", site, "concept", -1, text.corrupted(site, None)) for site in layers]
    if tokens:
        for site in layers:
            names, real = _token_names(pipe, prompt, _site(site)[0])
            plan += [("token", site, names[p], p, text.corrupted(site, [p])) for p in real]
    scores, images = _text_runs(sampler, plan, judge, labels, concept, batch)
    restored = _unet_runs(pipe, sampler, text, [s for s in chosen if s in blocks], judge, labels, concept, batch)
    clean, corrupted = scores[0], scores[1]
    rows = [dict(kind=k, site=s, token=t, position=p, probability=v) for (k, s, t, p, _), v in zip(plan[2:], scores[2:])]
    rows += [dict(kind=s.split(".")[0], site=s, token="", position=-1, probability=v) for s, v in restored.items()]
    table = pd.DataFrame(rows).assign(effect=lambda d: d["probability"] - corrupted)
    names, real = _token_names(pipe, prompt, family_of(pipe).row_segments(pipe)[0][0])
    return Trace(concept, prompt, [names[p] for p in real], positions, clean, corrupted, table, n, seed, noise,
                 images)


def _check(pipe, chosen: Sequence[str] | None, n: int, noise: float) -> list[str]:
    """The sites to restore, in network order, after checking every argument."""
    valid = sites(pipe, streams=True)
    wanted = sites(pipe) if chosen is None else as_list(chosen)
    missing = [s for s in wanted if s not in valid]
    if missing:
        raise ValueError(f"{', '.join(map(repr, missing))}: no such site; a trace restores text-encoder layers "
                         f"and the denoiser's blocks: {', '.join(valid)}")
    if n < 1:
        raise ValueError(f"n (images per run) must be at least 1, not {n}")
    if not noise > 0:
        raise ValueError(f"noise must be positive (standard deviations of the embeddings), not {noise}")
    return [s for s in valid if s in wanted]


def _token_names(pipe, prompt: str, encoder: str = "text") -> tuple[list[str], list[int]]:
    """Every token of ``prompt`` as the pipeline pads it for ``encoder``, and the positions of the real ones."""
    family = family_of(pipe)
    ids, mask = family.tokenize(pipe, [prompt], encoder=encoder)
    return family.tokenizer(pipe, encoder).convert_ids_to_tokens(ids[0].tolist()), mask[0].nonzero()[:, 0].tolist()


def _text_runs(sampler: Sampler, plan: list, judge: Judge, labels, concept: str,
               batch: int) -> tuple[list[float], dict[str, list[Image.Image]]]:
    """The judge's score of each planned conditioning (``n`` images each), drawn ``batch`` rows at a time."""
    embeds = Conditioning.cat([p[4] for p in plan])
    step = max(sampler.n, batch // sampler.n * sampler.n)
    drawn: list[Image.Image] = []
    for i in range(0, len(embeds), step):
        drawn += sampler.draw(embeds[i:i + step])
    n = sampler.n
    return probability(judge, drawn, labels, concept, n), {"clean": drawn[:n], "corrupted": drawn[n:2 * n]}


def _unet_runs(pipe, sampler: Sampler, text: Text, names: list[str], judge: Judge, labels, concept: str,
               batch: int) -> dict[str, float]:
    """Per block site: the corrupted run with the block's output (or its streams) taken from a clean run
    drawn beside it."""
    n, blocks, where = sampler.n, unet_blocks(pipe), _block_sites(pipe, streams=True)
    per_call = max(1, batch // n - 1)
    clean, corrupted = text.clean.expand(n), text.corrupted()
    out: dict[str, float] = {}
    for start in range(0, len(names), per_call):
        chunk = names[start:start + per_call]
        embeds = Conditioning.cat([clean] + [corrupted] * len(chunk))
        half = len(embeds)
        hooks = [(blocks[where[name][0]], _block_restorer(list(range(n * (k + 1), n * (k + 2))), list(range(n)), half,
                                                          where[name][1]))
                 for k, name in enumerate(chunk)]
        images = sampler.draw(embeds, hooks)
        scores = probability(judge, images, labels, concept, n)
        out.update(zip(chunk, scores[1:]))
    return out


def encoder_effects(pipe, concept: str, prompt: str | None = None, judge: Judge | None = None, *,
                    concept_set: ConceptSet | None = None, n: int = 4, seed: int = 0, noise: float = NOISE,
                    steps: int = STEPS, guidance: float = GUIDANCE, batch: int = BATCH) -> pd.DataFrame:
    """Which text encoder carries ``concept``: the judge's probability of the concept when the concept's
    tokens are corrupted (as in :func:`trace`) in no encoder, in every encoder, and in each encoder alone
    (SDXL: ``text``, CLIP ViT-L; ``text2``, OpenCLIP bigG; FLUX: ``text``, CLIP, its pooled vector;
    ``text2``, T5, its token rows; SD 3: two CLIPs and T5, ``text3``). ``drop`` is the clean probability minus the
    corrupted one: an encoder whose corruption alone takes the concept away carries it.

    >>> import workbench
    >>> pipe = workbench.load("toy")
    >>> encoder_effects(pipe, "apple", n=1, steps=4)["corrupted"].tolist()
    ['none', 'all']
    """
    prompt, judge, labels = concept_setup(pipe, concept, prompt, judge, concept_set)
    _check(pipe, None, n, noise)
    text = Text(pipe, prompt, encoder_positions(pipe, prompt, concept), n, noise, seed)
    encoders = list(text.tables)
    plan = [("none", text.clean.expand(n)), ("all", text.corrupted())]
    if len(encoders) > 1:
        plan += [(e, text.corrupted(encoders=[e])) for e in encoders]
    sampler = Sampler(pipe, n, seed, steps, guidance)
    scores, _ = _text_runs(sampler, [("", "", "", -1, cond) for _, cond in plan], judge, labels, concept, batch)
    table = pd.DataFrame({"corrupted": [name for name, _ in plan], "probability": scores})
    return table.assign(drop=scores[0] - table["probability"], n=n, prompt=prompt)


def compare_table(traces: dict[str, Trace]) -> pd.DataFrame:
    """The layer and block rows of several traces (e.g. ``{"before": ..., "after rece": ...}``) in one
    table: model, site, probability, effect."""
    return pd.concat([t.layers().assign(model=name) for name, t in traces.items()],
                     ignore_index=True)[["model", "site", "probability", "effect"]]
