"""Sparse features as an erasure, after SAeUron (Cywiński and Deja, 2025): a TopK sparse autoencoder (SAE)
learns a dictionary of a denoiser block's output, and a concept is erased by turning down the few features
that fire on it and on little else.

1. :func:`train` collects the block's output while the model draws a set of prompts (by default the erase
   prompts of every concept of the model's concept set, never held-out probes), every spatial position
   (a UNet) or image token (a transformer's image stream) of every denoising step one vector, and fits a
   :class:`TopKSAE` to them (normalised MSE, Adam). With ``path`` it checkpoints and resumes.
2. :func:`features` scores every feature for a concept: its mean activation on the concept's prompts and on
   the others', each as a share of the summed means of all features (``p``), and the score
   ``p_concept - p_others`` (pooled over timesteps). :func:`concept_features` keeps the best ones; on a
   transformer :func:`sae` keeps only those at least 4 times as active on the concept as on the others (on
   the toy DiT SAeUron's score alone picks features every concept uses).
3. :class:`FeatureAblation` hooks the block: it encodes the output, multiplies each chosen feature by
   ``multiplier`` where it is among the active top-k and above its mean over all prompts, and adds only the
   change of the decoded output, so the SAE's reconstruction error never reaches the model.

:func:`sae` is the erasure method: it trains (or loads) the SAE, selects the features and returns the
intervention. Toy SAEs are bundled under ``data/sae/<model>/<block>.safetensors``; others are trained into
``runs/sae/<model>/<block>.safetensors`` under the working directory.

>>> import workbench
>>> from workbench.sampling import generate
>>> pipe = workbench.load("toy")
>>> erasure = sae(pipe, "apple", preserve=["a cat", "a car", "a banana"])   # the bundled SAE: no training
>>> erasure.kind, erasure.parts == [default_block(pipe)], 0 < len(erasure.params["features"]) <= FEATURES
('sae', True, True)
>>> with erasure.apply(pipe):
...     erased = generate(pipe, ["an apple"], steps=4)[0]
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .activations import keeper
from .edits import applied
from .families import family_of
from .hooks import hooked
from .interventions import Intervention, Site
from .paths import DATA
from .profile import profile_of
from .sampling import BATCH, GUIDANCE, generate

#: Optimiser steps, vectors per step and Adam's learning rate of :func:`train`: on the toy's blocks these
#: reach an FVU of 0.01-0.04 in under two minutes on one CPU thread (benchmarks/sae.py).
STEPS, BATCH_ROWS, LR = 1500, 1024, 3e-3
#: Denoising steps the activations are collected over (training and feature statistics).
SAMPLE_STEPS = 10
#: Features :func:`sae` turns down, and (on a transformer) how many times as strongly as on the other concepts
#: each must fire on the concept: SAeUron's score alone picked features that every concept of the toy DiT
#: uses (a median ratio of 1.6 among the top 32), and turning them down kept 12% of the others. On a UNet
#: :func:`sae` keeps SAeUron's rule (specificity 0; the toy UNet's top 32 have a median ratio of 24).
FEATURES, SPECIFICITY = 32, 4.0
#: What :func:`sae` multiplies the features by: measured per bundled model, else :data:`MULTIPLIER`. 0
#: (ablation) erased nothing on the toy; stronger than these lost preservation before it gained efficacy
#: (tuning concepts banana, car, dog, picasso: benchmarks/sae.py --sweep).
MULTIPLIER, DEFAULT_MULTIPLIERS = -4.0, {"toy": -4.0, "toy-dit": -8.0}
#: Vectors :func:`train` keeps at most (a random share of each step's positions beyond that).
MAX_ROWS = 1_000_000
#: Where bundled SAEs live, and where others are trained (relative to the working directory).
BUNDLED, RUNS = DATA / "sae", Path("runs") / "sae"
#: The block :func:`sae` hooks by default on a bundled model. On the toy UNet unet.up.1 and unet.up.0 lost
#: preservation before they erased (dog at unet.up.0: 0.17 of the others kept), unet.mid did not
#: (benchmarks/sae.py --sweep).
DEFAULT_BLOCKS = {"toy": "unet.mid", "toy-dit": "dit.3"}
_META = "workbench-sae"


# --- the autoencoder ----------------------------------------------------------------------------------

class TopKSAE(nn.Module):
    """A TopK sparse autoencoder: ``d_in * expansion`` latents, ``k`` of them active per vector.

    Latents are ``ReLU(W_enc (x - b_dec) + b_enc)`` with all but the ``k`` largest set to zero; the
    reconstruction is ``W_dec z + b_dec``, each column of ``W_dec`` (a feature's direction) of unit norm.

    >>> m = TopKSAE(8, expansion=4, k=3)
    >>> m.latents, tuple(m.W_dec.shape), int((m.encode(torch.randn(5, 8)) != 0).sum(1).max())
    (32, (8, 32), 3)
    """

    def __init__(self, d_in: int, expansion: int = 16, k: int = 32, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(expansion, int) or expansion < 1:
            raise ValueError(f"expansion must be a whole number of at least 1 (latents = width x expansion), "
                             f"not {expansion!r}")
        if d_in < 1:
            raise ValueError(f"d_in must be at least 1, not {d_in}")
        n = d_in * expansion
        if not 1 <= k <= n:
            raise ValueError(f"k={k} must be between 1 and the number of latents, width x expansion = "
                             f"{d_in} x {expansion} = {n}")
        self.d_in, self.expansion, self.k = d_in, expansion, k
        g = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(d_in, n, generator=g)
        W_dec /= W_dec.norm(dim=0, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    @property
    def latents(self) -> int:
        """How many features the dictionary has."""
        return self.d_in * self.expansion

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """``ReLU(W_enc (x - b_dec) + b_enc)`` for rows ``x`` ``[n, d_in]``: every latent, before top-k.

        >>> bool((TopKSAE(4, 2, k=2).pre_acts(torch.randn(3, 4)) >= 0).all())
        True
        """
        return F.relu((x - self.b_dec) @ self.W_enc.T + self.b_enc)

    def topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` active latents of each row: ``(values, indices)``, each ``[n, k]``.

        >>> values, indices = TopKSAE(4, 2, k=3).topk(torch.randn(5, 4))
        >>> tuple(values.shape), tuple(indices.shape)
        ((5, 3), (5, 3))
        """
        pre = (x - self.b_dec) @ self.W_enc.T + self.b_enc
        indices = pre.detach().topk(self.k, dim=-1, sorted=False).indices
        return F.relu(pre.gather(1, indices)), indices

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents ``[n, latents]``: the top-k kept, every other zero.

        >>> TopKSAE(4, 2, k=2).encode(torch.ones(1, 4)).shape
        torch.Size([1, 8])
        """
        values, indices = self.topk(x)
        return torch.zeros(len(x), self.latents, dtype=values.dtype, device=values.device).scatter_(1, indices, values)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``W_dec z + b_dec`` for dense latents ``[n, latents]``.

        >>> m = TopKSAE(4, 2, k=8)
        >>> torch.allclose(m.decode(torch.zeros(1, 8)), m.b_dec)
        True
        """
        return z @ self.W_dec.T + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of rows ``x``; only the ``k`` active features' columns are read.

        >>> m = TopKSAE(4, 2, k=2)
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(m(x), m.decode(m.encode(x)), atol=1e-6)
        True
        """
        values, indices = self.topk(x)
        return F.embedding_bag(indices, self.W_dec.T, per_sample_weights=values, mode="sum") + self.b_dec

    @torch.no_grad()
    def normalise_decoder_(self) -> None:
        """Scale every decoder column back to unit norm.

        >>> m = TopKSAE(4, 2, k=2)
        >>> with torch.no_grad():
        ...     m.W_dec *= 3
        >>> m.normalise_decoder_()
        >>> torch.allclose(m.W_dec.norm(dim=0), torch.ones(8))
        True
        """
        self.W_dec /= self.W_dec.norm(dim=0, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def drop_parallel_gradient_(self) -> None:
        """Remove from the decoder's gradient the part along each column (it would only change norms).

        >>> m = TopKSAE(4, 2, k=2)
        >>> m.W_dec.grad = m.W_dec.detach() * 2
        >>> m.drop_parallel_gradient_()
        >>> float(m.W_dec.grad.abs().max()) < 1e-6
        True
        """
        if self.W_dec.grad is not None:
            along = (self.W_dec.grad * self.W_dec).sum(0, keepdim=True)
            self.W_dec.grad -= along * self.W_dec

    def config(self) -> dict[str, int]:
        """What rebuilds this module's shape: ``d_in``, ``expansion``, ``k``.

        >>> TopKSAE(4, 2, k=2).config()
        {'d_in': 4, 'expansion': 2, 'k': 2}
        """
        return {"d_in": self.d_in, "expansion": self.expansion, "k": self.k}

    def save(self, path: str | Path, meta: dict | None = None, extra: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the weights (and ``extra`` tensors) as safetensors, with the shape and ``meta`` as JSON.

        >>> import tempfile
        >>> m = TopKSAE(4, 2, k=2)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     back, meta = TopKSAE.load(m.save(Path(d) / "m.safetensors", {"block": "unet.mid"}))
        >>> torch.equal(back.W_enc, m.W_enc), meta["block"]
        (True, 'unet.mid')
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tensors |= {k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()}
        temporary = path.with_name(path.name + ".partial")
        save_file(tensors, temporary, metadata={_META: json.dumps({**(meta or {}), **self.config()})})
        os.replace(temporary, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> tuple["TopKSAE", dict]:
        """A module written by :meth:`save` and its metadata (the extra tensors under ``meta["extra"]``).

        >>> module, meta = TopKSAE.load(BUNDLED / "toy" / "unet.mid.safetensors")
        >>> module.config(), meta["block"], meta["extra"]
        ({'d_in': 128, 'expansion': 16, 'k': 32}, 'unet.mid', {})
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no SAE file at {path}; train one with workbench.sae.train(pipe, block, path=...)")
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get(_META)
        if raw is None:
            raise ValueError(f"{path} is not an SAE written by workbench.sae (no {_META!r} metadata)")
        meta = json.loads(raw)
        tensors = load_file(path)
        module = cls(meta["d_in"], meta["expansion"], meta["k"])
        own = set(module.state_dict())
        module.load_state_dict({k: v for k, v in tensors.items() if k in own})
        meta["extra"] = {k: v for k, v in tensors.items() if k not in own}
        return module, meta


# --- blocks and their activations ---------------------------------------------------------------------

def _transformer(pipe) -> bool:
    return "transformer" in family_of(pipe).components(pipe)


def _stream(pipe) -> int:
    """Which item of a block's output tuple the SAE reads: a transformer block returns ``(text stream, image
    stream)`` (:data:`workbench.tracing.STREAMS`), a UNet down block ``(hidden states, its skips)``."""
    return 1 if _transformer(pipe) else 0


def check_block(pipe, block: str) -> None:
    """Raise ``ValueError`` listing the denoiser's blocks unless ``block`` is one of them.

    >>> import workbench
    >>> check_block(workbench.load("toy"), "unet.up.9")
    Traceback (most recent call last):
    ValueError: 'unet.up.9' is not a block of this model; an SAE reads one of: unet.down.0, ..., unet.up.2
    """
    blocks = family_of(pipe).blocks(pipe)
    if block not in blocks:
        raise ValueError(f"{block!r} is not a block of this model; an SAE reads one of: {', '.join(blocks)}")


def default_block(pipe) -> str:
    """The block :func:`sae` reads when none is given: the measured one on a bundled model, else a UNet's
    ``unet.up.1`` (SAeUron's choice on Stable Diffusion) or a transformer's middle double block.

    >>> import workbench
    >>> default_block(workbench.load("toy")), default_block(workbench.load("toy-dit"))
    ('unet.mid', 'dit.3')
    """
    known = DEFAULT_BLOCKS.get(_bundled_name(pipe) or "")
    blocks = list(family_of(pipe).blocks(pipe))
    if known in blocks:
        return known
    if _transformer(pipe):
        double = [b for b in blocks if not b.startswith("dit.single.")]
        return double[len(double) // 2]
    return "unet.up.1" if "unet.up.1" in blocks else blocks[len(blocks) // 2]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A block output's vectors ``[batch, positions, width]``: a feature map ``[b, c, h, w]``'s pixels, or
    a token stream ``[b, tokens, width]`` as it is."""
    if x.ndim == 4:
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])
    if x.ndim == 3:
        return x
    raise ValueError(f"an SAE reads a feature map [b, c, h, w] or tokens [b, n, width], not shape {tuple(x.shape)}")


def _unrows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Rows ``[batch, positions, width]`` back in the shape of ``like``."""
    if like.ndim == 4:
        b, c, h, w = like.shape
        return rows.reshape(b, h, w, c).permute(0, 3, 1, 2)
    return rows.reshape(like.shape)


def _states(output, index: int) -> torch.Tensor:
    return output[index] if isinstance(output, tuple) else output


@torch.no_grad()
def collect(pipe, block: str, prompts: Sequence[str], reduce: Callable[[torch.Tensor, int], Any], seed: int = 0,
            steps: int = SAMPLE_STEPS, guidance: float = GUIDANCE, batch: int = BATCH) -> list:
    """Draw ``prompts`` (``batch`` at a time, seeded like :func:`~workbench.sampling.generate`) and return
    ``reduce(rows, first)`` at every denoising step of each batch: ``rows`` ``[prompts, positions, width]``
    are the block's output vectors for the batch's prompts (the conditional branch), ``first`` the index of
    the batch's first prompt.

    >>> import workbench
    >>> pipe = workbench.load("toy")
    >>> collect(pipe, "unet.up.0", ["an apple", "a cat"], lambda rows, first: tuple(rows.shape), steps=2)
    [(2, 64, 128), (2, 64, 128)]
    >>> collect(workbench.load("toy-dit"), "dit.3", ["an apple"], lambda rows, first: tuple(rows.shape), steps=1)
    [(1, 64, 128)]
    """
    check_block(pipe, block)
    module, index = family_of(pipe).blocks(pipe)[block], _stream(pipe)
    prompts, out = list(prompts), []
    for first in range(0, len(prompts), batch):
        chunk = prompts[first:first + batch]
        keep = keeper(pipe, len(chunk), guidance, False, lambda x: reduce(_rows(x), first), out)
        with hooked([(module, lambda m, args, output: keep(m, args, _states(output, index)))]):
            generate(pipe, chunk, seed + first, steps, guidance, batch=len(chunk))
    return out


def _width(pipe, block: str) -> int:
    """The width of ``block``'s output vectors (one denoising step of the empty prompt)."""
    return collect(pipe, block, [""], lambda rows, first: rows.shape[-1], steps=1)[0]


# --- training -----------------------------------------------------------------------------------------

@dataclass
class SAE:
    """A trained (or partly trained) SAE on one block: the module, the block, the training settings
    (``config``), the fraction of variance unexplained of every optimiser step's batch (``curve``), the
    steps done and the FVU of the finished module on a fixed sample of its activations (``fvu``).

    >>> m = SAE(TopKSAE(4, 2, k=2), "unet.mid", {}, curve=[0.9, 0.5], step=2)
    >>> m.block, m.step, m.latents
    ('unet.mid', 2, 8)
    """

    module: TopKSAE
    block: str
    config: dict[str, Any]
    curve: list[float] = field(default_factory=list)
    step: int = 0
    fvu: float = float("nan")
    seconds: float = 0.0
    path: Path | None = None
    _stats: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def latents(self) -> int:
        """How many features the dictionary has (:attr:`TopKSAE.latents`)."""
        return self.module.latents

    def meta(self) -> dict[str, Any]:
        """What :meth:`save` writes beside the weights.

        >>> sorted(SAE(TopKSAE(4, 2, k=2), "unet.mid", {}).meta())
        ['block', 'config', 'curve', 'fvu', 'seconds', 'step']
        """
        return {"block": self.block, "config": self.config, "step": self.step, "curve": self.curve,
                "fvu": self.fvu, "seconds": self.seconds}

    def save(self, path: str | Path, optimiser: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the SAE (and an optimiser's state, for resuming) to one ``.safetensors`` file.

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     back = SAE.load(SAE(TopKSAE(4, 2, k=2), "unet.mid", {"k": 2}, [0.5], 1).save(f"{d}/m.safetensors"))
        >>> back.block, back.config, back.curve, back.step
        ('unet.mid', {'k': 2}, [0.5], 1)
        """
        self.path = self.module.save(path, self.meta(), optimiser)
        return self.path

    @classmethod
    def load(cls, path: str | Path) -> "SAE":
        """Read an SAE written by :meth:`save` (or :func:`train`); the same object again while the file
        is unchanged (it keeps the feature statistics :func:`features` measured with it).

        >>> model = SAE.load(BUNDLED / "toy" / "unet.mid.safetensors")
        >>> model.block, model.step, round(model.fvu, 3), model is SAE.load(model.path)
        ('unet.mid', 1500, 0.012, True)
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no SAE file at {path}; train one with workbench.sae.train(pipe, block, path=...)")
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        if key not in _LOADED:
            module, meta = TopKSAE.load(path)
            _LOADED[key] = cls(module, meta["block"], meta["config"], list(meta["curve"]), int(meta["step"]),
                               float(meta["fvu"]), float(meta.get("seconds", 0.0)), path)
        return _LOADED[key]


#: SAEs read from files, by (path, modification time, size).
_LOADED: dict[tuple[str, int, int], SAE] = {}


def _digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()[:16]


def training_prompts(pipe) -> list[str]:
    """What :func:`train` draws by default: the erase prompts of every concept of the model's concept set
    (never their held-out probes).

    >>> import workbench
    >>> len(training_prompts(workbench.load("toy")))
    80
    """
    cs = profile_of(pipe).concept_set()
    return [p for c in cs.names for p in cs.prompts(c)]


def _activations(pipe, block: str, prompts: Sequence[str], seed: int, steps: int, cap: int) -> torch.Tensor:
    """The block's output vectors ``[n, width]`` (float32) over every denoising step of ``prompts``; past
    ``cap`` vectors, a seeded random share of each step's."""
    g = torch.Generator().manual_seed(seed)
    calls = steps * math.ceil(len(prompts) / BATCH)

    def take(rows: torch.Tensor, first: int) -> torch.Tensor:
        rows = rows.reshape(-1, rows.shape[-1]).float().cpu()
        room = max(1, cap // calls)
        return rows if len(rows) <= room else rows[torch.randperm(len(rows), generator=g)[:room]]
    return torch.cat(collect(pipe, block, prompts, take, seed, steps))


def _fvu(module: TopKSAE, x: torch.Tensor, chunk: int = 8192) -> float:
    """Fraction of variance unexplained over rows ``x``."""
    with torch.no_grad():
        error = sum(float((module(x[i:i + chunk]) - x[i:i + chunk]).pow(2).sum()) for i in range(0, len(x), chunk))
    return error / float((x - x.mean(0)).pow(2).sum())


def train(pipe, block: str, prompts: Sequence[str] | None = None, *, expansion: int = 16, k: int = 32,
          steps: int = STEPS, batch: int = BATCH_ROWS, lr: float = LR, seed: int = 0,
          sample_steps: int = SAMPLE_STEPS, path: str | Path | None = None, progress: bool | None = None,
          every: int = 250) -> SAE:
    """Fit a :class:`TopKSAE` to ``block``'s output over ``prompts`` (default: :func:`training_prompts`),
    every position of every one of ``sample_steps`` denoising steps a vector.

    Each of ``steps`` Adam steps (``lr``) reads ``batch`` random vectors (seeded by ``seed`` and the step)
    and minimises the normalised MSE, the batch's fraction of variance unexplained (FVU); decoder columns
    are kept at unit norm. ``b_dec`` starts at the vectors' mean, the encoder at the decoder's transpose.

    With ``path``, a checkpoint (weights, Adam's state, settings, the FVU curve; safetensors with JSON
    metadata) is written every ``every`` steps and at the end, and a later call with the same settings
    continues from the saved step (or returns the saved SAE at once when it has ``steps`` already). Other
    settings than the saved ones are refused. ``progress``: a progress bar (None: only on a terminal).

    >>> import workbench, tempfile
    >>> pipe = workbench.load("toy")
    >>> with tempfile.TemporaryDirectory() as d:
    ...     m = train(pipe, "unet.mid", ["an apple", "a cat"], steps=5, batch=64, sample_steps=2,
    ...               path=f"{d}/mid.safetensors")
    ...     again = train(pipe, "unet.mid", ["an apple", "a cat"], steps=5, batch=64, sample_steps=2,
    ...                   path=f"{d}/mid.safetensors")
    >>> m.step, len(m.curve), again.step, m.latents
    (5, 5, 5, 2048)
    """
    check_block(pipe, block)
    if not isinstance(expansion, int) or expansion < 1:
        raise ValueError(f"expansion must be a whole number of at least 1 (latents = width x expansion), "
                         f"not {expansion!r}")
    if steps < 0 or batch < 1 or sample_steps < 1 or not lr > 0:
        raise ValueError(f"steps must be >= 0 and batch, sample_steps and lr positive (got steps={steps}, "
                         f"batch={batch}, sample_steps={sample_steps}, lr={lr})")
    prompts = training_prompts(pipe) if prompts is None else list(prompts)
    if not prompts:
        raise ValueError("give at least one prompt to collect the block's activations over")
    config = {"block": block, "prompts": _digest(prompts), "n_prompts": len(prompts), "expansion": expansion,
              "k": k, "batch": batch, "lr": lr, "seed": seed, "sample_steps": sample_steps}
    path = None if path is None else Path(path)
    model, optimiser_state = None, {}
    if path is not None and path.is_file():
        module, meta = TopKSAE.load(path)
        model = SAE(module, meta["block"], meta["config"], list(meta["curve"]), int(meta["step"]),
                    float(meta["fvu"]), float(meta.get("seconds", 0.0)), path)
        differ = {key: (model.config.get(key), value) for key, value in config.items()
                  if model.config.get(key) != value}
        if differ:
            raise ValueError(f"{path} holds an SAE trained with other settings (saved, asked): "
                             + ", ".join(f"{key} {a!r} vs {b!r}" for key, (a, b) in differ.items())
                             + "; give those settings to continue it, or another path")
        if model.step >= steps:
            return model
        optimiser_state = meta["extra"]
    else:
        width = _width(pipe, block)
        TopKSAE(width, expansion, k)  # refuses k before any sampling
        config["width"] = width
    with torch.random.fork_rng(devices=[]):
        started = time.perf_counter()
        x = _activations(pipe, block, prompts, seed, sample_steps, MAX_ROWS)
        if model is None:
            model = SAE(TopKSAE(config["width"], expansion, k, seed), block, config, path=path)
            with torch.no_grad():
                model.module.b_dec.copy_(x.mean(0))
        module = model.module.train()
        adam = torch.optim.Adam(module.parameters(), lr=lr)
        if optimiser_state:
            adam.load_state_dict(_unflatten(optimiser_state, adam))
        held = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:16384]]
        bar = tqdm(range(model.step, steps), desc=f"SAE {block}", disable=None if progress is None else not progress)
        for step in bar:
            rows = x[torch.randint(len(x), (batch,), generator=torch.Generator().manual_seed(seed * 1_000_003 + step))]
            loss = (module(rows) - rows).pow(2).sum() / (rows - rows.mean(0)).pow(2).sum()
            adam.zero_grad(set_to_none=True)
            loss.backward()
            module.drop_parallel_gradient_()
            adam.step()
            module.normalise_decoder_()
            model.curve.append(round(loss.item(), 5))
            model.step = step + 1
            if path is not None and (model.step % every == 0 or model.step == steps):
                model.fvu, model.seconds = _fvu(module, held), model.seconds + time.perf_counter() - started
                started = time.perf_counter()
                model.save(path, _flatten(adam))
        module.eval()
        if path is None or model.step == 0:
            model.fvu, model.seconds = _fvu(module, held), model.seconds + time.perf_counter() - started
    return model


def _flatten(adam: torch.optim.Adam) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state as flat tensors (``adam/<param>/<name>``) for a safetensors file."""
    state = adam.state_dict()["state"]
    return {f"adam/{i}/{name}": torch.as_tensor(value).reshape(-1) if name == "step" else value
            for i, entry in state.items() for name, value in entry.items()}


def _unflatten(flat: dict[str, torch.Tensor], adam: torch.optim.Adam) -> dict:
    """The state dict :func:`_flatten` wrote, for ``adam.load_state_dict``."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        if key.startswith("adam/"):
            _, i, name = key.split("/")
            state.setdefault(int(i), {})[name] = value.reshape(()) if name == "step" else value
    return {"state": state, "param_groups": adam.state_dict()["param_groups"]}


# --- features of a concept ----------------------------------------------------------------------------

def _concept_prompts(pipe, concept: str, prompts: Sequence[str] | None,
                     others: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """The prompts of ``concept`` and of the others (default: the concept set's erase prompts of the concept
    and of every other concept); an error listing the concepts when the concept set does not know it."""
    cs = profile_of(pipe).concepts
    if prompts is None or not others:
        if cs is None or concept not in cs:
            names = f"its concepts: {', '.join(cs.names)}" if cs is not None else "this model has no concept set"
            raise ValueError(f"{concept!r} is not in the model's concept set ({names}); give its prompts and "
                             "the other concepts' prompts (prompts=[...], preserve=[...])")
    prompts = cs.prompts(concept) if prompts is None else list(prompts)
    others = cs.preserve(concept) if not others else list(others)
    if not prompts:
        raise ValueError(f"no prompts for {concept!r}: give at least one")
    return prompts, others


@torch.no_grad()
def _prompt_means(pipe, sae: SAE, prompts: list[str], seed: int, steps: int) -> dict[str, torch.Tensor]:
    """Each prompt's mean latent activation ``[latents]`` over every position and denoising step (with the
    prompts drawn in sorted order, so that a prompt's noise does not depend on which concept asks)."""
    ordered = sorted(set(prompts))
    key = (id(pipe), tuple(id(e) for e in applied(pipe)), tuple(ordered), seed, steps)
    if key not in sae._stats:
        module = sae.module
        device = next(module.parameters()).device
        sums = torch.zeros(len(ordered), module.latents, dtype=torch.float64)
        count = [0]

        def add(rows: torch.Tensor, first: int) -> None:
            if rows.shape[-1] != module.d_in:
                raise ValueError(f"this SAE reads vectors of width {module.d_in}; {sae.block} of this model gives "
                                 f"{rows.shape[-1]}: train one on this model (workbench.sae.train)")
            for i, row in enumerate(rows):
                sums[first + i] += module.encode(row.float().to(device)).sum(0).double().cpu()
            if first == 0:
                count[0] += rows.shape[1]
        collect(pipe, sae.block, ordered, add, seed, steps)
        if len(sae._stats) >= 8:
            sae._stats.pop(next(iter(sae._stats)))
        sae._stats[key] = dict(zip(ordered, (sums / count[0]).float()))
    return sae._stats[key]


def features(pipe, sae: SAE, concept: str, *, prompts: Sequence[str] | None = None,
             others: Sequence[str] | None = None, seed: int = 0, sample_steps: int | None = None) -> pd.DataFrame:
    """Every feature's score for ``concept``, best first (one row per feature).

    ``mean_concept`` and ``mean_others`` are a feature's mean activation over every position and denoising
    step of ``prompts`` (default: the concept's erase prompts) and of ``others`` (default: every other
    concept's); ``p_concept`` and ``p_others`` the same as shares of the sum over all features; ``score`` is
    ``p_concept - p_others`` (SAeUron's, pooled over timesteps); ``mean_all`` the mean over all those
    prompts, the level above which :class:`FeatureAblation` changes a feature. ``sample_steps``: the
    denoising steps drawn (default: those the SAE was trained on).

    >>> import workbench
    >>> pipe = workbench.load("toy")
    >>> model = load_or_train(pipe, default_block(pipe))                  # the bundled SAE
    >>> table = features(pipe, model, "apple", others=["a cat", "a car"], sample_steps=4)
    >>> len(table), list(table.columns)
    (2048, ['feature', 'score', 'p_concept', 'p_others', 'mean_concept', 'mean_others', 'mean_all'])
    >>> bool(table["score"].is_monotonic_decreasing)
    True
    """
    prompts, others = _concept_prompts(pipe, concept, prompts, others)
    steps = sample_steps or int(sae.config.get("sample_steps", SAMPLE_STEPS))
    means = _prompt_means(pipe, sae, prompts + others, seed, steps)
    mine = torch.stack([means[p] for p in prompts]).mean(0)
    rest = torch.stack([means[p] for p in others]).mean(0)
    every = torch.stack([means[p] for p in prompts + others]).mean(0)
    p_mine, p_rest = mine / (mine.sum() + 1e-8), rest / (rest.sum() + 1e-8)
    table = pd.DataFrame({"feature": np.arange(sae.latents), "score": (p_mine - p_rest).numpy(),
                          "p_concept": p_mine.numpy(), "p_others": p_rest.numpy(), "mean_concept": mine.numpy(),
                          "mean_others": rest.numpy(), "mean_all": every.numpy()})
    return table.sort_values(["score", "feature"], ascending=[False, True], kind="stable").reset_index(drop=True)


def concept_features(table: pd.DataFrame, top: int | None = None, percentile: float | None = None,
                     specificity: float = 0.0) -> list[int]:
    """The features a :func:`features` table gives the concept: the ``top`` best-scoring (default
    :data:`FEATURES`), or those scoring above the ``percentile`` of all scores (SAeUron's rule); only
    features with a positive score, and (``specificity`` > 0) whose mean activation on the concept is at
    least ``specificity`` times that on the others.

    >>> t = pd.DataFrame({"feature": [4, 1, 0, 2], "score": [0.3, 0.2, 0.0, -0.1],
    ...                   "mean_concept": [2.0, 1.0, 0.0, 0.0], "mean_others": [1.5, 0.1, 0.0, 0.1]})
    >>> concept_features(t, top=3), concept_features(t, percentile=50), concept_features(t, specificity=4)
    ([4, 1], [4, 1], [1])
    """
    if top is not None and percentile is not None:
        raise ValueError("give top or percentile, not both")
    if not specificity >= 0:
        raise ValueError(f"specificity must be 0 (off) or more, not {specificity!r}")
    scores = table["score"].to_numpy()
    keep = scores > 0
    if specificity > 0:
        keep &= table["mean_concept"].to_numpy() >= specificity * table["mean_others"].to_numpy()
    if percentile is not None:
        if not 0 <= percentile < 100:
            raise ValueError(f"percentile must be in [0, 100), not {percentile}")
        keep &= scores > float(np.quantile(scores, percentile / 100))
    else:
        top = FEATURES if top is None else top
        if not isinstance(top, (int, np.integer)) or top < 1:
            raise ValueError(f"top must be a whole number of features, at least 1 (not {top!r})")
        keep &= np.cumsum(keep) <= top
    return [int(f) for f in table["feature"].to_numpy()[keep]]


# --- the intervention ---------------------------------------------------------------------------------

class FeatureAblation(Intervention):
    """Chosen SAE features of one block's output turned down (``kind = "sae"``).

    ``tensors``: the SAE (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``), the chosen ``features`` and their
    ``thresholds``; ``params``: ``block``, ``k``, ``multiplier``, ``sites`` (the block) and ``units`` (the
    features). At every call of the block its output (a UNet's feature map, a transformer's image stream;
    every row of the batch) is encoded; where a chosen feature is among the top-k and above its threshold
    it is multiplied by ``multiplier`` (0: ablated, negative: pushed the other way), and the decoded
    *change* is added to the output as it was, so the SAE's reconstruction error never reaches the model.
    Computed in float32, returned in the output's dtype. A UNet down block's output is also its last skip
    connection: that copy changes with it. (SAeUron multiplies by its multiplier times the feature's mean
    activation on the concept; here the multiplier is the factor itself, so 1 changes nothing.)

    >>> import workbench
    >>> from workbench.sampling import generate
    >>> pipe = workbench.load("toy")
    >>> same = sae(pipe, "apple", preserve=["a cat", "a car"], multiplier=1.0)     # times one: no change
    >>> with same.apply(pipe):
    ...     image = generate(pipe, ["an apple"], steps=2)[0]
    >>> image.tobytes() == generate(pipe, ["an apple"], steps=2)[0].tobytes()
    True
    """

    kind = "sae"

    @classmethod
    def of(cls, model: SAE, table: pd.DataFrame, chosen: Sequence[int], multiplier: float, concept: str,
           **params: Any) -> "FeatureAblation":
        """The intervention turning down ``chosen`` features of an SAE (their thresholds from its
        :func:`features` ``table``); ``params`` are kept with it.

        >>> model = SAE(TopKSAE(4, 2, k=2), "unet.mid", {})
        >>> table = pd.DataFrame({"feature": range(8), "mean_all": [0.5] * 8})
        >>> erasure = FeatureAblation.of(model, table, [3, 5], 0.0, "apple")
        >>> erasure.tensors["thresholds"].tolist(), erasure.params["units"]
        ([0.5, 0.5], {'unet.mid': [3, 5]})
        """
        if not math.isfinite(multiplier):
            raise ValueError(f"multiplier must be a finite number (1: no change, 0: ablate, below 0: reverse), "
                             f"not {multiplier!r}")
        chosen = [int(f) for f in chosen]
        wrong = [f for f in chosen if not 0 <= f < model.latents]
        if wrong:
            raise ValueError(f"features {wrong} are not features of this SAE (0..{model.latents - 1})")
        level = table.set_index("feature")["mean_all"]
        module = model.module
        tensors = {name: getattr(module, name).detach().float().cpu().clone()
                   for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
        tensors |= {"features": torch.tensor(chosen, dtype=torch.long),
                    "thresholds": torch.tensor([float(level[f]) for f in chosen], dtype=torch.float32)}
        return cls(tensors, "sae", concept, params={
            "block": model.block, "k": module.k, "multiplier": float(multiplier), "features": chosen,
            "sites": [model.block], "units": {model.block: chosen}, "changes": "SAE features", **params})

    def hooks(self, pipe) -> list[Site]:
        """One forward hook on the block that rewrites its output (see the class).

        >>> import workbench
        >>> model = SAE.load(BUNDLED / "toy" / "unet.mid.safetensors")
        >>> table = pd.DataFrame({"feature": range(model.latents), "mean_all": [0.0] * model.latents})
        >>> erasure = FeatureAblation.of(model, table, [1], 0.0, "x")
        >>> [(site, pre) for site, fn, pre in erasure.hooks(workbench.load("toy"))]
        [('unet.mid', False)]
        """
        block = self.params["block"]
        index = _stream(pipe)
        device = family_of(pipe).denoiser(pipe).device
        t = {name: value.to(device) for name, value in self.tensors.items()}
        W_enc, b_enc, b_dec = t["W_enc"].float(), t["b_enc"].float(), t["b_dec"].float()
        chosen, thresholds = t["features"].long(), t["thresholds"].float()
        directions = t["W_dec"].float()[:, chosen]
        k, factor = int(self.params["k"]), float(self.params["multiplier"]) - 1.0

        def change(x: torch.Tensor) -> torch.Tensor:
            rows = _rows(x)
            flat = rows.reshape(-1, rows.shape[-1]).float()
            pre = (flat - b_dec) @ W_enc.T + b_enc
            active = (pre.topk(k, dim=-1, sorted=False).indices.unsqueeze(-1) == chosen).any(1)
            z = F.relu(pre[:, chosen]) * active
            delta = torch.where(z > thresholds, z * factor, torch.zeros_like(z))
            return _unrows((flat + delta @ directions.T).reshape(rows.shape), x).to(x.dtype)

        def hook(module, inputs, output):
            if not isinstance(output, tuple):
                return change(output)
            old = output[index]
            new = change(old)
            items = [new if i == index else item for i, item in enumerate(output)]
            return tuple(tuple(new if s is old else s for s in item) if isinstance(item, tuple) else item
                         for item in items)
        return [(block, hook, False)]


# --- the erasure method -------------------------------------------------------------------------------

def _bundled_name(pipe) -> str | None:
    """A bundled model's name (``"toy"``, ``"toy-dit"``), or None."""
    profile = profile_of(pipe)
    return profile.name if profile.name in profile.models else None


def _model_key(pipe) -> str:
    """The folder name of ``pipe``'s SAEs: a bundled model's name, or its folder / hub id."""
    name = _bundled_name(pipe) or getattr(pipe, "name_or_path", None)
    if not name:
        raise ValueError("this pipeline has no name to file its SAEs under; give sae_path=...")
    return str(name).strip("/").replace("/", "--").replace(os.sep, "--")


def sae_file(pipe, block: str, bundled: bool = False) -> Path:
    """Where :func:`sae` keeps the SAE of ``block``: ``runs/sae/<model>/<block>.safetensors`` under the
    working directory, or (``bundled``) the one shipped in ``data/sae``.

    >>> import workbench
    >>> sae_file(workbench.load("toy"), "unet.up.0").as_posix()
    'runs/sae/toy/unet.up.0.safetensors'
    """
    return (BUNDLED if bundled else RUNS) / _model_key(pipe) / f"{block}.safetensors"


def load_or_train(pipe, block: str, path: str | Path | None = None, steps: int | None = None, seed: int = 0,
                  progress: bool | None = None) -> SAE:
    """The SAE :func:`sae` uses. ``steps=None``: the SAE at ``path`` (default: the one in ``runs/``, else
    the bundled one) as it is, trained with :func:`train`'s defaults into ``path`` (default ``runs/``) when
    there is none. ``steps`` given: :func:`train` to that many steps at ``path`` (default ``runs/``),
    resuming from a checkpoint there.

    >>> import workbench
    >>> load_or_train(workbench.load("toy"), "unet.mid").path.relative_to(BUNDLED).as_posix()
    'toy/unet.mid.safetensors'
    """
    check_block(pipe, block)
    if path is None:
        path = sae_file(pipe, block)
        if steps is None and not path.is_file() and sae_file(pipe, block, bundled=True).is_file():
            path = sae_file(pipe, block, bundled=True)
    path = Path(path)
    if steps is None and path.is_file():
        found = SAE.load(path)
        if found.block != block:
            raise ValueError(f"{path} holds an SAE of {found.block}, not {block}")
        return found
    return train(pipe, block, steps=STEPS if steps is None else steps, seed=seed, path=path, progress=progress)


_scores = features


def default_specificity(pipe) -> float:
    """How selective :func:`sae`'s features must be when not told: :data:`SPECIFICITY` on a transformer,
    0 (SAeUron's rule: the score alone) on a UNet.

    >>> import workbench
    >>> default_specificity(workbench.load("toy")), default_specificity(workbench.load("toy-dit"))
    (0.0, 4.0)
    """
    return SPECIFICITY if _transformer(pipe) else 0.0


def default_multiplier(pipe) -> float:
    """What :func:`sae` multiplies features by when not told: :data:`DEFAULT_MULTIPLIERS` for a bundled
    model, else :data:`MULTIPLIER`.

    >>> import workbench
    >>> default_multiplier(workbench.load("toy")), default_multiplier(workbench.load("toy-dit"))
    (-4.0, -8.0)
    """
    return DEFAULT_MULTIPLIERS.get(_bundled_name(pipe) or "", MULTIPLIER)


def sae(pipe, concept: str, block: str | None = None, prompts: Sequence[str] | None = None,
        preserve: Sequence[str] = (), features: int = FEATURES, multiplier: float | None = None,
        specificity: float | None = None, sae_path: str | Path | None = None, train_steps: int | None = None,
        seed: int = 0, progress: bool = True) -> FeatureAblation:
    """Erase ``concept`` by turning down its SAE features in one block (SAeUron): a
    :class:`FeatureAblation`.

    The SAE of ``block`` (default :func:`default_block`) comes from :func:`load_or_train` (``sae_path``,
    ``train_steps``; bundled for the toy models' default blocks, so nothing trains). The ``features``
    best-scoring features of ``prompts`` against ``preserve`` (defaults: the concept set's erase prompts
    of the concept and of every other concept) that fire at least ``specificity`` times as strongly on the
    concept as on the others (:func:`concept_features`; default :func:`default_specificity`) are
    multiplied by ``multiplier`` (default :func:`default_multiplier`) where they fire above their mean.
    ``seed`` seeds training and the sampling the features are scored on. The pipeline is not changed:
    apply the returned intervention.

    >>> import workbench
    >>> pipe = workbench.load("toy")
    >>> erasure = sae(pipe, "cat", preserve=["a dog", "a car", "an apple"], features=4, multiplier=-3.0)
    >>> erasure.params["sites"] == [default_block(pipe)], erasure.params["multiplier"], len(erasure.params["features"])
    (True, -3.0, 4)
    """
    multiplier = default_multiplier(pipe) if multiplier is None else multiplier
    specificity = default_specificity(pipe) if specificity is None else specificity
    if not isinstance(specificity, (int, float)) or not specificity >= 0:
        raise ValueError(f"specificity must be 0 (SAeUron's score alone) or more, not {specificity!r}")
    if not isinstance(multiplier, (int, float)) or not math.isfinite(multiplier):
        raise ValueError(f"multiplier must be a finite number (1: no change, 0: ablate, below 0: reverse), "
                         f"not {multiplier!r}")
    if not isinstance(features, (int, np.integer)) or features < 1:
        raise ValueError(f"features must be a whole number, at least 1 (not {features!r})")
    block = default_block(pipe) if block is None else block
    check_block(pipe, block)
    prompts, preserve = _concept_prompts(pipe, concept, prompts, preserve)
    started = time.perf_counter()
    model = load_or_train(pipe, block, sae_path, train_steps, seed, progress)
    table = _scores(pipe, model, concept, prompts=prompts, others=preserve, seed=seed)
    chosen = concept_features(table, top=features, specificity=specificity)
    erasure = FeatureAblation.of(model, table, chosen, multiplier, concept, prompts=prompts, preserve=preserve,
                                 specificity=specificity, expansion=model.module.expansion,
                                 sae=str(model.path) if model.path else None,
                                 sae_step=model.step, fvu=model.fvu,
                                 scores=[float(s) for s in table["score"].head(len(chosen))])
    erasure.seed, erasure.seconds = seed, time.perf_counter() - started
    return erasure
