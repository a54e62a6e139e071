"""What FLUX.1 and SD 3 share: a multimodal diffusion transformer (MMDiT) trained with flow matching.

There is no cross-attention. Text tokens (projected by ``context_embedder``) and image tokens run side by
side through *double-stream* (joint) blocks, each stream with its own projections, modulation and FFN,
meeting in one attention over both; FLUX then runs them as one sequence through *single-stream* blocks.
A pooled text vector enters with the timestep (``time_text_embed``) and modulates every block. Part names:

========================================  =========================================================
``dit.in.patch``                          the image tokens' patch embedding (x_embedder / pos_embed.proj)
``dit.context.proj``                      ``context_embedder``: the text tokens into the transformer
``dit.pooled.{in,out}``                   the pooled text vector's embedder (text_embedder.linear_1, _2)
``dit.time.mlp.{in,out}``                 the timestep embedder; ``dit.time.guidance.*`` FLUX-dev's guidance
``dit.{i}.img.{q,k,v,out}``               double block i's image-stream attention (to_q, to_k, to_v, to_out)
``dit.{i}.text.{q,k,v,out}``              its text-stream attention (add_q_proj, add_k_proj, add_v_proj, to_add_out)
``dit.{i}.{img,text}.ffn.{in,out}``       each stream's feed-forward (ff / ff_context)
``dit.{i}.{img,text}.mod``                each stream's modulation linear (norm1 / norm1_context)
``dit.{i}.img.attn2.{q,k,v,out}``         SD 3.5's second image self-attention (dual-attention blocks)
``dit.single.{j}.{q,k,v}``                single block j's attention over both streams (FLUX)
``dit.single.{j}.ffn.in``, ``.out``, ``.mod``  its MLP input, the fused output projection, its modulation
``dit.out.{mod,proj}``                    the final modulation and the output projection
========================================  =========================================================

``dit.*.text.[kv]`` are the matrices that turn text into the keys and values image tokens attend to, as
``unet.*.xattn.[kv]`` are in a UNet; unlike those, each block's text keys come from its own text
stream (modulated by the timestep and changed by every earlier block), not from the encoder's output.

Latents are handed around unpacked, ``[n, channels, h, w]``, as for a UNet; FLUX's adapter packs them
into 2x2 patches for its transformer. Timesteps are on the 0..1000 scale of the training schedule;
a timestep t is the noise level sigma = t / 1000 of ``x_t = (1 - sigma) x_0 + sigma noise``, and the
denoiser predicts the velocity ``noise - x_0``.
"""
from __future__ import annotations

import math
import re
import weakref
from typing import Any, Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from .base import Conditioning, Family
from .sd import EncodedByStates, StableDiffusion, _text_parts

#: Paths of a transformer's top-level parts, by stable name.
_TOP_IN = {"x_embedder": "dit.in.patch", "pos_embed.proj": "dit.in.patch", "context_embedder": "dit.context.proj",
           "time_text_embed.timestep_embedder.linear_1": "dit.time.mlp.in",
           "time_text_embed.timestep_embedder.linear_2": "dit.time.mlp.out",
           "time_text_embed.guidance_embedder.linear_1": "dit.time.guidance.in",
           "time_text_embed.guidance_embedder.linear_2": "dit.time.guidance.out",
           "time_text_embed.text_embedder.linear_1": "dit.pooled.in",
           "time_text_embed.text_embedder.linear_2": "dit.pooled.out"}
_TOP_OUT = {"norm_out.linear": "dit.out.mod", "proj_out": "dit.out.proj"}
_DOUBLE = {"norm1.linear": "img.mod", "norm1_context.linear": "text.mod",
           "attn.to_q": "img.q", "attn.to_k": "img.k", "attn.to_v": "img.v", "attn.to_out.0": "img.out",
           "attn.add_q_proj": "text.q", "attn.add_k_proj": "text.k", "attn.add_v_proj": "text.v",
           "attn.to_add_out": "text.out",
           "attn2.to_q": "img.attn2.q", "attn2.to_k": "img.attn2.k", "attn2.to_v": "img.attn2.v",
           "attn2.to_out.0": "img.attn2.out",
           "ff.net.0.proj": "img.ffn.in", "ff.net.2": "img.ffn.out",
           "ff_context.net.0.proj": "text.ffn.in", "ff_context.net.2": "text.ffn.out"}
