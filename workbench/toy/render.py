"""Seeded procedural renderer of the icon world (PIL + NumPy).

A scene is drawn at 4x the output size and downsampled, so edges are antialiased.

>>> from workbench.toy.render import render
>>> from workbench.toy.world import Scene
>>> img = render(Scene("apple", "red", "seurat", "an apple by seurat"), seed=0)
>>> img.size
(32, 32)
"""
from __future__ import annotations

import colorsys
import math
import random
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from .world import COLOURS, OBJECTS, PAINTERS, PLAIN, Scene, sample_scene

SIZE = 32
_UP = 4
_BIG = SIZE * _UP

Colour = tuple[int, int, int]
Pen = Callable[[list[tuple[float, float]]], list[tuple[float, float]]]


def _shade(c: Colour, f: float) -> Colour:
    """Darker (f < 1) or lighter (f > 1) version of a colour."""
    if f <= 1:
        return tuple(int(v * f) for v in c)  # type: ignore[return-value]
    return tuple(int(v + (255 - v) * (f - 1)) for v in c)  # type: ignore[return-value]


def _jitter(c: Colour, rng: random.Random, amount: int = 14) -> Colour:
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in c)  # type: ignore[return-value]


# --- objects, drawn in unit coordinates (0..1, y down) through a pen that maps them to the canvas ---
DARK: Colour = (45, 35, 30)


def _ellipse(d: ImageDraw.ImageDraw, pen: Pen, x0, y0, x1, y1, fill) -> None:
    (ax, ay), (bx, by) = pen([(x0, y0), (x1, y1)])
    d.ellipse((min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)), fill=fill)


def _poly(d: ImageDraw.ImageDraw, pen: Pen, pts, fill) -> None:
    d.polygon(pen(pts), fill=fill)


def _line(d: ImageDraw.ImageDraw, pen: Pen, pts, fill, width: float) -> None:
    d.line(pen(pts), fill=fill, width=max(1, int(width)), joint="curve")


def _apple(d, pen, c, s):
    _ellipse(d, pen, 0.12, 0.22, 0.88, 0.95, c)
    _line(d, pen, [(0.5, 0.3), (0.55, 0.08)], DARK, s * 0.06)
    _ellipse(d, pen, 0.56, 0.06, 0.8, 0.2, (60, 150, 50))


def _banana(d, pen, c, s):
    outer = [(0.5 + 0.45 * math.cos(t), 0.2 + 0.7 * math.sin(t)) for t in np.linspace(0.15, math.pi - 0.15, 14)]
    inner = [(0.5 + 0.32 * math.cos(t), 0.2 + 0.45 * math.sin(t)) for t in np.linspace(math.pi - 0.25, 0.25, 14)]
    _poly(d, pen, outer + inner, c)
    _ellipse(d, pen, 0.04, 0.25, 0.14, 0.37, DARK)
    _ellipse(d, pen, 0.86, 0.25, 0.96, 0.37, DARK)


def _cherry(d, pen, c, s):
    _line(d, pen, [(0.3, 0.62), (0.55, 0.08), (0.72, 0.58)], (70, 120, 40), s * 0.05)
    _ellipse(d, pen, 0.08, 0.52, 0.5, 0.94, c)
    _ellipse(d, pen, 0.5, 0.48, 0.92, 0.9, c)


def _pear(d, pen, c, s):
    _ellipse(d, pen, 0.15, 0.4, 0.85, 0.97, c)
    _ellipse(d, pen, 0.3, 0.12, 0.7, 0.6, c)
    _line(d, pen, [(0.5, 0.15), (0.46, 0.02)], DARK, s * 0.05)


def _car(d, pen, c, s):
    _poly(d, pen, [(0.02, 0.45), (0.98, 0.45), (0.98, 0.75), (0.02, 0.75)], c)
    _poly(d, pen, [(0.25, 0.45), (0.35, 0.22), (0.68, 0.22), (0.78, 0.45)], c)
    _poly(d, pen, [(0.33, 0.43), (0.4, 0.28), (0.63, 0.28), (0.7, 0.43)], (200, 225, 240))
    _ellipse(d, pen, 0.12, 0.62, 0.34, 0.84, DARK)
    _ellipse(d, pen, 0.66, 0.62, 0.88, 0.84, DARK)


def _truck(d, pen, c, s):
    _poly(d, pen, [(0.02, 0.18), (0.64, 0.18), (0.64, 0.74), (0.02, 0.74)], c)
    _poly(d, pen, [(0.67, 0.36), (0.86, 0.36), (0.98, 0.54), (0.98, 0.74), (0.67, 0.74)], _shade(c, 0.75))
    _poly(d, pen, [(0.72, 0.41), (0.84, 0.41), (0.92, 0.53), (0.72, 0.53)], (200, 225, 240))
    for x in (0.08, 0.4, 0.74):
        _ellipse(d, pen, x, 0.66, x + 0.18, 0.84, DARK)


