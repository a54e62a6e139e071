"""Causal tracing (Basu et al., ICLR 2024): which layers carry a concept from the prompt to the image.

Three runs of the same prompt and seeds: *clean*; *corrupted*, with Gaussian noise (``noise`` times
the input embeddings' standard deviation, one draw per image) added to the concept's token embeddings
as they enter the text encoder; and *restored*, the corrupted run with one site's clean state put back:

- a text-encoder layer ``text.{i}``: its output at the concept's token positions (or, for the
  per-token heatmap, at one token position);
- a UNet block ``unet.down.{b}``, ``unet.mid`` or ``unet.up.{b}``: its whole output (with the
  skip connections a down block hands on), at every denoising step, from the clean run drawn in the
  same batch from the same noise.

The judge scores each run by its probability that the images show the concept; a site's *causal
effect* is how much of it restoring the site brings back: P(restored) - P(corrupted). Nothing on the
pipeline changes: every hook is removed on exit, weights are never touched.

>>> import workbench
>>> pipe = workbench.load("toy")
>>> sites(pipe)[:2], sites(pipe)[-1]
(['text.0', 'text.1'], 'unet.up.2')
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import pandas as pd
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .anatomy import as_list, text_layers
from .attnmaps import word_positions
from .concepts import ConceptSet
from .judges import Judge
from .profile import profile_of
from .sampling import BATCH, GUIDANCE, STEPS, seeded

#: Noise on the concept's token embeddings, in standard deviations of the input embedding table.
NOISE = 3.0


def unet_blocks(pipe) -> dict[str, torch.nn.Module]:
    """The UNet's blocks by name, in the order data flows: ``unet.down.{b}``, ``unet.mid``, ``unet.up.{b}``."""
    unet = pipe.unet
    return {**{f"unet.down.{b}": m for b, m in enumerate(unet.down_blocks)}, "unet.mid": unet.mid_block,
            **{f"unet.up.{b}": m for b, m in enumerate(unet.up_blocks)}}


def sites(pipe) -> list[str]:
    """Every site a trace restores: the text-encoder layers, then the UNet blocks."""
    return [f"text.{i}" for i in range(len(text_layers(pipe)))] + list(unet_blocks(pipe))


@contextmanager
def _hooked(hooks: Sequence[tuple[torch.nn.Module, Callable]]) -> Iterator[None]:
    """Forward hooks (module, fn(module, inputs, output) -> output) for the duration of the block."""
    with ExitStack() as stack:
        for module, fn in hooks:
            stack.callback(module.register_forward_hook(fn).remove)
        yield


def _replace(output, fn: Callable[[torch.Tensor], torch.Tensor]):
    """``output`` with ``fn`` applied to its hidden states (a tensor, or the first item of a tuple)."""
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)


class _Text:
    """The text encoder's conditioning of one prompt, clean, corrupted, or corrupted with one layer's
    clean state restored at some token positions; ``n`` rows, one noise draw each."""

    def __init__(self, pipe, prompt: str, positions: list[int], n: int, noise: float, seed: int) -> None:
        self.pipe, self.prompt, self.n = pipe, prompt, n
        self.layers = text_layers(pipe)
        self.table = pipe.text_encoder.get_input_embeddings()
        self.clean_states: list[torch.Tensor] = []
        hooks = [(layer, self._keep) for layer in self.layers]
        with _hooked(hooks):
            self.clean = self._encode([prompt])
        std = float(self.table.weight.detach().float().std())
        width = self.table.weight.shape[1]
        g = seeded(seed)
        draw = torch.randn((n, len(positions), width), generator=g) * noise * std
        self.noise = torch.zeros((n, self.clean.shape[1], width))
        self.noise[:, positions] = draw

    def _keep(self, module, inputs, output):
        self.clean_states.append(output[0] if isinstance(output, tuple) else output)

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        device = self.pipe.text_encoder.device
        return self.pipe.encode_prompt(prompts, device, 1, do_classifier_free_guidance=False)[0]

    def _corrupt(self, module, inputs, output):
        return output + self.noise.to(output.device, output.dtype)

    def corrupted(self, layer: int | None = None, positions: Sequence[int] = ()) -> torch.Tensor:
        """``[n, tokens, width]``: the corrupted conditioning, with ``layer``'s clean output restored at
        ``positions`` when a layer is given."""
        hooks = [(self.table, self._corrupt)]
        if layer is not None:
            clean, at = self.clean_states[layer], list(positions)

            def restore(module, inputs, output):
                def put(h: torch.Tensor) -> torch.Tensor:
                    h = h.clone()
                    h[:, at] = clean[:, at].to(h.dtype)
                    return h
                return _replace(output, put)
            hooks.append((self.layers[layer], restore))
        with _hooked(hooks):
            return self._encode([self.prompt] * self.n)