_SINGLE = {"norm.linear": "mod", "attn.to_q": "q", "attn.to_k": "k", "attn.to_v": "v",
           "proj_mlp": "ffn.in", "proj_out": "out"}
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def transformer_parts(transformer: nn.Module) -> dict[str, nn.Module]:
    """The transformer's parts by stable name: the inputs, double blocks, single blocks, the output."""
    found: dict[str, nn.Module] = {}
    order: dict[str, tuple] = {}
    for path, module in transformer.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        m = _BLOCK.match(path)
        if path in _TOP_IN:
            name, key = _TOP_IN[path], (0, list(_TOP_IN).index(path))
        elif path in _TOP_OUT:
            name, key = _TOP_OUT[path], (3, list(_TOP_OUT).index(path))
        elif m and m.group(3) in (_DOUBLE if m.group(1) == "transformer_blocks" else _SINGLE):
            double = m.group(1) == "transformer_blocks"
            table = _DOUBLE if double else _SINGLE
            name = f"dit.{m.group(2)}.{table[m.group(3)]}" if double else f"dit.single.{m.group(2)}.{table[m.group(3)]}"
            key = (1 if double else 2, int(m.group(2)), list(table).index(m.group(3)))
        else:
            name, key = "dit.extra." + path.replace(".", "_"), (4, path)
        if name in found:
            raise TypeError(f"two modules of {type(transformer).__name__} would both be named {name!r}")
        found[name], order[name] = module, key
    return {n: found[n] for n in sorted(found, key=lambda n: order[n])}


#: parts per pipeline, with the ids of the modules they were read from (recomputed when those are replaced).
_PARTS: "weakref.WeakKeyDictionary[object, tuple[tuple[int, ...], dict[str, nn.Module]]]" = weakref.WeakKeyDictionary()