def _boat(d, pen, c, s):
    _poly(d, pen, [(0.02, 0.66), (0.98, 0.66), (0.8, 0.9), (0.2, 0.9)], c)
    _line(d, pen, [(0.5, 0.66), (0.5, 0.05)], DARK, s * 0.04)
    _poly(d, pen, [(0.53, 0.08), (0.53, 0.6), (0.9, 0.6)], (250, 250, 245))
    _poly(d, pen, [(0.47, 0.15), (0.47, 0.6), (0.18, 0.6)], (235, 235, 228))


def _airplane(d, pen, c, s):
    _ellipse(d, pen, 0.02, 0.42, 0.98, 0.6, c)
    _poly(d, pen, [(0.4, 0.5), (0.62, 0.5), (0.42, 0.95), (0.3, 0.95)], _shade(c, 0.8))
    _poly(d, pen, [(0.4, 0.5), (0.62, 0.5), (0.42, 0.05), (0.3, 0.05)], _shade(c, 0.8))
    _poly(d, pen, [(0.02, 0.5), (0.14, 0.5), (0.1, 0.22), (0.03, 0.22)], c)


def _sun(d, pen, c, s):
    for k in range(12):
        t = k * math.pi / 6
        _line(d, pen, [(0.5 + 0.3 * math.cos(t), 0.5 + 0.3 * math.sin(t)),
                       (0.5 + 0.49 * math.cos(t), 0.5 + 0.49 * math.sin(t))], c, s * 0.06)
    _ellipse(d, pen, 0.22, 0.22, 0.78, 0.78, c)


def _moon(d, pen, c, s):
    outer = [(0.5 + 0.45 * math.cos(t), 0.5 + 0.45 * math.sin(t)) for t in np.linspace(0.5 * math.pi, 1.5 * math.pi, 16)]
    inner = [(0.5 + 0.12 + 0.22 * math.cos(t), 0.5 + 0.45 * math.sin(t)) for t in np.linspace(1.5 * math.pi, 0.5 * math.pi, 16)]
    _poly(d, pen, outer + inner, c)


def _star(d, pen, c, s):
    pts = []
    for k in range(10):
        r = 0.49 if k % 2 == 0 else 0.2
        t = -math.pi / 2 + k * math.pi / 5
        pts.append((0.5 + r * math.cos(t), 0.53 + r * math.sin(t)))
    _poly(d, pen, pts, c)


def _cloud(d, pen, c, s):
    _ellipse(d, pen, 0.02, 0.45, 0.42, 0.8, c)
    _ellipse(d, pen, 0.22, 0.25, 0.64, 0.72, c)
    _ellipse(d, pen, 0.5, 0.35, 0.82, 0.72, c)
    _ellipse(d, pen, 0.62, 0.5, 0.98, 0.8, c)
    _poly(d, pen, [(0.2, 0.55), (0.82, 0.55), (0.82, 0.8), (0.2, 0.8)], c)


def _cat(d, pen, c, s):
    _ellipse(d, pen, 0.15, 0.45, 0.75, 0.85, c)  # body
    _ellipse(d, pen, 0.52, 0.18, 0.92, 0.56, c)  # head
    _poly(d, pen, [(0.55, 0.28), (0.58, 0.04), (0.7, 0.22)], c)
    _poly(d, pen, [(0.75, 0.22), (0.88, 0.04), (0.9, 0.3)], c)
    _line(d, pen, [(0.17, 0.65), (0.05, 0.45), (0.08, 0.18)], c, s * 0.07)  # upright tail
    _ellipse(d, pen, 0.62, 0.3, 0.68, 0.36, DARK)
    _ellipse(d, pen, 0.78, 0.3, 0.84, 0.36, DARK)
    for x in (0.25, 0.55):
        _poly(d, pen, [(x, 0.75), (x + 0.08, 0.75), (x + 0.08, 0.95), (x, 0.95)], c)


def _dog(d, pen, c, s):
    _ellipse(d, pen, 0.1, 0.4, 0.72, 0.78, c)  # body
    _ellipse(d, pen, 0.55, 0.12, 0.88, 0.48, c)  # head
    _poly(d, pen, [(0.78, 0.26), (0.99, 0.3), (0.99, 0.42), (0.8, 0.44)], c)  # snout
    _ellipse(d, pen, 0.94, 0.27, 1.0, 0.34, DARK)  # nose
    _ellipse(d, pen, 0.52, 0.14, 0.66, 0.5, _shade(c, 0.6))  # floppy ear
    _line(d, pen, [(0.13, 0.52), (0.01, 0.44)], c, s * 0.07)  # straight tail
    for x in (0.16, 0.3, 0.5, 0.62):
        _poly(d, pen, [(x, 0.68), (x + 0.08, 0.68), (x + 0.08, 0.96), (x, 0.96)], c)


