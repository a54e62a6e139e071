"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023), fine-tuning denoiser parts
(a UNet's, or a transformer's on FLUX.1 and SD 3).

Each iteration draws a latent x_t by partial sampling: the model being trained denoises fresh noise,
guided towards the concept, for a random number k of the ``sample_steps`` DDIM steps; t is the
timestep it stopped at. The frozen model then predicts the noise of x_t without and with the concept,
eps(x_t) and eps(x_t, c), and the selected parts are trained so that the model's prediction with the
concept follows the negatively guided one::

    eps_new(x_t, c)  ->  eps(x_t) - eta * (eps(x_t, c) - eps(x_t))      (mean squared error, Adam)

On a flow-matching transformer (FLUX.1, SD 3) the predictions are velocities and x_t comes from the
model's flow-matching Euler sampler; the loss is the same. Which parts train is a preset of the ESD
authors' code, or any selector (:mod:`workbench.anatomy`):

================  ==================================================================
``esd-x``         every cross-attention matrix (``unet.*.xattn``: q, k, v, out)
``esd-x-strict``  cross-attention k and v only (``unet.*.xattn.[kv]``)
``esd-u``         every UNet part except cross-attention
``esd-all``       every Linear and convolution of the UNet
================  ==================================================================

A transformer has no cross-attention: text enters the image tokens' attention through each joint
(double) block's text stream, whose keys and values the image queries attend to. The workbench's
analogue of the presets (:data:`DIT_PRESETS`), its choice:

================  ==================================================================
``esd-x``         the text stream's attention matrices of every double block
                  (``dit.*.text.{q,k,v,out}``)
``esd-x-strict``  their keys and values only (``dit.*.text.[kv]``)
``esd-u``         every transformer part except those (image stream, FFNs, modulations,
                  single blocks, ``dit.context.proj``, the embedders, the output)
``esd-all``       every Linear and convolution of the transformer (``dit.*``)
================  ==================================================================

FLUX.1-dev takes its guidance as an input (guidance-distilled): there the partial sampling runs *one*
pass per step with the distilled guidance ``sample_guidance`` instead of two branches with classifier-free
guidance, and the frozen model's eps(x_t) and eps(x_t, c) (the empty prompt and the concept) and the
trained prediction all take the pipeline's default distilled guidance (3.5), the workbench's choice for
guidance-distilled models. SD 3 and models without a guidance input keep classifier-free guidance.

As in the reference code, a part is a Linear or Conv2d with its bias; normalisation layers stay. The
parts train as float32 master copies while the forward passes run in the pipeline's dtype and device
(as few-shot unlearning does), so a float16 or bfloat16 pipeline loses no update below its weights'
last bit; the pipeline itself is never changed. The defaults are the paper's: Adam at lr 1e-5, 1,000
iterations of batch 1, eta 1, x_t from up to 50 DDIM steps with guidance 3. As in the reference code,
the loss's timestep t is drawn near k/50 of the training schedule (0..1000 on every family) after k sampling steps from noise
(``timestep="reference"``), although those k steps leave x_t at the other end of the noise scale;
``timestep="reached"`` uses the timestep the partial sampling stopped at instead (the README compares
the two on the toy model).

