"""The bundled toy DiT: the icon world drawn by a FLUX transformer, loaded as a real FluxPipeline."""
import pytest
import torch

import workbench
from conftest import family_state, same_family_state
from workbench.anatomy import select
from workbench.families import family_of
from workbench.methods import erase
from workbench.profile import profile_of


@pytest.fixture(scope="module")
def toy_dit():
    return workbench.load("toy-dit")


def test_the_toy_dit_loads_as_a_flux_pipeline_with_minilm_in_both_slots(toy_dit):
    assert type(toy_dit).__name__ == "FluxPipeline" and family_of(toy_dit).name == "flux"
    assert type(toy_dit.text_encoder).__name__ == type(toy_dit.text_encoder_2).__name__ == "BertModel"
    assert toy_dit.text_encoder is not toy_dit.text_encoder_2
    assert profile_of(toy_dit).name == "toy-dit"
    assert len(select(toy_dit, "dit.*.text.[kv]")) == 2 * 6 and len(select(toy_dit, "dit.single.*.q")) == 2


def test_the_toy_dit_draws_32_pixel_images_and_its_vae_reads_the_shift(toy_dit):
    assert toy_dit.vae.config.shift_factor is not None
    images = workbench.generate(toy_dit, ["a red apple", "a cat by van gogh"], seed=0, steps=4)
    assert [im.size for im in images] == [(32, 32)] * 2
    assert images[0].tobytes() != images[1].tobytes()


def test_an_erasure_of_the_toy_dit_applies_and_reverts_exactly(toy_dit):
    state = family_state(toy_dit)
    edit = erase(toy_dit, "apple", "uce")
    assert sorted(edit.parts) == ["dit.context.proj", "dit.pooled.in"]
    with edit.apply(toy_dit):
        assert not same_family_state(toy_dit, state)
    assert same_family_state(toy_dit, state)


def test_attention_maps_of_the_toy_dit_record_only_the_conditional_call_of_each_step(toy_dit):
    from workbench.attnmaps import attention_maps, recording
    from workbench.embed import word_positions
    assert family_of(toy_dit).branches_apart(toy_dit, 5.0) and not family_of(toy_dit).branches_apart(toy_dit, 1.0)
    positions = word_positions(toy_dit, "a red apple", "apple")
    with recording(toy_dit, positions, ["dit.0", "dit.single.1"], branches_apart=True) as sums:
        workbench.generate(toy_dit, ["a red apple"], seed=0, steps=3, guidance=5.0)
    assert sums["dit.0#steps"] == sums["dit.single.1#steps"] == 3
    with recording(toy_dit, positions, ["dit.0"], branches_apart=True) as both:
        workbench.generate(toy_dit, ["a red apple"], seed=0, steps=3, guidance=1.0)  # one call per step
    assert both["dit.0#steps"] == 2  # what the flag would do on a sampler that did not run two branches
    maps = attention_maps(toy_dit, "a red apple", "apple", steps=3)
    assert list(maps.layers)[:2] == ["dit.0", "dit.1"] and maps.total.shape == (32, 32)