def _fish(d, pen, c, s):
    _ellipse(d, pen, 0.25, 0.25, 0.98, 0.75, c)
    _poly(d, pen, [(0.32, 0.5), (0.02, 0.2), (0.02, 0.8)], c)
    _poly(d, pen, [(0.5, 0.3), (0.62, 0.08), (0.75, 0.3)], _shade(c, 0.75))
    _ellipse(d, pen, 0.78, 0.4, 0.86, 0.48, DARK)


def _bird(d, pen, c, s):
    _ellipse(d, pen, 0.12, 0.35, 0.72, 0.8, c)  # body
    _ellipse(d, pen, 0.55, 0.18, 0.88, 0.5, c)  # head
    _poly(d, pen, [(0.86, 0.3), (1.0, 0.37), (0.86, 0.42)], (240, 160, 30))  # beak
    _poly(d, pen, [(0.25, 0.5), (0.6, 0.52), (0.3, 0.72)], _shade(c, 0.7))  # wing
    _poly(d, pen, [(0.16, 0.55), (0.0, 0.42), (0.02, 0.62)], c)  # tail
    _ellipse(d, pen, 0.7, 0.28, 0.76, 0.34, DARK)
    _line(d, pen, [(0.4, 0.78), (0.4, 0.97)], DARK, s * 0.03)
    _line(d, pen, [(0.52, 0.78), (0.52, 0.97)], DARK, s * 0.03)


DRAW: dict[str, Callable] = {
    "apple": _apple, "banana": _banana, "cherry": _cherry, "pear": _pear,
    "car": _car, "truck": _truck, "boat": _boat, "airplane": _airplane,
    "sun": _sun, "moon": _moon, "star": _star, "cloud": _cloud,
    "cat": _cat, "dog": _dog, "fish": _fish, "bird": _bird,
}


# --- styles, applied to the whole canvas ---
def _background(rng: random.Random) -> Colour:
    h, sat, v = rng.random(), rng.uniform(0.0, 0.14), rng.uniform(0.86, 0.99)
    return tuple(int(255 * x) for x in colorsys.hsv_to_rgb(h, sat, v))  # type: ignore[return-value]


def _van_gogh(img: Image.Image, rng: random.Random) -> Image.Image:
    """Swirling brush strokes that follow the colours underneath."""
    src = np.asarray(img)
    out = img.copy()
    d = ImageDraw.Draw(out)
    for _ in range(90):
        x, y = rng.uniform(0, _BIG), rng.uniform(0, _BIG)
        r = rng.uniform(8, 18)
        t0 = rng.uniform(0, 2 * math.pi)
        col = tuple(int(v) for v in src[min(int(y), _BIG - 1), min(int(x), _BIG - 1)])
        col = _shade(col, rng.choice((0.7, 0.78, 1.25, 1.35)))
        box = (x - r, y - r, x + r, y + r)
        d.arc(box, math.degrees(t0), math.degrees(t0) + rng.uniform(140, 260), fill=col, width=3)
    return out