>>> import workbench
>>> from workbench.methods import esd
>>> pipe = workbench.load("toy")
>>> edit = esd(pipe, "apple", preset="esd-x-strict", iterations=2, sample_steps=4, progress=False)
>>> sorted({p.rsplit(".", 1)[1] for p in edit.parts})
['k', 'v']
"""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..anatomy import Selector, as_list, component_of, parts as all_parts, select, text_encoders
from ..edits import Edit, Timer, parameter
from ..embed import check_prompt, conditioning
from ..families import Conditioning, family_of
from ..hooks import frozen, trainable_attention
from ..sampling import seeded

#: How t is chosen for the loss: the reference code's pairing, or the timestep partial sampling reached.
TIMESTEPS = ("reference", "reached")
#: The ESD authors' parameter presets (``esd-u`` is every UNet part outside cross-attention).
PRESETS: dict[str, str] = {
    "esd-x": "every cross-attention matrix (unet.*.xattn)",
    "esd-x-strict": "cross-attention k and v (unet.*.xattn.[kv])",
    "esd-u": "every UNet part except cross-attention",
    "esd-all": "every Linear and convolution of the UNet (unet.*)",
}
#: The same presets on a transformer (FLUX.1, SD 3): the joint blocks' text stream stands for cross-attention.
DIT_PRESETS: dict[str, str] = {
    "esd-x": "the text-stream attention of every double block (dit.*.text.{q,k,v,out})",
    "esd-x-strict": "the text stream's keys and values (dit.*.text.[kv])",
    "esd-u": "every transformer part except the text-stream attention",
    "esd-all": "every Linear and convolution of the transformer (dit.*)",
}
#: The components of a double block's text-stream attention (:func:`~workbench.anatomy.component_of`).
_TEXT_ATTENTION = ("text.q", "text.k", "text.v", "text.out")


def _transformer(pipe) -> bool:
    """Whether the denoiser is a transformer (``dit.*`` parts) rather than a UNet."""
    return any(n.startswith("dit.") for n in all_parts(pipe))


def presets(pipe) -> dict[str, str]:
    """What each ESD preset trains on ``pipe``'s family (:data:`PRESETS` or :data:`DIT_PRESETS`).

    >>> import workbench
    >>> presets(workbench.load("toy"))["esd-x-strict"]
    'cross-attention k and v (unet.*.xattn.[kv])'
    """
    return DIT_PRESETS if _transformer(pipe) else PRESETS


def preset_parts(pipe, preset: str) -> list[str]:
    """The part names an ESD preset trains on ``pipe``.

    >>> import workbench
    >>> pipe = workbench.load("toy")
    >>> [len(preset_parts(pipe, p)) for p in PRESETS]
    [28, 14, 104, 132]
    """
    table = presets(pipe)
    if preset not in table:
        raise ValueError(f"unknown ESD preset {preset!r}; on this model ({family_of(pipe).name}) choose one of "
                         + "; ".join(f"{k}: {v}" for k, v in table.items()) + ", or give parts=<selector>")
    if table is DIT_PRESETS:
        dit = select(pipe, "dit.*")
        text = [n for n in dit if component_of(n) in _TEXT_ATTENTION]
        if preset == "esd-all":
            return dit
        if preset == "esd-u":
            return [n for n in dit if n not in text]
        return text if preset == "esd-x" else [n for n in text if component_of(n) in ("text.k", "text.v")]
    unet = select(pipe, "unet.*")
    if preset == "esd-all":
        return unet
    if preset == "esd-u":
        return [n for n in unet if not component_of(n).startswith("xattn.")]
    return select(pipe, "unet.*.xattn" if preset == "esd-x" else ["unet.*.xattn.k", "unet.*.xattn.v"])


def _denoiser_parts(pipe, preset: str, parts: Selector | None) -> list[str]:
    names = preset_parts(pipe, preset) if parts is None else select(pipe, parts)
    encoders = set(text_encoders(pipe))
    bad = [n for n in names if n.split(".")[0] in encoders]
    if bad:
        what, example = ("transformer", "dit.*.img.ffn") if _transformer(pipe) else ("UNet", "unet.*.ffn")
        raise ValueError(f"ESD trains {what} parts; {', '.join(bad[:4])} are text-encoder parts: use few-shot "
                         f"unlearning ('fewshot') for those, or a {what} selector such as {example!r}")
    return names


def _masters(pipe, names: list[str]) -> dict[str, torch.Tensor]:
    """Float32 trainable copies of the parts' parameters, keyed ``"<part>.<weight|bias>"``."""
    table = all_parts(pipe)
    return {f"{name}.{attr}": p.detach().float().clone().requires_grad_(True)
            for name in names for attr, p in table[name].named_parameters(recurse=False)}