class MMDiT(EncodedByStates, StableDiffusion):
    """The shared adapter of FLUX.1 and SD 3 (``transformer`` with joint attention, flow matching).

    Subclasses give the encoders (:attr:`ENCODERS`), how prompts become a :class:`Conditioning`
    (:meth:`_states`), the denoiser call (:meth:`_forward`) and the sampler's arguments (:meth:`draw`).
    """

    #: The rows of the token conditioning: ``(encoder, first row)`` per run of rows one tokenizer made.
    SEGMENTS: tuple[tuple[str, int], ...] = ()
    #: The T5 encoder's token count, as the pipeline's ``max_sequence_length`` default.
    T5_LENGTH = 512
    #: Timesteps (0..1000) at which a block's text keys are captured for closed-form edits.
    KEY_TIMESTEPS = (750.0, 500.0, 250.0)

    #: The class name of the family's transformer.
    TRANSFORMER = ""

    @classmethod
    def matches(cls, pipe) -> bool:
        dit = getattr(pipe, "transformer", None)
        return (type(dit).__name__ == cls.TRANSFORMER and getattr(pipe, "text_encoder", None) is not None
                and getattr(pipe, "text_encoder_2", None) is not None)

    def denoiser(self, pipe) -> nn.Module:
        return pipe.transformer

    def components(self, pipe) -> dict[str, nn.Module]:
        encoders = {e: getattr(pipe, e) for e, _ in self.ENCODERS.values()}
        return {"transformer": pipe.transformer, **encoders, "vae": pipe.vae}

    def parts(self, pipe) -> dict[str, nn.Module]:
        key = (*(id(e) for e in self.encoders(pipe).values()), id(pipe.transformer))
        cached = _PARTS.get(pipe)
        if cached is None or cached[0] != key:
            found: dict[str, nn.Module] = {}
            for prefix, encoder in self.encoders(pipe).items():
                found |= _text_parts(prefix, encoder)
            cached = (key, found | transformer_parts(pipe.transformer))
            _PARTS[pipe] = cached
        return dict(cached[1])

    def tokenize(self, pipe, prompts: Sequence[str], padding: str = "max_length",
                 encoder: str = "text") -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizers(pipe)[encoder]
        module = self._encoder(pipe, encoder)
        limit = tok.model_max_length
        if type(module).__name__.startswith("T5"):
            limit = min(limit, self.T5_LENGTH)
        out = tok(list(prompts), padding=padding, max_length=limit, truncation=True, return_tensors="pt")
        return out.input_ids, out.attention_mask

    def _states(self, pipe, ids, params) -> Conditioning:
        raise NotImplementedError

    def _t5(self, pipe, encoder: str, ids, params, n: int) -> torch.Tensor:
        """T5's last hidden state of ``ids[encoder]`` (zeros of the transformer's width when absent)."""
        module = self.encoders(pipe).get(encoder)
        if module is None:
            width = pipe.transformer.config.joint_attention_dim
            return torch.zeros(n, self.T5_LENGTH, width, device=pipe.transformer.device)
        tokens, _ = ids[encoder]
        return self._call(pipe, module, params, (tokens.to(module.device),), {})[0]

    def hidden_states(self, pipe, ids: torch.Tensor, mask: torch.Tensor, encoder: str = "text") -> tuple[torch.Tensor, ...]:
        module = self._encoder(pipe, encoder)
        if not type(module).__name__.startswith("T5"):
            return super().hidden_states(pipe, ids, mask, encoder)
        states = module(ids.to(module.device), output_hidden_states=True).hidden_states
        norm = module.encoder.final_layer_norm  # T5 gives its last layer's output already normed
        return (*(norm(h) for h in states[:-1]), states[-1])

    def input_embeddings(self, pipe, encoder: str = "text") -> nn.Embedding:
        """The embedding table ``encoder``'s forward pass calls: T5's encoder holds its own module (its
        weight tied to ``shared``, the one ``get_input_embeddings`` gives), so a hook must go on that."""
        module = self._encoder(pipe, encoder)
        inner = getattr(getattr(module, "encoder", None), "embed_tokens", None)
        return inner if isinstance(inner, nn.Embedding) else module.get_input_embeddings()

    def padding_is_invisible(self, pipe, encoder: str = "text") -> bool:
        """CLIP's causal attention hides padding from real tokens; the pipelines run T5 without a mask."""
        return type(self._encoder(pipe, encoder)).__name__.startswith("CLIPText")

    def empty(self, pipe, n: int = 1) -> Conditioning:
        dit = pipe.transformer
        return self.encode(pipe, [""]).to(dit.device, dit.dtype).expand(n)

    # image side
    def latent_shape(self, pipe) -> tuple[int, int, int]:
        side = self.image_size(pipe) // pipe.vae_scale_factor
        return (pipe.vae.config.latent_channels, side, side)

    def image_latents(self, pipe, pixels: torch.Tensor, sample: torch.Generator | None = None) -> torch.Tensor:
        """VAE latents of ``pixels`` (0..255), shifted and scaled as the transformer sees them."""
        dist = pipe.vae.encode(pixels.to(pipe.vae.device, pipe.vae.dtype) / 127.5 - 1).latent_dist
        z = dist.mean
        if sample is not None:
            z = z + dist.std * torch.randn(z.shape, generator=sample, dtype=torch.float32).to(z.device, z.dtype)
        shift = pipe.vae.config.get("shift_factor") or 0.0
        return (z - shift) * pipe.vae.config.scaling_factor

    def added(self, pipe, cond: Conditioning) -> dict[str, Any]:
        if cond.pooled is None:
            raise ValueError(f"{self.name}'s transformer needs a pooled text embedding beside the token rows: give a "
                             "Conditioning (workbench.embed.conditioning(pipe, prompts)), not token rows alone")
        return {}

    def denoise(self, pipe, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                params: dict[str, torch.Tensor] | None = None, guidance: float | None = None) -> torch.Tensor:
        """The velocity at ``latents`` ``[n, c, h, w]`` and timestep ``t`` (0..1000); ``guidance`` is the
        distilled guidance of a model that takes one (FLUX.1-dev; default: the pipeline's own, 3.5)."""
        dit = pipe.transformer
        cond = cond.to(dit.device, dit.dtype)
        self.added(pipe, cond)
        t = torch.as_tensor(t, device=dit.device).to(dit.dtype).reshape(-1).expand(len(latents))
        return self._forward(pipe, latents.to(dit.dtype), t, cond, params, guidance)

    def _forward(self, pipe, latents, t, cond, params, guidance) -> torch.Tensor:
        raise NotImplementedError

    def _to_draw(self, pipe, cond: Conditioning, negative: Conditioning,
                 size: int | None) -> tuple[Conditioning, Conditioning, int]:
        """Both conditionings on the transformer's device and dtype (refused without a pooled vector),
        and the side to draw at (default: the model's own)."""
        dit = pipe.transformer
        self.added(pipe, cond)
        return cond.to(dit.device, dit.dtype), negative.to(dit.device, dit.dtype), size or self.image_size(pipe)

    def distilled(self, pipe) -> bool:
        """Whether the model takes its guidance as an input (FLUX.1-dev) rather than from two branches."""
        return False

    def _shift(self, pipe) -> float:
        """The sampler's time shift at the model's own image size (FLUX's resolution-dependent one)."""
        config = pipe.scheduler.config
        if not config.get("use_dynamic_shifting"):
            return float(config.get("shift", 1.0))
        seq = math.prod(self.latent_shape(pipe)[1:]) // 4
        lo, hi = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        mu = config.get("base_shift", 0.5) + (seq - lo) * (config.get("max_shift", 1.15) - config.get("base_shift", 0.5)) / (hi - lo)
        return math.exp(mu)

    def sampling_scheduler(self, pipe, kind: str = "ddim"):
        """A fresh flow-matching Euler sampler of the pipeline's schedule, its shift fixed at the model's
        image size (every ``kind`` gets it: flow models have no DDIM)."""
        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=False,
                                                           shift=self._shift(pipe))

    def scheduler(self, pipe):
        return self.sampling_scheduler(pipe)

    def training_pair(self, pipe, clean: torch.Tensor, noise: torch.Tensor,
                      t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = (t.float() / self.train_timesteps(pipe)).reshape(-1, *([1] * (clean.ndim - 1))).to(clean.device)
        noisy = ((1 - sigma) * clean.float() + sigma * noise.float()).to(clean.dtype)
        return noisy, (noise.float() - clean.float()).to(clean.dtype)

    def train_timesteps(self, pipe) -> int:
        return pipe.scheduler.config.num_train_timesteps

    def noise(self, pipe, generator: torch.Generator, side: int | None = None) -> torch.Tensor:
        c, h, w = self.latent_shape(pipe)
        dit = pipe.transformer
        return randn_tensor((1, c, side or h, side or w), generator=generator, device=dit.device, dtype=dit.dtype)

    # where text meets image
    def cross_attention(self, pipe) -> dict[str, nn.Module]:
        """Every joint attention (``dit.{i}``) and single-stream attention (``dit.single.{j}``)."""
        dit = pipe.transformer
        out = {f"dit.{i}": block.attn for i, block in enumerate(dit.transformer_blocks)}
        return out | {f"dit.single.{j}": block.attn for j, block in enumerate(getattr(dit, "single_transformer_blocks", ()))}

    def blocks(self, pipe) -> dict[str, nn.Module]:
        dit = pipe.transformer
        out = {f"dit.{i}": block for i, block in enumerate(dit.transformer_blocks)}
        return out | {f"dit.single.{j}": block for j, block in enumerate(getattr(dit, "single_transformer_blocks", ()))}

    def text_entries(self, pipe) -> dict[str, str]:
        """Every matrix that reads text directly, by part name -> the space of its inputs: ``"tokens"``
        (the conditioning's token rows), ``"pooled"`` (the pooled vector) or ``"dit.{i}.text"`` (what
        block i's text stream feeds its k/v: captured in a forward pass)."""
        out = {"dit.context.proj": "tokens", "dit.pooled.in": "pooled"}
        for name in self.parts(pipe):
            m = re.match(r"^(dit\.\d+\.text)\.[kv]$", name)
            if m:
                out[name] = m.group(1)
        return out

    def default_entries(self, pipe) -> list[str]:
        """The matrices UCE and RECE edit by default: where text enters (UCE's code for FLUX)."""
        return ["dit.context.proj", "dit.pooled.in"]

    def row_segments(self, pipe) -> tuple[tuple[str, int], ...]:
        return self.SEGMENTS


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[n, c, h, w]`` -> FLUX's ``[n, h/2 * w/2, 4c]`` sequence of 2x2 patches.

    >>> x = torch.randn(1, 4, 6, 8)
    >>> unpack(pack(x), 6, 8).equal(x)
    True
    """
    n, c, h, w = latents.shape
    x = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack` for latents of side ``h`` x ``w``."""
    n, _, d = tokens.shape
    x = tokens.view(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, d // 4, h, w)