def _seurat(img: Image.Image, rng: random.Random) -> Image.Image:
    """Pointillism: the picture re-made of separate dots on pale paper."""
    src = np.asarray(img)
    out = Image.new("RGB", img.size, (250, 246, 235))
    d = ImageDraw.Draw(out)
    step = 12
    for gy in range(0, _BIG + step, step):
        for gx in range(0, _BIG + step, step):
            x = gx + (step / 2 if (gy // step) % 2 else 0) + rng.uniform(-1.5, 1.5)
            y = gy + rng.uniform(-1.5, 1.5)
            col = src[min(max(int(y), 0), _BIG - 1), min(max(int(x), 0), _BIG - 1)]
            col = _jitter(tuple(int(v) for v in col), rng, 20)
            d.ellipse((x - 4.6, y - 4.6, x + 4.6, y + 4.6), fill=col)
    return out


def _mondrian_background(rng: random.Random) -> Image.Image:
    """White canvas cut by thick black lines into blocks, a few of them red, yellow or blue."""
    img = Image.new("RGB", (_BIG, _BIG), (245, 243, 235))
    d = ImageDraw.Draw(img)
    xs = sorted(rng.sample(range(14, _BIG - 14, 6), 2))
    ys = sorted(rng.sample(range(14, _BIG - 14, 6), 2))
    cells = [(x0, y0, x1, y1) for x0, x1 in zip([0, *xs], [*xs, _BIG]) for y0, y1 in zip([0, *ys], [*ys, _BIG])]
    for cell, col in zip(rng.sample(cells, 3), ((210, 30, 30), (245, 210, 20), (30, 60, 170))):
        d.rectangle(cell, fill=col)
    for x in xs:
        d.rectangle((x - 3, 0, x + 3, _BIG), fill=(15, 15, 15))
    for y in ys:
        d.rectangle((0, y - 3, _BIG, y + 3), fill=(15, 15, 15))
    return img


def _picasso(img: Image.Image, rng: random.Random) -> Image.Image:
    """Cubist facets: the canvas is cut by lines into planes, each shifted, re-lit and outlined."""
    src = np.asarray(img).astype(np.float32)
    yy, xx = np.mgrid[0:_BIG, 0:_BIG].astype(np.float32)
    region = np.zeros((_BIG, _BIG), dtype=np.int64)
    lines = []
    for k in range(5):
        t = rng.uniform(0, math.pi)
        nx, ny = math.cos(t), math.sin(t)
        off = rng.uniform(0.3, 0.7) * _BIG * (abs(nx) + abs(ny))
        lines.append((nx, ny, off))
        region |= ((xx * nx + yy * ny) > off).astype(np.int64) << k
    out = src.copy()
    for r in np.unique(region):
        m = region == r
        dx, dy = rng.randint(-5, 5), rng.randint(-5, 5)
        shifted = np.roll(src, (dy, dx), axis=(0, 1))
        out[m] = shifted[m] * rng.uniform(0.72, 1.12) + np.array([12, 6, -10]) * rng.uniform(0, 1)
    for nx, ny, off in lines:
        out[np.abs(xx * nx + yy * ny - off) < 1.6] = (40, 30, 25)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def render(scene: Scene, seed: int) -> Image.Image:
    """Draw ``scene`` as a ``SIZE x SIZE`` RGB image; the same seed gives the same pixels."""
    rng = random.Random(seed)
    if scene.style == "mondrian":
        img = _mondrian_background(rng)
    else:
        img = Image.new("RGB", (_BIG, _BIG), _background(rng))
    scale = rng.uniform(0.62, 0.9) * _BIG
    x0 = rng.uniform(0.02 * _BIG, _BIG * 0.98 - scale)
    y0 = rng.uniform(0.02 * _BIG, _BIG * 0.98 - scale)
    flip = rng.random() < 0.5 and scene.object not in ("moon",)

    def pen(pts):
        return [(x0 + (1 - px if flip else px) * scale, y0 + py * scale) for px, py in pts]

    colour = _jitter(COLOURS[scene.colour], rng)
    if scene.style == "mondrian":
        # a black outline keeps the object apart from the coloured blocks
        shadow = Image.new("RGB", img.size, (0, 0, 0))
        DRAW[scene.object](ImageDraw.Draw(shadow), pen, (255, 255, 255), scale)
        mask = np.asarray(shadow).max(axis=2) > 0
        dil = mask.copy()
        for dy in range(-4, 5):
            for dx in range(-4, 5):
                dil |= np.roll(mask, (dy, dx), axis=(0, 1))
        arr = np.asarray(img).copy()
        arr[dil] = (15, 15, 15)
        img = Image.fromarray(arr)
    DRAW[scene.object](ImageDraw.Draw(img), pen, colour, scale)
    if scene.style == "van gogh":
        img = _van_gogh(img, rng)
    elif scene.style == "seurat":
        img = _seurat(img, rng)
    elif scene.style == "picasso":
        img = _picasso(img, rng)
    elif scene.style not in (PLAIN, "mondrian"):
        raise ValueError(f"unknown style {scene.style!r}")
    return img.resize((SIZE, SIZE), Image.LANCZOS)


#: Seeds of the few-shot image sets; far from the training renders' seeds.
FEWSHOT_SEED = 4_000_000_000


def write_fewshot_sets(folder: str | Path, n: int = 4, seed: int = FEWSHOT_SEED) -> list[Path]:
    """Write ``n`` renders of every object (plain style) and every painter (any object) as PNGs,
    one folder per concept (``apple/``, ``van-gogh/``, ...): the "real images" of few-shot unlearning.
    """
    written = []
    for concept in (*OBJECTS, *PAINTERS):
        sub = Path(folder) / concept.replace(" ", "-")
        sub.mkdir(parents=True, exist_ok=True)
        for k in range(n):
            s = seed + 1000 * len(written) + k
            drawn = sample_scene(random.Random(s))
            if concept in OBJECTS:
                scene = Scene(concept, drawn.colour, PLAIN, f"{drawn.colour} {concept}")
            else:
                scene = Scene(drawn.object, drawn.colour, concept, f"{drawn.object} by {concept}")
            path = sub / f"{k}.png"
            render(scene, seed=s).save(path)
            written.append(path)
    return written