def _block_restorer(rows: list[int], sources: list[int], half: int) -> Callable:
    """A forward hook that overwrites a block's output rows with the clean rows they stand for, in both
    halves of a classifier-free-guidance batch of ``2 * half`` rows."""
    dst = torch.tensor(rows + [r + half for r in rows])
    src = torch.tensor(sources + [s + half for s in sources])

    def put(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[dst.to(t.device)] = t[src.to(t.device)]
        return t

    def hook(module, inputs, output):
        if isinstance(output, tuple):  # a down block: (hidden states, its skip connections)
            return (put(output[0]), tuple(put(s) for s in output[1]), *output[2:])
        return put(output)
    return hook


@dataclass
class _Sampler:
    """Draws images from conditioning rows; row r starts from image ``r % n``'s noise (seeded ``seed + i``).
    ``size``: the images' side in pixels (the model's own when None)."""

    pipe: object
    n: int
    seed: int
    steps: int
    guidance: float
    size: int | None = None

    def __post_init__(self) -> None:
        unet = self.pipe.unet
        self.size = self.size or unet.config.sample_size * self.pipe.vae_scale_factor
        side = self.size // self.pipe.vae_scale_factor
        self.noise = torch.cat([randn_tensor((1, unet.config.in_channels, side, side), generator=seeded(self.seed + i),
                                             device=unet.device, dtype=unet.dtype) for i in range(self.n)])
        self.empty = self.pipe.encode_prompt([""], unet.device, 1, do_classifier_free_guidance=False)[0]

    @torch.no_grad()
    def draw(self, embeds: torch.Tensor, hooks: Sequence[tuple[torch.nn.Module, Callable]] = ()) -> list[Image.Image]:
        rows = len(embeds)
        latents = self.noise[torch.arange(rows) % self.n]
        with _hooked(hooks):
            return self.pipe(prompt_embeds=embeds, negative_prompt_embeds=self.empty.expand(rows, -1, -1),
                             latents=latents, num_inference_steps=self.steps, guidance_scale=self.guidance,
                             height=self.size, width=self.size).images


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


def _probability(judge: Judge, images: list[Image.Image], labels: Sequence[str], concept: str, n: int) -> list[float]:
    """The judge's mean probability of ``concept`` over each consecutive group of ``n`` images."""
    probs = judge.classify(images, list(labels))[:, list(labels).index(concept)]
    return [float(probs[i:i + n].mean()) for i in range(0, len(images), n)]


def _concept_setup(pipe, concept: str, prompt: str | None, judge: Judge | None,
                   concept_set: ConceptSet | None) -> tuple[str, Judge, tuple[str, ...]]:
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
    over the ``sites`` (default every text-encoder layer and UNet block, :func:`sites`), ``n`` images
    (seeds ``seed``, ``seed + 1``, ...) per run; with ``tokens``, also each text-encoder layer at each
    token. ``judge`` and ``concept_set`` default to the model profile's; ``size`` is the images' side in
    pixels (the model's own by default). Apply an edit around the call to trace the erased model."""
    prompt, judge, labels = _concept_setup(pipe, concept, prompt, judge, concept_set)
    positions = word_positions(pipe, prompt, concept)
    chosen = _check(pipe, sites, n, noise)
    text = _Text(pipe, prompt, positions, n, noise, seed)
    sampler = _Sampler(pipe, n, seed, steps, guidance, size)
    names, real = _token_names(pipe, prompt)
    layers = [int(s.split(".")[1]) for s in chosen if s.startswith("text.")]
    plan = [("clean", "", "", -1, text.clean.expand(n, -1, -1)), ("corrupted", "", "", -1, text.corrupted())]
    plan += [("text", f"text.{i}", "concept", -1, text.corrupted(i, positions)) for i in layers]
    if tokens:
        plan += [("token", f"text.{i}", names[p], p, text.corrupted(i, [p])) for i in layers for p in real]
    scores, images = _text_runs(sampler, plan, judge, labels, concept, batch)
    blocks = _unet_runs(pipe, sampler, text, [s for s in chosen if s.startswith("unet.")], judge, labels,
                        concept, batch)
    clean, corrupted = scores[0], scores[1]
    rows = [dict(kind=k, site=s, token=t, position=p, probability=v) for (k, s, t, p, _), v in zip(plan[2:], scores[2:])]
    rows += [dict(kind="unet", site=s, token="", position=-1, probability=v) for s, v in blocks.items()]
    table = pd.DataFrame(rows).assign(effect=lambda d: d["probability"] - corrupted)
    return Trace(concept, prompt, [names[p] for p in real], positions, clean, corrupted, table, n, seed, noise,
                 images)


def _check(pipe, chosen: Sequence[str] | None, n: int, noise: float) -> list[str]:
    """The sites to restore, in network order, after checking every argument."""
    valid = sites(pipe)
    wanted = valid if chosen is None else as_list(chosen)
    missing = [s for s in wanted if s not in valid]
    if missing:
        raise ValueError(f"{', '.join(map(repr, missing))}: no such site; a trace restores text-encoder layers "
                         f"and UNet blocks: {', '.join(valid)}")
    if n < 1:
        raise ValueError(f"n (images per run) must be at least 1, not {n}")
    if not noise > 0:
        raise ValueError(f"noise must be positive (standard deviations of the embeddings), not {noise}")
    return [s for s in valid if s in wanted]


def _token_names(pipe, prompt: str) -> tuple[list[str], list[int]]:
    """Every token of ``prompt`` as the pipeline pads it, and the positions of the real ones."""
    tok = pipe.tokenizer
    enc = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True)
    return tok.convert_ids_to_tokens(enc.input_ids), [i for i, m in enumerate(enc.attention_mask) if m]


def _text_runs(sampler: _Sampler, plan: list, judge: Judge, labels, concept: str,
               batch: int) -> tuple[list[float], dict[str, list[Image.Image]]]:
    """The judge's score of each planned conditioning (``n`` images each), drawn ``batch`` rows at a time."""
    embeds = torch.cat([p[4] for p in plan])
    step = max(sampler.n, batch // sampler.n * sampler.n)
    drawn: list[Image.Image] = []
    for i in range(0, len(embeds), step):
        drawn += sampler.draw(embeds[i:i + step])
    n = sampler.n
    return _probability(judge, drawn, labels, concept, n), {"clean": drawn[:n], "corrupted": drawn[n:2 * n]}


def _unet_runs(pipe, sampler: _Sampler, text: _Text, names: list[str], judge: Judge, labels, concept: str,
               batch: int) -> dict[str, float]:
    """Per UNet block: the corrupted run with the block's output taken from a clean run drawn beside it."""
    n, blocks = sampler.n, unet_blocks(pipe)
    per_call = max(1, batch // n - 1)
    clean, corrupted = text.clean.expand(n, -1, -1), text.corrupted()
    out: dict[str, float] = {}
    for start in range(0, len(names), per_call):
        chunk = names[start:start + per_call]
        embeds = torch.cat([clean] + [corrupted] * len(chunk))
        half = len(embeds)
        hooks = [(blocks[name], _block_restorer(list(range(n * (k + 1), n * (k + 2))), list(range(n)), half))
                 for k, name in enumerate(chunk)]
        images = sampler.draw(embeds, hooks)
        scores = _probability(judge, images, labels, concept, n)
        out.update(zip(chunk, scores[1:]))
    return out


def before_after(pipe, edit, concept: str, **options) -> tuple[Trace, Trace]:
    """:func:`trace` on the model as it is, then with ``edit`` applied (same prompt, seeds and noise)."""
    before = trace(pipe, concept, **options)
    with edit.apply(pipe):
        after = trace(pipe, concept, **options)
    return before, after


def compare_table(traces: dict[str, Trace]) -> pd.DataFrame:
    """The layer and block rows of several traces (e.g. ``{"before": ..., "after rece": ...}``) in one
    table: model, site, probability, effect."""
    return pd.concat([t.layers().assign(model=name) for name, t in traces.items()],
                     ignore_index=True)[["model", "site", "probability", "effect"]]
