"""The icon world: its concepts, and captions for scenes drawn from it.

Every image of the toy world is a :class:`Scene` with exact labels (object, colour, style).
Objects come in related groups, which is where an erased concept can land.

>>> from workbench.toy.world import OBJECTS, sample_scene
>>> import random
>>> scene = sample_scene(random.Random(0))
>>> scene.object in OBJECTS
True
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ..concepts import a, article  # noqa: F401  (a/an, used in captions)

GROUPS: dict[str, tuple[str, ...]] = {
    "fruit": ("apple", "banana", "cherry", "pear"),
    "vehicle": ("car", "truck", "boat", "airplane"),
    "sky": ("sun", "moon", "star", "cloud"),
    "animal": ("cat", "dog", "fish", "bird"),
}
OBJECTS: tuple[str, ...] = tuple(o for group in GROUPS.values() for o in group)
GROUP_OF: dict[str, str] = {o: g for g, objs in GROUPS.items() for o in objs}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 210, 25),
    "green": (40, 165, 55),
    "blue": (35, 85, 220),
    "purple": (135, 50, 185),
    "pink": (245, 125, 185),
}

PLAIN = "plain"
#: Named painting styles; each is drawn in a recognisable way (see ``workbench.toy.render``).
PAINTERS: tuple[str, ...] = ("van gogh", "seurat", "mondrian", "picasso")
STYLES: tuple[str, ...] = (PLAIN, *PAINTERS)


# Templates by which attributes they name. {o}: object with article, {c}: colour, {p}: painter.
_TEMPLATES: dict[tuple[bool, bool], tuple[str, ...]] = {
    (False, False): ("{ao}", "a picture of {ao}", "an icon of {ao}", "{o}"),
    (True, False): ("{ac} {o}", "a picture of {ac} {o}", "an icon of {ac} {o}", "{c} {o}"),
    (False, True): (
        "{ao} by {p}",
        "a painting of {ao} by {p}",
        "{ao} in the style of {p}",
        "{o} by {p}",
    ),
    (True, True): (
        "{ac} {o} by {p}",
        "a painting of {ac} {o} by {p}",
        "{ac} {o} in the style of {p}",
    ),
}
#: Captions that name only the style (the object is then any object).
_STYLE_ONLY = ("a painting by {p}", "a painting in the style of {p}", "art by {p}")


@dataclass(frozen=True)
class Scene:
    """What one image shows, exactly: the labels the oracle learns and the caption the model sees."""

    object: str
    colour: str
    style: str
    caption: str


def caption_for(obj: str, colour: str | None, style: str, template: int = 0) -> str:
    """The caption of a scene; ``colour=None`` leaves the colour unsaid, ``style="plain"`` the style.

    >>> caption_for("apple", "red", "van gogh", 1)
    'a painting of a red apple by van gogh'
    """
    painted = style != PLAIN
    options = _TEMPLATES[(colour is not None, painted)]
    text = options[template % len(options)]
    return text.format(
        o=obj, ao=a(obj), c=colour or "", ac=a(colour) if colour else "", p=style if painted else ""
    )


def all_captions() -> list[str]:
    """Every caption the renderer can write (the training vocabulary of the toy model)."""
    out: set[str] = set()
    for obj in OBJECTS:
        for colour in (None, *COLOURS):
            for style in STYLES:
                n = len(_TEMPLATES[(colour is not None, style != PLAIN)])
                out.update(caption_for(obj, colour, style, t) for t in range(n))
    for painter in PAINTERS:
        out.update(t.format(p=painter) for t in _STYLE_ONLY)
    return sorted(out)


def sample_scene(rng: random.Random) -> Scene:
    """Draw a scene: uniform object, colour and style, captioned by a random template.

    A caption says the colour two times in three and the style (when not plain) nearly always;
    an unsaid style means plain, as an unsaid style in Stable Diffusion means its default look.
    """
    obj = rng.choice(OBJECTS)
    colour = rng.choice(list(COLOURS))
    style = PLAIN if rng.random() < 0.36 else rng.choice(PAINTERS)
    if style != PLAIN and rng.random() < 0.08:
        caption = rng.choice(_STYLE_ONLY).format(p=style)
    else:
        said = colour if rng.random() < 0.67 else None
        caption = caption_for(obj, said, style, rng.randrange(4))
    return Scene(obj, colour, style, caption)
