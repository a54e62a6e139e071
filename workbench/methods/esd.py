"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023), fine-tuning UNet parts.

Each iteration draws a latent x_t by partial sampling: the model being trained denoises fresh noise,
guided towards the concept, for a random number k of the ``sample_steps`` DDIM steps; t is the
timestep it stopped at. The frozen model then predicts the noise of x_t without and with the concept,
eps(x_t) and eps(x_t, c), and the selected parts are trained so that the model's prediction with the
concept follows the negatively guided one::

    eps_new(x_t, c)  ->  eps(x_t) - eta * (eps(x_t, c) - eps(x_t))      (mean squared error, Adam)

Which parts train is a preset of the ESD authors' code, or any selector (:mod:`workbench.anatomy`):

================  ==================================================================
``esd-x``         every cross-attention matrix (``unet.*.xattn``: q, k, v, out)
``esd-x-strict``  cross-attention k and v only (``unet.*.xattn.[kv]``)
``esd-u``         every UNet part except cross-attention
``esd-all``       every Linear and convolution of the UNet
================  ==================================================================

As in the reference code, a part is a Linear or Conv2d with its bias; normalisation layers stay. The
parts train as float32 master copies while the forward passes run in the pipeline's dtype and device
(as few-shot unlearning does), so a float16 or bfloat16 pipeline loses no update below its weights'
last bit; the pipeline itself is never changed. The defaults are the paper's: Adam at lr 1e-5, 1,000
iterations of batch 1, eta 1, x_t from up to 50 DDIM steps with guidance 3. As in the reference code,
the loss's timestep t is drawn near k/50 of the training schedule after k sampling steps from noise
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

from ..anatomy import Selector, as_list, component_of, parts as all_parts, select
from ..edits import Edit, Timer, parameter
from ..embed import check_prompt, conditioning
from ..families import Conditioning, family_of
from ..hooks import frozen
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


def preset_parts(pipe, preset: str) -> list[str]:
    """The part names an ESD preset trains on ``pipe``.

    >>> import workbench
    >>> pipe = workbench.load("toy")
    >>> [len(preset_parts(pipe, p)) for p in PRESETS]
    [28, 14, 104, 132]
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown ESD preset {preset!r}; choose one of "
                         + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()) + ", or give parts=<selector>")
    unet = select(pipe, "unet.*")
    if preset == "esd-all":
        return unet
    if preset == "esd-u":
        return [n for n in unet if not component_of(n).startswith("xattn.")]
    return select(pipe, "unet.*.xattn" if preset == "esd-x" else ["unet.*.xattn.k", "unet.*.xattn.v"])


def _unet_parts(pipe, preset: str, parts: Selector | None) -> list[str]:
    names = preset_parts(pipe, preset) if parts is None else select(pipe, parts)
    bad = [n for n in names if not n.startswith("unet.")]
    if bad:
        raise ValueError(f"ESD trains UNet parts; {', '.join(bad[:4])} are text-encoder parts: use few-shot "
                         "unlearning ('fewshot') for those, or a UNet selector such as 'unet.*.ffn'")
    return names


def _masters(pipe, names: list[str]) -> dict[str, torch.Tensor]:
    """Float32 trainable copies of the parts' parameters, keyed ``"<part>.<weight|bias>"``."""
    table = all_parts(pipe)
    return {f"{name}.{attr}": p.detach().float().clone().requires_grad_(True)
            for name in names for attr, p in table[name].named_parameters(recurse=False)}


class _Trainer:
    """The frozen UNet, the trained masters, the conditions and the sampler of one ESD run."""

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
        self.sched.set_timesteps(sample_steps, device=self.device)
        self.guidance = sample_guidance
        self.shape = family.latent_shape(pipe)

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: m.to(self.dtype) for k, m in self.masters.items()}

    def trained(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, weights: dict) -> torch.Tensor:
        return self.family.denoise(self.pipe, x, t, cond, weights)

    @torch.no_grad()
    def partial_sample(self, cond: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t after ``k`` guided DDIM steps of the trained model from fresh noise, and t."""
        n = len(cond)
        x = torch.randn((n, *self.shape), generator=self.gen).to(self.device, self.dtype)
        x = x * self.sched.init_noise_sigma
        weights = self.weights()
        both = Conditioning.cat([self.empty.expand(n), cond])
        for t in self.sched.timesteps[:k]:
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
    """Erase ``concept`` by fine-tuning the UNet parts of ``preset`` (or of the selector ``parts``, which
    takes precedence) towards the frozen model's negatively guided prediction (see the module doc).

    ``prompts`` (default: the concept itself) are the conditions, one drawn per example;
    ``erase(pipe, concept, "esd")`` takes them from the model's concept set. ``eta`` is the negative
    guidance, ``lr`` Adam's learning rate, ``iterations`` the training steps of ``batch`` examples;
    x_t comes from ``sample_steps`` DDIM steps at guidance ``sample_guidance``; ``timestep`` is one of
    :data:`TIMESTEPS` (the module doc says how they differ). Every random draw
    comes from a generator seeded with ``seed``. The pipeline is not changed: apply the returned edit.
    """
    check_prompt(pipe, concept)
    prompts = as_list(prompts) if prompts is not None else [concept]
    names = _unet_parts(pipe, preset, parts)
    _check(eta, lr, iterations, batch, sample_steps)
    if timestep not in TIMESTEPS:
        raise ValueError(f"timestep cannot be {timestep!r}; choose one of {', '.join(TIMESTEPS)}; nothing was changed")
    with Timer() as timer:
        masters = _masters(pipe, names)
        trainer = _Trainer(pipe, prompts, masters, sample_steps, sample_guidance, seeded(seed), timestep)
        opt = torch.optim.Adam(masters.values(), lr=lr)
        with frozen(family_of(pipe).denoiser(pipe)):
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
