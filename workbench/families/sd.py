"""Stable Diffusion 1.x / 2.x (and the toy model, which is built the same way): one CLIP or BERT text
encoder and a ``UNet2DConditionModel`` with cross-attention. Its part naming (text-encoder layers and
UNet modules) is shared with SDXL.

>>> import workbench
>>> from workbench.families import family_of
>>> pipe = workbench.load("toy")
>>> family = family_of(pipe)
>>> family.encode(pipe, ["an apple"]).tokens.shape, family.latent_shape(pipe)
(torch.Size([1, 20, 384]), (4, 16, 16))
"""
from __future__ import annotations

import re
import weakref
from typing import Any, Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import nn
from torch.func import functional_call

from .base import Conditioning, Family, register

_TEXT_LAYERS: tuple[dict[str, str], ...] = (
    {  # CLIP
        "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
        "attn.out": "self_attn.out_proj", "ffn.in": "mlp.fc1", "ffn.out": "mlp.fc2",
    },
    {  # BERT
        "attn.q": "attention.self.query", "attn.k": "attention.self.key",
        "attn.v": "attention.self.value", "attn.out": "attention.output.dense",
        "ffn.in": "intermediate.dense", "ffn.out": "output.dense",
    },
    {  # T5 v1.1 (gated feed-forward: FLUX's and SD 3's T5-XXL)
        "attn.q": "layer.0.SelfAttention.q", "attn.k": "layer.0.SelfAttention.k",
        "attn.v": "layer.0.SelfAttention.v", "attn.out": "layer.0.SelfAttention.o",
        "ffn.in": "layer.1.DenseReluDense.wi_0", "ffn.gate": "layer.1.DenseReluDense.wi_1",
        "ffn.out": "layer.1.DenseReluDense.wo",
    },
    {  # T5
        "attn.q": "layer.0.SelfAttention.q", "attn.k": "layer.0.SelfAttention.k",
        "attn.v": "layer.0.SelfAttention.v", "attn.out": "layer.0.SelfAttention.o",
        "ffn.in": "layer.1.DenseReluDense.wi", "ffn.out": "layer.1.DenseReluDense.wo",
    },
)
_XATTN = re.compile(r"^(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2$"
                    r"|^mid_block\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2$")
#: A diffusers UNet path: the block (down_blocks.b / mid_block / up_blocks.b) and what lies inside it.
_UNET_PATH = re.compile(r"^(?:(down|up)_blocks\.(\d+)|(mid)_block)\.(.+)$")
#: Inside a block: a ResNet, an attention's projections or transformer parts, or the resampler.
_IN_BLOCK = (
    (re.compile(r"^resnets\.(\d+)\.(conv1|time_emb_proj|conv2|conv_shortcut)$"), "res"),
    (re.compile(r"^attentions\.(\d+)\.(proj_in)$"), "proj"),
    (re.compile(r"^attentions\.(\d+)\.transformer_blocks\.(\d+)\.(attn1|attn2|ff)\.(.+)$"), "transformer"),
    (re.compile(r"^attentions\.(\d+)\.(proj_out)$"), "proj"),
    (re.compile(r"^(downsamplers|upsamplers)\.0\.conv$"), "sample"),
)
_SHORT = {"conv1": "conv1", "time_emb_proj": "time", "conv2": "conv2", "conv_shortcut": "skip", "proj_in": "in",
          "proj_out": "out", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out", "net.0.proj": "in",
          "net.2": "out"}
_TOP = {"time_embedding.linear_1": ("time", "mlp.in"), "time_embedding.linear_2": ("time", "mlp.out"),
        "conv_in": ("in", "conv"), "conv_out": ("out", "conv"),
        "add_embedding.linear_1": ("time", "added.in"), "add_embedding.linear_2": ("time", "added.out")}


def _get(root: nn.Module, path: str) -> nn.Module:
    for attr in path.split("."):
        root = root[int(attr)] if attr.isdigit() else getattr(root, attr)
    return root


def _text_layers(encoder: nn.Module) -> tuple[nn.ModuleList, dict[str, str]]:
    """The encoder's list of transformer layers and the paths of its parts inside a layer."""
    for _, module in encoder.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            for inner in _TEXT_LAYERS:
                try:
                    [_get(module[0], path) for path in inner.values()]
                except (AttributeError, IndexError):
                    continue
                return module, inner
    raise TypeError(f"unsupported text encoder {type(encoder).__name__}: the workbench knows CLIP, BERT and T5")




def _text_parts(prefix: str, encoder: nn.Module) -> dict[str, nn.Module]:
    layers, inner = _text_layers(encoder)
    return {f"{prefix}.{i}.{short}": _get(layer, path) for i, layer in enumerate(layers) for short, path in inner.items()}


