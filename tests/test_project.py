"""Embedding spaces, the text-encoder lens, landing tables and the UMAP map."""
import numpy as np
import pytest
import torch

import workbench
from workbench import plots
from workbench.embed import (
    embed,
    embed_rows,
    encode,
    hidden_states,
    lens,
    spaces,
)
from workbench.methods import erase, uce
from workbench.project import LandingMap, landing, vocabulary
from workbench.anatomy import n_text_layers
from workbench.toy import TOY_CONCEPTS
from workbench.toy.world import OBJECTS, PAINTERS

SPACE = "unet.mid.0.xattn.k"


@pytest.fixture(scope="module")
def erased(toy):
    return erase(toy, "apple", "rece", epochs=2)  # erases "apple" in four prompt templates


@pytest.fixture(scope="module")
def unet_map(toy):
    return LandingMap.fit(toy, space=SPACE, seed=0)


def cosine(a, b):
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return 1 - a @ b.T


def test_vocabulary_has_concepts_related_words_and_distractors():
    v = vocabulary(TOY_CONCEPTS)
    assert set(OBJECTS) | set(PAINTERS) <= set(v.word[v.kind == "concept"])
    assert (v.kind == "distractor").sum() >= 200
    assert {"fruit", "vehicle", "sky", "animal", "style"} <= set(v.group[v.kind == "related"])
    assert not v.word.duplicated().any()


def test_layer_outputs_are_conditioning_ready(toy, tiny_sd_dir):
    sd = workbench.load(tiny_sd_dir)
    for pipe in (toy, sd):
        prompts = ["a red apple", "a car by van gogh"]
        states = hidden_states(pipe, prompts)
        assert states.shape[0] == n_text_layers(pipe) + 1
        torch.testing.assert_close(encode(pipe, prompts, layer=-1), encode(pipe, prompts))
        torch.testing.assert_close(encode(pipe, prompts, layer=0), states[1])
        assert not torch.allclose(states[1], states[-1])
        # embed pads only to the longest prompt; real tokens' outputs must not notice
        real = int(sum(pipe.tokenizer(prompts[1]).attention_mask))
        np.testing.assert_allclose(embed(pipe, prompts)[1], encode(pipe, prompts)[1, :real].mean(0).numpy(),
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="0..5"):
        encode(toy, "a car", layer=6)


def test_pooling_matches_token_rows(toy):
    rows = encode(toy, ["a photo of van gogh"])[0]
    ids = toy.tokenizer("a photo of van gogh", padding="max_length", max_length=20).input_ids
    word = toy.tokenizer("van gogh", add_special_tokens=False).input_ids
    start = next(i for i in range(len(ids)) if ids[i:i + len(word)] == word)
    concept = embed(toy, ["van gogh"], pool="concept", template="a photo of {}")[0]
    np.testing.assert_allclose(concept, rows[start:start + len(word)].mean(0).numpy(), rtol=1e-5, atol=1e-6)
    real = int(sum(toy.tokenizer("a photo of van gogh").attention_mask))
    mean = embed(toy, ["van gogh"], template="a photo of {}")[0]
    np.testing.assert_allclose(mean, rows[:real].mean(0).numpy(), rtol=1e-5, atol=1e-6)
    # a UNet key space is W_k c, pooled
    k = workbench.anatomy.parts(toy)[SPACE]
    with torch.no_grad():
        expected = k(rows[:real]).mean(0).numpy()
    np.testing.assert_allclose(embed(toy, ["van gogh"], SPACE, template="a photo of {}")[0], expected,
                               rtol=1e-4, atol=1e-5)


def test_unet_spaces_change_under_uce_and_text_spaces_do_not(toy):
    edit = uce(toy, "apple")
    text, key = embed(toy, ["apple", "car"]), embed(toy, ["apple", "car"], SPACE)
    with edit.apply(toy):
        text_after, key_after = embed(toy, ["apple", "car"]), embed(toy, ["apple", "car"], SPACE)
    np.testing.assert_array_equal(text, text_after)
    moved = cosine(key, key_after).diagonal()
    assert moved[0] > 0.05 and moved[0] > 5 * moved[1]


def test_embeddings_are_cached_per_edit_state(toy):
    words = vocabulary(TOY_CONCEPTS).word.tolist()[::6]
    first = embed(toy, words, SPACE)
    assert embed(toy, words, SPACE) is first
    assert not first.flags.writeable
    with uce(toy, "car").apply(toy):
        edited = embed(toy, words, SPACE)
        assert edited is not first and not np.allclose(edited, first)
    assert embed(toy, words, SPACE) is first


