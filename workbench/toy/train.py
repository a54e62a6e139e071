"""Train the toy text-to-image model and its oracle from renders of the icon world.

    python -m workbench.toy.train            # about an hour on a 2-core CPU, resumable
    python -m workbench.toy.train --quick    # a seconds-long smoke run into a scratch folder
    python -m workbench.toy.train --arch dit # the toy DiT (FLUX-shaped), on the same renders, VAE and oracle

Stages (each saved in ``--work``, so an interrupted run picks up where it stopped):
renders -> VAE -> oracle -> caption embeddings -> latents -> UNet (or DiT). The text encoder
(all-MiniLM-L6-v2) stays frozen, as CLIP does in Stable Diffusion. Weights go to ``--out``.

The DiT (``--arch dit``, weights to ``data/toy-dit``) reuses the UNet's renders, VAE, oracle and latents
(the VAE from ``data/toy``, so the UNet is trained first). Its captions are encoded as FluxPipeline
encodes them: token rows and BERT's pooled output, without a padding mask. It learns the flow-matching
velocity (noise - x0) at x_t = (1 - t) x0 + t noise, t drawn logit-normal (as SD 3 trains), on latents
shifted and scaled to zero mean and unit variance (the VAE config's ``shift_factor`` and
``scaling_factor``, as FLUX's pipeline reads them).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import random
import time
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel, UNet2DConditionModel,
)
from tqdm.auto import tqdm

from ..families.mmdit import pack, unpack
from .model import (
    TOY_DIT_CONFIG, TOY_DIT_SCHEDULER_CONFIG, TOY_SCHEDULER_CONFIG, TOY_UNET_CONFIG, TOY_VAE_CONFIG,
    toy_dit_text_encoders, toy_text_encoder,
)
from .paths import TOY_DIR, TOY_DIT_DIR
from .oracle import Oracle, augment
from .render import render, write_fewshot_sets
from .world import COLOURS, OBJECTS, STYLES, all_captions, sample_scene


@dataclass
class Settings:
    n_images: int = 40_000
    vae_steps: int = 1_000
    oracle_steps: int = 1_000
    unet_steps: int = 3_600
    batch: int = 64
    lr: float = 3e-4
    ema: float = 0.999
    uncond_p: float = 0.1
    min_snr: float = 5.0
    seed: int = 0


QUICK = Settings(n_images=256, vae_steps=3, oracle_steps=3, unet_steps=4, batch=8)
#: The DiT's training: flow matching with a higher learning rate and more, cheaper steps than the UNet's.
DIT = Settings(unet_steps=5_400, lr=5e-4)
QUICK_DIT = dataclasses.replace(QUICK, lr=5e-4)


def _render_range(args: tuple[int, int, int]) -> tuple[np.ndarray, list]:
    start, stop, seed = args
    imgs, labels = [], []
    for i in range(start, stop):
        scene = sample_scene(random.Random(seed * 1_000_003 + i))
        imgs.append(np.asarray(render(scene, seed=seed * 1_000_003 + i)))
        labels.append((scene.object, scene.colour, scene.style, scene.caption))
    return np.stack(imgs), labels


def make_renders(n: int, seed: int, path: Path) -> None:
    """Render ``n`` captioned scenes into ``path`` (npz: images, labels, caption index)."""
    chunks = [(s, min(s + 1000, n), seed) for s in range(0, n, 1000)]
    with mp.Pool(2) as pool:
        parts = list(tqdm(pool.imap(_render_range, chunks), total=len(chunks), desc="renders"))
    images = np.concatenate([p[0] for p in parts])
    labels = [lab for p in parts for lab in p[1]]
    captions = all_captions()
    index = {c: i for i, c in enumerate(captions)}
    np.savez(
        path,
        images=images,
        object=np.array([OBJECTS.index(o) for o, _, _, _ in labels]),
        colour=np.array([list(COLOURS).index(c) for _, c, _, _ in labels]),
        style=np.array([STYLES.index(s) for _, _, s, _ in labels]),
        caption=np.array([index[c] for _, _, _, c in labels]),
        captions=np.array(captions),
    )


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(images: np.ndarray, s: Settings, out: Path) -> AutoencoderKL:
    torch.manual_seed(s.seed)
    vae = AutoencoderKL(**TOY_VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(s.seed)
    for step in tqdm(range(s.vae_steps), desc="vae"):
        x = _to_tensor(images[torch.randint(len(images), (s.batch // 2,), generator=g).numpy()])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = 1e-3 * (0.1 + 0.9 * (1 - step / s.vae_steps))
        opt.step()
    vae.eval()
    with torch.no_grad():
        lat = vae.encode(_to_tensor(images[:2048])).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    vae.save_pretrained(out)
    return vae


def train_oracle(images: np.ndarray, labels: dict[str, np.ndarray], vae: AutoencoderKL,
                 s: Settings, out: Path) -> Oracle:
    """Half of each batch is passed through the VAE, so the oracle also reads decoded images."""
    torch.manual_seed(s.seed + 1)
    oracle = Oracle()
    opt = torch.optim.AdamW(oracle.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(s.seed + 1)
    bs = 3 * s.batch // 2
    for step in tqdm(range(s.oracle_steps), desc="oracle"):
        idx = torch.randint(len(images), (bs,), generator=g).numpy()
        x = _to_tensor(images[idx])
        with torch.no_grad():
            half = bs // 2
            x[:half] = vae.decode(vae.encode(x[:half]).latent_dist.mean).sample.clamp(-1, 1)
        logits = oracle(augment(x, g))
        loss = sum(F.cross_entropy(logits[k], torch.from_numpy(labels[k][idx])) for k in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / s.oracle_steps))
        opt.step()
    oracle.eval()
    oracle.save(out)
    return oracle


@torch.no_grad()
def encode_captions(captions: list[str]) -> torch.Tensor:
    """Per-token embeddings of every caption (row 0 is the empty prompt), as the pipeline makes them."""
    tokenizer, encoder = toy_text_encoder()
    texts = [""] + captions
    out = []
    for i in tqdm(range(0, len(texts), 256), desc="captions"):
        tok = tokenizer(texts[i:i + 256], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt")
        out.append(encoder(tok.input_ids, attention_mask=tok.attention_mask)[0])
    return torch.cat(out)


def _resume(ckpt: Path, key: str, model, ema, opt, g: torch.Generator) -> tuple[int, list[float]]:
    """Load a training checkpoint (``key``: the model's entry) if there is one: the step and losses so far."""
    if not ckpt.exists():
        return 0, []
    state = torch.load(ckpt, weights_only=False)
    model.load_state_dict(state[key])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    g.set_state(state["gen"])
    return state["step"], state["losses"]


def _optimise(model, ema, opt, loss: torch.Tensor, step: int, s: Settings, warmup: int) -> None:
    """One AdamW step (gradients clipped at 1, linear warm-up over ``warmup`` steps, cosine decay to a
    tenth), then the EMA update."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    warm = min(1.0, (step + 1) / warmup)
    for group in opt.param_groups:
        group["lr"] = s.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / s.unet_steps)))
    opt.step()
    decay = min(s.ema, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pu in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pu, 1 - decay)


def _log_step(bar, ckpt: Path, key: str, model, ema, opt, g: torch.Generator, step: int, losses: list[float],
              s: Settings) -> None:
    """The progress bar's loss every 20 steps, a checkpoint every 200 and at the end."""
    if step % 20 == 0:
        bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    if (step + 1) % 200 == 0 or step + 1 == s.unet_steps:
        torch.save({key: model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "gen": g.get_state(), "step": step + 1, "losses": losses}, ckpt)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray) -> torch.Tensor:
    """VAE posterior means of ``images``, scaled by the VAE's factor (as the UNet sees them)."""
    return torch.cat([vae.encode(_to_tensor(images[i:i + 512])).latent_dist.mean
                      for i in range(0, len(images), 512)]) * vae.config.scaling_factor