def unet_parts(unet: nn.Module) -> dict[str, nn.Module]:
    """The UNet's parts by stable name, in the order data flows."""
    found = [(_unet_name(path), module) for path, module in unet.named_modules()
             if isinstance(module, (nn.Linear, nn.Conv2d))]
    out: dict[str, nn.Module] = {}
    for (_, name), module in sorted(found, key=lambda f: f[0][0]):
        if name in out:
            raise TypeError(f"two modules of {type(unet).__name__} would both be named {name!r}")
        out[name] = module
    return out


def has_cross_attention(unet: nn.Module) -> bool:
    return any(_XATTN.match(name) for name, _ in unet.named_modules())


def _final_norm(encoder: nn.Module) -> nn.Module | None:
    """CLIP's final layer norm (its hidden states are not conditioning-ready without it); None for BERT,
    whose layers already end in a layer norm."""
    for owner in (encoder, getattr(encoder, "text_model", None)):
        norm = getattr(owner, "final_layer_norm", None)
        if isinstance(norm, nn.Module):
            return norm
    return None


def masked(encoder: nn.Module) -> bool:
    """Whether the encoder takes an attention mask (BERT) rather than ignoring padding by itself (CLIP)."""
    return bool(getattr(encoder.config, "use_attention_mask", False))


#: parts per pipeline, with the ids of the modules they were read from (recomputed when those are replaced).
_PARTS: "weakref.WeakKeyDictionary[object, tuple[tuple[int, ...], dict[str, nn.Module]]]" = weakref.WeakKeyDictionary()