def test_bad_inputs_say_what_is_accepted(toy, erased):
    with pytest.raises(ValueError, match=r"unknown space 'text\.9'.*text\.5.*unet\.mid\.0\.xattn\.k"):
        embed(toy, ["apple"], space="text.9")
    with pytest.raises(ValueError, match="'mean'.*'concept'"):
        embed(toy, ["apple"], pool="max")
    with pytest.raises(ValueError, match="no '{}'"):
        embed(toy, ["apple"], template="a photo")
    with pytest.raises(ValueError, match="output space"):
        embed_rows(toy, erased.extras["derived.0"], "apple", space="text.2")
    with pytest.raises(ValueError, match="k=10000"):
        landing(toy, erased, "apple", space=SPACE, k=10000)
    with pytest.raises(ValueError, match="repeats 'car'"):
        landing(toy, None, "apple", vocabulary=["car", "car", "dog"])
    assert len(spaces(toy)) == 1 + 6 + 14


def test_landing_is_measured_in_the_original_space(toy, erased, unet_map):
    table = unet_map.landing(toy, erased, "apple", k=5)
    v = vocabulary(TOY_CONCEPTS)
    others = v.word != "apple"
    base = embed(toy, v.word[others].tolist(), SPACE)
    with erased.apply(toy):
        after = embed(toy, ["apple"], SPACE)
    d = cosine(after, base)[0]
    order = np.argsort(d)[:5]
    assert table.neighbour.tolist() == v.word[others].to_numpy()[order].tolist()
    np.testing.assert_allclose(table.distance, d[order], rtol=1e-5, atol=1e-6)
    assert table.distance.is_monotonic_increasing
    # the module-level function gives the same table without a map
    free = landing(toy, erased, "apple", space=SPACE, k=5)
    assert free.neighbour.tolist() == table.neighbour.tolist()
    # and the 2-D map's distances are not what the table reports
    xy = unet_map.points().set_index("word")[["x", "y"]]
    arrow = unet_map.arrows(toy, erased, ["apple"]).iloc[0]
    flat = np.hypot(xy.loc[table.neighbour, "x"] - arrow.x1, xy.loc[table.neighbour, "y"] - arrow.y1)
    assert not np.allclose(flat.to_numpy(), table.distance.to_numpy(), rtol=0.05)
    # the erased concept moved away from where it was
    before = unet_map.landing(toy, None, "apple", k=5)
    assert before.distance.iloc[0] < table.distance_before.iloc[0] or before.neighbour.tolist() != table.neighbour.tolist()


def test_same_seed_same_map_and_transform_lands_near_fit(toy, unet_map):
    again = LandingMap.fit(toy, space=SPACE, seed=0)
    np.testing.assert_array_equal(again.coords, unet_map.coords)
    moved = unet_map.transform(unet_map.embeddings[:60])
    own = np.linalg.norm(moved - unet_map.coords[:60], axis=1)
    # UMAP's transform re-embeds a fitted point near, not at, its place: within a fifth of the typical
    # distance between two points of the map (a margin no CPU's float rounding can cross)
    typical = np.median(np.linalg.norm(unet_map.coords[:60, None] - unet_map.coords[None, :60], axis=2))
    assert np.median(own) < 0.2 * typical
    with pytest.raises(ValueError, match="128 wide"):
        unet_map.transform(np.zeros((2, 384)))


def test_derived_embeddings_and_figure(toy, erased, unet_map, tmp_path):
    derived = unet_map.derived(toy, erased)
    assert derived.epoch.tolist() == [0, 1] and derived.concept.tolist() == ["apple", "apple"]
    assert np.isfinite(derived[["x", "y"]].to_numpy()).all()
    arrows = unet_map.arrows(toy, erased, ["apple", "car"])
    assert arrows.loc[0, "shift"] > arrows.loc[1, "shift"]
    fig = unet_map.figure(toy, erased)
    for suffix in ("pdf", "svg", "png"):
        path = plots.save(fig, tmp_path / f"landing.{suffix}")
        assert path.stat().st_size > 1000


def test_lens_last_layer_is_the_pipeline_image(toy, tiny_sd_dir):
    images = lens(toy, "an apple", steps=2)
    assert len(images) == n_text_layers(toy) == 6
    plain = toy("an apple", num_inference_steps=2, guidance_scale=5.0, generator=workbench.seeded(0)).images[0]
    assert np.abs(np.asarray(images[-1], int) - np.asarray(plain, int)).max() <= 1
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[-1]))
    sd = workbench.load(tiny_sd_dir)
    assert len(lens(sd, "an apple", layers=[0], steps=2)) == 1
    with pytest.raises(TypeError, match="one prompt"):
        lens(toy, ["an apple"])
