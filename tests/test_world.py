import random

import numpy as np
import pytest

from workbench.toy.paths import FEWSHOT_DIR
from workbench.toy.render import SIZE, render
from workbench.toy.world import (COLOURS, GROUPS, OBJECTS, PAINTERS, PLAIN, STYLES, Scene,
                                 all_captions, caption_for, sample_scene)


def test_world_is_big_enough():
    assert len(OBJECTS) >= 12 and len(GROUPS) >= 4
    assert all(len(g) >= 3 for g in GROUPS.values())
    assert len(COLOURS) >= 6 and len(PAINTERS) >= 4 and PLAIN in STYLES


def test_render_is_deterministic_and_seed_dependent():
    scene = Scene("car", "blue", "van gogh", "a blue car by van gogh")
    a, b = np.asarray(render(scene, seed=7)), np.asarray(render(scene, seed=7))
    assert a.shape == (SIZE, SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, np.asarray(render(scene, seed=8)))


@pytest.mark.parametrize("style", STYLES)
def test_every_object_renders_in_every_style(style):
    for obj in OBJECTS:
        img = np.asarray(render(Scene(obj, "red", style, ""), seed=1)).astype(float)
        assert img.std() > 10, f"{obj} by {style} is nearly blank"


def test_object_colour_is_drawn():
    # plain renders: the object's colour is the dominant saturated colour of the image
    for colour, rgb in COLOURS.items():
        img = np.asarray(render(Scene("apple", colour, PLAIN, ""), seed=3)).reshape(-1, 3).astype(int)
        close = np.abs(img - np.array(rgb)).sum(axis=1) < 60
        assert close.mean() > 0.1, colour


@pytest.mark.slow
def test_captions_name_their_labels():
    rng = random.Random(0)
    for _ in range(500):
        s = sample_scene(rng)
        assert s.caption in all_captions()
        if s.style != PLAIN:
            assert s.style in s.caption
        else:
            assert not any(p in s.caption for p in PAINTERS)
        if not s.caption.startswith(("a painting by", "a painting in the style", "art by")):
            assert s.object in s.caption
        for c in COLOURS:
            if c in s.caption.split():
                assert c == s.colour
    assert caption_for("apple", "orange", PLAIN, 0) == "an orange apple"


def test_fewshot_sets_are_shipped():
    for concept in (*OBJECTS, *PAINTERS):
        files = sorted((FEWSHOT_DIR / concept.replace(" ", "-")).glob("*.png"))
        assert len(files) >= 4, concept