class _Trainer:
    """The frozen denoiser, the trained masters, the conditions and the sampler of one ESD run."""

    def __init__(self, pipe, prompts: list[str], masters: dict[str, torch.Tensor], sample_steps: int,
                 sample_guidance: float, gen: torch.Generator, timestep: str = "reference") -> None:
        self.pipe, self.masters, self.gen = pipe, masters, gen
        self.family = family = family_of(pipe)
        self.timestep = timestep
        denoiser = family.denoiser(pipe)
        self.device, self.dtype = denoiser.device, denoiser.dtype
        emb = conditioning(pipe, ["", *prompts]).to(self.device, self.dtype)
        self.empty, self.concept = emb[:1], emb[1:]
        self.sched = family.sampling_scheduler(pipe, "ddim")
        self.sample_steps = sample_steps
        self.sched.set_timesteps(sample_steps, device=self.device)
        self.guidance = sample_guidance
        self.distilled = family.distilled(pipe)
        self.shape = family.latent_shape(pipe)

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: m.to(self.dtype) for k, m in self.masters.items()}

    def trained(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, weights: dict,
                guidance: float | None = None) -> torch.Tensor:
        return self.family.denoise(self.pipe, x, t, cond, weights, guidance=guidance)

    @torch.no_grad()
    def partial_sample(self, cond: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t after ``k`` guided sampling steps (DDIM, or flow-matching Euler) of the trained model from
        fresh noise, and t: classifier-free guidance, or one pass with the distilled guidance."""
        n = len(cond)
        x = torch.randn((n, *self.shape), generator=self.gen).to(self.device, self.dtype)
        sigma = getattr(self.sched, "init_noise_sigma", None)  # none on a flow-matching sampler: noise is x_1
        x = x * (1.0 if sigma is None else sigma)
        if getattr(self.sched, "step_index", None) is not None:  # a sampler that counts its steps starts over
            self.sched.set_timesteps(self.sample_steps, device=self.device)
        weights = self.weights()
        both = Conditioning.cat([self.empty.expand(n), cond])
        for t in self.sched.timesteps[:k]:
            if self.distilled:
                x = self.sched.step(self.trained(x, t, cond, weights, self.guidance), t, x).prev_sample
                continue
            eps = self.trained(torch.cat([x, x]), t, both, weights)
            uncond, guided = eps.chunk(2)
            x = self.sched.step(uncond + self.guidance * (guided - uncond), t, x).prev_sample
        return x, self.sched.timesteps[k]

    def reference_timestep(self, k: int) -> torch.Tensor:
        """The reference code's training timestep after ``k`` of S sampling steps: uniform in
        [k / S, (k + 1) / S) of the training schedule."""
        total, steps = self.sched.config.num_train_timesteps, len(self.sched.timesteps)
        lo, hi = round(k / steps * total), round((k + 1) / steps * total)
        return torch.randint(lo, max(hi, lo + 1), (1,), generator=self.gen)[0].to(self.device)

    def step(self, opt: torch.optim.Optimizer, batch: int, eta: float) -> float:
        """One iteration: partial sampling, the frozen model's target, one Adam step; returns the loss."""
        pick = torch.randint(len(self.concept), (batch,), generator=self.gen)
        cond = self.concept[pick.to(self.device)]
        k = int(torch.randint(len(self.sched.timesteps), (1,), generator=self.gen))
        x, t = self.partial_sample(cond, k)
        if self.timestep == "reference":
            t = self.reference_timestep(k)
        with torch.no_grad():
            both = Conditioning.cat([self.empty.expand(batch), cond])
            plain, with_concept = self.family.denoise(self.pipe, torch.cat([x, x]), t, both).float().chunk(2)
            target = plain - eta * (with_concept - plain)
        pred = self.trained(x, t, cond, self.weights())
        loss = (pred.float() - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _check(eta: float, lr: float, iterations: int, batch: int, sample_steps: int) -> None:
    problems = [f"{name} must be positive (got {value})"
                for name, value in (("lr", lr), ("iterations", iterations), ("batch", batch),
                                    ("sample_steps", sample_steps)) if not value > 0]
    if not eta == eta:  # NaN
        problems.append("eta must be a number (got nan)")
    if problems:
        raise ValueError("; ".join(problems) + "; nothing was changed")


def esd(pipe, concept: str, preset: str = "esd-x", parts: Selector | None = None,
        prompts: Sequence[str] | None = None, eta: float = 1.0, lr: float = 1e-5, iterations: int = 1000,
        batch: int = 1, sample_steps: int = 50, sample_guidance: float = 3.0, timestep: str = "reference",
        seed: int = 0, progress: bool = True) -> Edit:
    """Erase ``concept`` by fine-tuning the denoiser parts of ``preset`` (:func:`presets` says what each
    means on the model; the selector ``parts`` takes precedence) towards the frozen model's negatively
    guided prediction (see the module doc).

    ``prompts`` (default: the concept itself) are the conditions, one drawn per example;
    ``erase(pipe, concept, "esd")`` takes them from the model's concept set. ``eta`` is the negative
    guidance, ``lr`` Adam's learning rate, ``iterations`` the training steps of ``batch`` examples;
    x_t comes from ``sample_steps`` DDIM (flow-matching Euler) steps at guidance ``sample_guidance``
    (classifier-free, or the distilled guidance input of a guidance-distilled model); ``timestep`` is one of
    :data:`TIMESTEPS` (the module doc says how they differ). Every random draw
    comes from a generator seeded with ``seed``. The pipeline is not changed: apply the returned edit.
    """
    check_prompt(pipe, concept)
    prompts = as_list(prompts) if prompts is not None else [concept]
    names = _denoiser_parts(pipe, preset, parts)
    _check(eta, lr, iterations, batch, sample_steps)
    if timestep not in TIMESTEPS:
        raise ValueError(f"timestep cannot be {timestep!r}; choose one of {', '.join(TIMESTEPS)}; nothing was changed")
    with Timer() as timer:
        masters = _masters(pipe, names)
        trainer = _Trainer(pipe, prompts, masters, sample_steps, sample_guidance, seeded(seed), timestep)
        opt = torch.optim.Adam(masters.values(), lr=lr)
        with frozen(family_of(pipe).denoiser(pipe)), trainable_attention(pipe):
            losses = [trainer.step(opt, batch, eta)
                      for _ in tqdm(range(iterations), desc=f"ESD {concept}", disable=not progress)]
        table = all_parts(pipe)
        base = {k: parameter(table, k).detach() for k in masters}
    hyper = dict(preset=preset if parts is None else None, parts=names, prompts=prompts, eta=eta, lr=lr,
                 iterations=iterations, batch=batch, sample_steps=sample_steps, sample_guidance=sample_guidance,
                 timestep=timestep,
                 loss_first=_mean(losses[:max(1, len(losses) // 10)]), loss_last=_mean(losses[-max(1, len(losses) // 10):]))
    return Edit.between(base, {k: m.detach() for k, m in masters.items()}, method="esd", concept=concept,
                        params=hyper, seed=seed, seconds=timer.seconds)