def _saved(stage, name: str, path: Path, make):
    """The tensor saved at ``path``, made by the stage ``name`` first if it is not there yet."""
    if not path.exists():
        torch.save(stage(name, make), path)
    return torch.load(path)


class _Stages:
    """Run named stages, adding each one's seconds to the JSON log at ``path`` (kept across resumes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.times: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    def __call__(self, name: str, fn):
        t0 = time.time()
        result = fn()
        self.times[name] = self.times.get(name, 0.0) + time.time() - t0
        self.path.write_text(json.dumps(self.times, indent=1))
        return result


@torch.no_grad()
def encode_captions_dit(captions: list[str]) -> dict[str, torch.Tensor]:
    """Token rows and pooled vectors of every caption (row 0: the empty prompt) as FluxPipeline makes
    them with the toy's encoders in its two slots (no padding mask)."""
    (tokenizer, pooled_encoder), (_, rows_encoder) = toy_dit_text_encoders()
    texts = [""] + captions
    rows, pooled = [], []
    for i in tqdm(range(0, len(texts), 256), desc="captions (dit)"):
        ids = tokenizer(texts[i:i + 256], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        rows.append(rows_encoder(ids)[0])
        pooled.append(pooled_encoder(ids).pooler_output)
    return {"rows": torch.cat(rows), "pooled": torch.cat(pooled)}


def _image_ids(side: int) -> torch.Tensor:
    """FLUX's rotary positions of a ``side`` x ``side`` grid of packed latent tokens."""
    ids = torch.zeros(side, side, 3)
    ids[..., 1] += torch.arange(side)[:, None]
    ids[..., 2] += torch.arange(side)[None, :]
    return ids.reshape(side * side, 3)


def train_dit(latents: torch.Tensor, caption_idx: torch.Tensor, cond: dict[str, torch.Tensor], s: Settings,
              ckpt: Path, out: Path) -> list[float]:
    """Flow matching on ``latents`` (already shifted and scaled), EMA weights saved to ``out``."""
    torch.manual_seed(s.seed + 3)
    dit = FluxTransformer2DModel(**TOY_DIT_CONFIG)
    ema = FluxTransformer2DModel(**TOY_DIT_CONFIG)
    ema.load_state_dict(dit.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(dit.parameters(), lr=s.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(s.seed + 3)
    start, losses = _resume(ckpt, "dit", dit, ema, opt, g)
    side = latents.shape[-1] // 2
    img_ids, txt_ids = _image_ids(side), torch.zeros(cond["rows"].shape[1], 3)
    bar = tqdm(range(start, s.unet_steps), desc="dit", initial=start, total=s.unet_steps)
    for step in bar:
        idx = torch.randint(len(latents), (s.batch,), generator=g)
        x0 = latents[idx]
        c = caption_idx[idx] + 1
        c = torch.where(torch.rand(s.batch, generator=g) < s.uncond_p, torch.zeros_like(c), c)
        t = torch.sigmoid(torch.randn(s.batch, generator=g))  # logit-normal, as SD 3 trains
        noise = torch.randn(x0.shape, generator=g)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        pred = dit(hidden_states=pack(xt), timestep=t, pooled_projections=cond["pooled"][c],
                   encoder_hidden_states=cond["rows"][c], txt_ids=txt_ids, img_ids=img_ids).sample
        loss = (unpack(pred, *x0.shape[-2:]) - (noise - x0)).pow(2).mean()
        _optimise(dit, ema, opt, loss, step, s, warmup=200)
        losses.append(loss.item())
        _log_step(bar, ckpt, "dit", dit, ema, opt, g, step, losses, s)
    ema.save_pretrained(out / "transformer")
    FlowMatchEulerDiscreteScheduler(**TOY_DIT_SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    return losses


def dit_vae(vae: AutoencoderKL, latents: torch.Tensor, out: Path) -> tuple[float, float]:
    """The toy VAE saved for the DiT with the shift and scale that bring its latents to zero mean and
    unit variance (``latents``: as the UNet sees them, scaled by the UNet's factor)."""
    raw = latents / vae.config.scaling_factor
    shift = float(raw.mean())
    scale = float(1.0 / (raw - shift).std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    vae.save_pretrained(out / "vae")
    return shift, scale


def train_unet(latents: torch.Tensor, caption_idx: torch.Tensor, cond: torch.Tensor, s: Settings,
               ckpt: Path, out: Path) -> None:
    torch.manual_seed(s.seed + 2)
    unet = UNet2DConditionModel(**TOY_UNET_CONFIG)
    ema = UNet2DConditionModel(**TOY_UNET_CONFIG)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=s.lr, weight_decay=0.01)
    sched = DDPMScheduler(**TOY_SCHEDULER_CONFIG)
    g = torch.Generator().manual_seed(s.seed + 2)
    start, losses = _resume(ckpt, "unet", unet, ema, opt, g)
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    bar = tqdm(range(start, s.unet_steps), desc="unet", initial=start, total=s.unet_steps)
    for step in bar:
        idx = torch.randint(len(latents), (s.batch,), generator=g)
        x0 = latents[idx]
        c = caption_idx[idx] + 1
        c = torch.where(torch.rand(s.batch, generator=g) < s.uncond_p, torch.zeros_like(c), c)
        t = torch.randint(0, sched.config.num_train_timesteps, (s.batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        pred = unet(sched.add_noise(x0, noise, t), t, cond[c]).sample
        weight = torch.clamp(snr[t], max=s.min_snr) / snr[t]  # min-SNR weighting for epsilon targets
        loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        _optimise(unet, ema, opt, loss, step, s, warmup=100)
        losses.append(loss.item())
        _log_step(bar, ckpt, "unet", unet, ema, opt, g, step, losses, s)
    ema.save_pretrained(out / "unet")
    DPMSolverMultistepScheduler(**TOY_SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    return losses


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=TOY_DIR, help="where the weights go (default: data/toy)")
    p.add_argument("--work", type=Path, default=Path("runs/toy"), help="resumable scratch folder")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (minutes of work -> seconds)")
    p.add_argument("--unet-steps", type=int, help="override the number of UNet (or DiT) steps")
    p.add_argument("--arch", choices=("unet", "dit"), default="unet",
                   help="the denoiser: the toy UNet (data/toy) or the toy DiT (data/toy-dit, after the UNet)")
    args = p.parse_args(argv)
    if args.arch == "dit":
        return main_dit(args)
    s = QUICK if args.quick else Settings()
    if args.unet_steps:
        s.unet_steps = args.unet_steps
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stage = _Stages(args.work / "times.json")

    fewshot = args.out.parent / "fewshot"
    if not fewshot.exists():
        write_fewshot_sets(fewshot)
    renders = args.work / "renders.npz"
    if not renders.exists():
        stage("renders", lambda: make_renders(s.n_images, s.seed, renders))
    data = np.load(renders)
    images = data["images"]
    labels = {k: data[k] for k in ("object", "colour", "style")}
    if (args.out / "vae" / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(args.out / "vae")
    else:
        vae = stage("vae", lambda: train_vae(images, s, args.out / "vae"))
    vae.eval().requires_grad_(False)
    if not (args.out / "oracle.safetensors").exists():
        stage("oracle", lambda: train_oracle(images, labels, vae, s, args.out))
    cond = _saved(stage, "captions", args.work / "captions.pt", lambda: encode_captions(list(data["captions"])))
    latents = _saved(stage, "latents", args.work / "latents.pt", lambda: encode_latents(vae, images))
    losses = stage("unet", lambda: train_unet(latents, torch.from_numpy(data["caption"]), cond, s,
                                               args.work / "unet.ckpt", args.out))
    report = dict(settings=asdict(s), seconds=stage.times, total_seconds=sum(stage.times.values()),
                  final_loss=float(np.mean(losses[-200:])), torch=torch.__version__)
    (args.out / "training.json").write_text(json.dumps(report, indent=1))
    print(f"trained in {report['total_seconds'] / 60:.1f} min -> {args.out}")


def main_dit(args: argparse.Namespace) -> None:
    """The DiT's stages on the UNet's renders, VAE and latents (made again in ``--work`` if missing)."""
    s = dataclasses.replace(QUICK_DIT if args.quick else DIT, **({"unet_steps": args.unet_steps} if args.unet_steps else {}))
    out = args.out if args.out != TOY_DIR else TOY_DIT_DIR
    vae_dir = (args.work / "vae") if args.quick else TOY_DIR / "vae"
    args.work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    stage = _Stages(args.work / "times_dit.json")

    renders = args.work / "renders.npz"
    if not renders.exists():
        stage("renders", lambda: make_renders(s.n_images, s.seed, renders))
    data = np.load(renders)
    images = data["images"]
    if not (vae_dir / "config.json").exists():
        if not args.quick:
            raise FileNotFoundError(f"the DiT reuses the toy UNet's VAE, {vae_dir}, which is missing: train the UNet "
                                    "first (python -m workbench.toy.train)")
        stage("vae", lambda: train_vae(images, s, vae_dir))
    vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    cond = _saved(stage, "captions", args.work / "captions_dit.pt", lambda: encode_captions_dit(list(data["captions"])))
    latents = _saved(stage, "latents", args.work / "latents.pt", lambda: encode_latents(vae, images))
    shift, scale = dit_vae(vae, latents, out)
    dit_latents = (latents / AutoencoderKL.load_config(vae_dir)["scaling_factor"] - shift) * scale
    losses = stage("dit", lambda: train_dit(dit_latents, torch.from_numpy(data["caption"]), cond, s,
                                             args.work / "dit.ckpt", out))
    report = dict(settings=asdict(s), config=TOY_DIT_CONFIG, vae=dict(shift_factor=shift, scaling_factor=scale),
                  seconds=stage.times, total_seconds=sum(stage.times.values()), final_loss=float(np.mean(losses[-200:])),
                  torch=torch.__version__)
    (out / "training.json").write_text(json.dumps(report, indent=1))
    print(f"trained in {report['total_seconds'] / 60:.1f} min -> {out}")


if __name__ == "__main__":
    main()