@register
class StableDiffusion(Family):
    """SD 1.x / 2.x: ``text_encoder`` (CLIP or BERT), ``tokenizer``, ``unet`` with cross-attention."""

    name = "sd"
    description = "one CLIP or BERT text encoder and a UNet2DConditionModel with cross-attention (SD 1.x/2.x, the toy)"
    #: The pipeline attributes of the text encoders, by part-name prefix.
    ENCODERS = {"text": ("text_encoder", "tokenizer")}

    @classmethod
    def matches(cls, pipe) -> bool:
        unet = getattr(pipe, "unet", None)
        return (all(getattr(pipe, e, None) is not None for e, _ in cls.ENCODERS.values())
                and getattr(pipe, "text_encoder_3", None) is None
                and (getattr(pipe, "text_encoder_2", None) is None) == ("text2" not in cls.ENCODERS)
                and unet is not None and hasattr(unet, "config") and has_cross_attention(unet))

    def encoders(self, pipe) -> dict[str, nn.Module]:
        return {k: getattr(pipe, e) for k, (e, _) in self.ENCODERS.items()}

    def tokenizers(self, pipe) -> dict[str, Any]:
        return {k: getattr(pipe, t) for k, (_, t) in self.ENCODERS.items()}

    def denoiser(self, pipe) -> nn.Module:
        return pipe.unet

    def components(self, pipe) -> dict[str, nn.Module]:
        return {"unet": pipe.unet, **{e: getattr(pipe, e) for e, _ in self.ENCODERS.values()}, "vae": pipe.vae}

    def parts(self, pipe) -> dict[str, nn.Module]:
        key = (*(id(e) for e in self.encoders(pipe).values()), id(pipe.unet))
        try:
            cached = _PARTS.get(pipe)
        except TypeError:
            return self._find(pipe)
        if cached is None or cached[0] != key:
            cached = (key, self._find(pipe))
            _PARTS[pipe] = cached
        return dict(cached[1])

    def _find(self, pipe) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {}
        for prefix, encoder in self.encoders(pipe).items():
            out |= _text_parts(prefix, encoder)
        return out | unet_parts(pipe.unet)

    def text_layers(self, pipe, encoder: str = "text") -> nn.ModuleList:
        return _text_layers(self._encoder(pipe, encoder))[0]

    def _encoder(self, pipe, encoder: str) -> nn.Module:
        encoders = self.encoders(pipe)
        if encoder not in encoders:
            raise ValueError(f"this model has no text encoder {encoder!r}; its text encoders: {', '.join(encoders)}")
        return encoders[encoder]

    def tokenize(self, pipe, prompts: Sequence[str], padding: str = "max_length",
                 encoder: str = "text") -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizers(pipe)[encoder]
        prompts = list(prompts)
        if hasattr(pipe, "maybe_convert_prompt"):
            prompts = pipe.maybe_convert_prompt(prompts, tok)
        out = tok(prompts, padding=padding, max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        return out.input_ids, out.attention_mask

    def encode(self, pipe, prompts: Sequence[str]) -> Conditioning:
        return Conditioning(pipe.encode_prompt(list(prompts), pipe.text_encoder.device, 1,
                                               do_classifier_free_guidance=False)[0])

    def conditioning(self, pipe, ids: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     params: dict[str, torch.Tensor] | None = None) -> Conditioning:
        encoder = pipe.text_encoder
        tokens, mask = ids["text"]
        kwargs = {"attention_mask": mask.to(encoder.device) if masked(encoder) else None}
        return Conditioning(self._call(pipe, encoder, params, (tokens.to(encoder.device),), kwargs)[0])

    def _call(self, pipe, module: nn.Module, params: dict[str, torch.Tensor] | None, args: tuple, kwargs: dict):
        """``module(*args, **kwargs)``, with ``params`` (part keys) standing in for its parameters."""
        if not params:
            return module(*args, **kwargs)
        inside = {id(m): n for n, m in module.named_modules()}
        table = self.parts(pipe)
        mine = {}
        for key, value in params.items():
            part, attr = key.rsplit(".", 1)
            path = inside.get(id(table[part]))
            if path is not None:
                mine[f"{path}.{attr}"] = value
        return functional_call(module, mine, args, kwargs) if mine else module(*args, **kwargs)

    def hidden_states(self, pipe, ids: torch.Tensor, mask: torch.Tensor, encoder: str = "text") -> tuple[torch.Tensor, ...]:
        module = self._encoder(pipe, encoder)
        result = module(ids.to(module.device), attention_mask=mask.to(module.device) if masked(module) else None,
                        output_hidden_states=True)
        norm = _final_norm(module)
        return tuple(result.hidden_states) if norm is None else tuple(norm(h) for h in result.hidden_states)

    def padding_is_invisible(self, pipe, encoder: str = "text") -> bool:
        """Whether real tokens' outputs ignore trailing padding: masked attention, or CLIP's causal attention."""
        module = self._encoder(pipe, encoder)
        return masked(module) or type(module).__name__.startswith("CLIPText")

    def empty(self, pipe, n: int = 1) -> Conditioning:
        return self.encode(pipe, [""]).to(pipe.unet.device, pipe.unet.dtype).expand(n)

    def latent_shape(self, pipe) -> tuple[int, int, int]:
        size = pipe.unet.config.sample_size
        return (pipe.unet.config.in_channels, size, size)

    def image_size(self, pipe) -> int:
        return pipe.unet.config.sample_size * pipe.vae_scale_factor

    def image_latents(self, pipe, pixels: torch.Tensor, sample: torch.Generator | None = None) -> torch.Tensor:
        """VAE latents of ``pixels`` ``[n, 3, h, w]`` in 0..255, scaled as the denoiser sees them:
        posterior means, or one draw from each posterior with the generator ``sample``."""
        dist = pipe.vae.encode(pixels.to(pipe.vae.device, pipe.vae.dtype) / 127.5 - 1).latent_dist
        z = dist.mean
        if sample is not None:  # mean + std * noise, the noise drawn on the generator's device
            z = z + dist.std * torch.randn(z.shape, generator=sample, dtype=torch.float32).to(z.device, z.dtype)
        return z * pipe.vae.config.scaling_factor

    def added(self, pipe, cond: Conditioning) -> dict[str, Any]:
        """The UNet's keyword arguments beside the token rows (none for SD)."""
        return {}

    def denoise(self, pipe, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                params: dict[str, torch.Tensor] | None = None, guidance: float | None = None) -> torch.Tensor:
        unet = pipe.unet
        cond = cond.to(unet.device, unet.dtype)
        kwargs = {"encoder_hidden_states": cond.tokens, **self.added(pipe, cond)}
        return self._call(pipe, unet, params, (latents, t), kwargs).sample

    def sampling_scheduler(self, pipe, kind: str = "ddim"):
        """A fresh sampler of the pipeline's noise schedule (``"ddim"``: what ESD's partial sampling uses)."""
        if kind != "ddim":
            raise ValueError(f"unknown sampler {kind!r}; this family has 'ddim'")
        return DDIMScheduler.from_config(pipe.scheduler.config)

    def scheduler(self, pipe) -> DDPMScheduler:
        """A training scheduler of the pipeline's noise schedule (``add_noise`` at any timestep)."""
        return DDPMScheduler.from_config(pipe.scheduler.config)

    def training_pair(self, pipe, clean: torch.Tensor, noise: torch.Tensor,
                      t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sched = self.scheduler(pipe)
        noisy = sched.add_noise(clean, noise, t)
        velocity = sched.config.prediction_type == "v_prediction"
        return noisy, sched.get_velocity(clean, noise, t) if velocity else noise

    def train_timesteps(self, pipe) -> int:
        return self.scheduler(pipe).config.num_train_timesteps

    def draw(self, pipe, cond: Conditioning, negative: Conditioning, steps: int, guidance: float,
             generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
             size: int | None = None) -> list[Image.Image]:
        unet = pipe.unet
        cond, negative = cond.to(unet.device, unet.dtype), negative.to(unet.device, unet.dtype)
        kwargs = {} if size is None else {"height": size, "width": size}
        if cond.pooled is not None:
            kwargs |= {"pooled_prompt_embeds": cond.pooled, "negative_pooled_prompt_embeds": negative.pooled}
        return pipe(prompt_embeds=cond.tokens, negative_prompt_embeds=negative.tokens, num_inference_steps=steps,
                    guidance_scale=guidance, generator=generator, latents=latents, **kwargs).images

    def noise(self, pipe, generator: torch.Generator, side: int | None = None) -> torch.Tensor:
        """One image's starting latent as the pipeline draws it from ``generator`` (``side``: latent side)."""
        c, h, w = self.latent_shape(pipe)
        shape = (1, c, side or h, side or w)
        return randn_tensor(shape, generator=generator, device=pipe.unet.device, dtype=pipe.unet.dtype)

    def cross_attention(self, pipe) -> dict[str, nn.Module]:
        owner = {id(getattr(m, "to_k", None)): m for m in pipe.unet.modules() if hasattr(m, "processor")}
        return {name[:-len(".xattn.k")]: owner[id(module)] for name, module in self.parts(pipe).items()
                if name.endswith(".xattn.k")}

    def text_entries(self, pipe) -> dict[str, str]:
        return {name: "tokens" for name in self.parts(pipe) if name.endswith((".xattn.k", ".xattn.v"))}

    def default_entries(self, pipe) -> list[str]:
        return list(self.text_entries(pipe))

    def row_segments(self, pipe) -> tuple[tuple[str, int], ...]:
        return (("text", 0),)

    def blocks(self, pipe) -> dict[str, nn.Module]:
        unet = pipe.unet
        return {**{f"unet.down.{b}": m for b, m in enumerate(unet.down_blocks)}, "unet.mid": unet.mid_block,
                **{f"unet.up.{b}": m for b, m in enumerate(unet.up_blocks)}}


class EncodedByStates:
    """``encode`` and ``conditioning`` of a family whose adapter builds the conditioning itself from every
    encoder's token ids (``_states(pipe, ids, params)``), not through the pipeline's ``encode_prompt``."""

    def encode(self, pipe, prompts: Sequence[str]) -> Conditioning:
        with torch.no_grad():
            return self._states(pipe, {k: self.tokenize(pipe, prompts, encoder=k) for k in self.encoders(pipe)}, None)

    def conditioning(self, pipe, ids: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     params: dict[str, torch.Tensor] | None = None) -> Conditioning:
        return self._states(pipe, ids, params)


def _unet_name(path: str) -> tuple[tuple, str]:
    """(sort key in network order, stable name) of the UNet module at diffusers ``path``."""
    if path in _TOP:
        layer, rest = _TOP[path]
        return ((("time", "in", "", "", "", "out").index(layer),), f"unet.{layer}.{rest}")
    m = _UNET_PATH.match(path)
    if m:
        kind = m.group(1) or m.group(3)
        block = (int(m.group(2)),) if m.group(2) else ()
        for order, (pattern, what) in enumerate(_IN_BLOCK):
            hit = pattern.match(m.group(4))
            if hit:
                return _in_block(kind, block, order, what, hit.groups())
    return ((9, path), "unet.extra." + path.replace(".", "_"))


def _in_block(kind: str, block: tuple, order: int, what: str, groups: tuple) -> tuple[tuple, str]:
    """Sort key and name of a part inside a down, mid or up block (``groups``: the path's matches)."""
    where = (2 + ("down", "mid", "up").index(kind), *block)
    prefix = ".".join(["unet", kind, *map(str, block)])
    if what == "sample":
        return ((*where, 10**6), f"{prefix}.sample.conv")
    i = int(groups[0])
    if what == "res":
        return ((*where, i, 0, _SHORT_ORDER.index(groups[1])), f"{prefix}.{i}.res.{_SHORT[groups[1]]}")
    if what == "proj":
        return ((*where, i, 1 if groups[1] == "proj_in" else 10**6), f"{prefix}.{i}.proj.{_SHORT[groups[1]]}")
    t, module, leaf = int(groups[1]), groups[2], groups[3]
    component = {"attn1": "attn", "attn2": "xattn", "ff": "ffn"}[module]
    name = f"{prefix}.{i}" + (f".t{t}" if t else "") + f".{component}.{_SHORT.get(leaf, leaf.replace('.', '_'))}"
    leaves = ("to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2")
    rank = leaves.index(leaf) if leaf in leaves else len(leaves)
    return ((*where, i, 2 + t, ("attn1", "attn2", "ff").index(module), rank), name)


_SHORT_ORDER = ("conv1", "time_emb_proj", "conv2", "conv_shortcut")


