"""FLUX.1 and SD 3 through the model-family seam: loading, part names, conditioning, the closed forms on
every matrix that reads text, the derived-embedding attack and erasures made elsewhere, on tiny
pipelines built from configs."""
import numpy as np
import pytest
import torch

import workbench
from conftest import family_state, same_family_state
from workbench.anatomy import component_of, layer_of, select, text_encoders
from workbench.attacks.derived import derived
from workbench.concepts import ConceptSet
from workbench.embed import concept_spans, conditioning, word_positions
from workbench.external import load_edit, save_erased
from workbench.families import Conditioning, family_of
from workbench.keys import rows as entry_rows
from workbench.methods import REGISTRY, erase, rece, uce
from workbench.sampling import generate, generate_from

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_tiny_flux_and_sd3_folders_load_as_their_families(flux, sd3):
    assert type(flux).__name__ == "FluxPipeline" and family_of(flux).name == "flux"
    assert type(sd3).__name__ == "StableDiffusion3Pipeline" and family_of(sd3).name == "sd3"
    assert text_encoders(flux) == ["text", "text2"] and text_encoders(sd3) == ["text", "text2", "text3"]


def test_the_transformer_has_stable_part_names_for_both_streams_single_blocks_and_embedders(flux, sd3):
    assert select(flux, "dit.*.text.[kv]") == ["dit.0.text.k", "dit.0.text.v", "dit.1.text.k", "dit.1.text.v"]
    assert select(flux, "dit.0.img.ffn") == ["dit.0.img.ffn.in", "dit.0.img.ffn.out"]
    assert select(flux, "dit.single.1") == [f"dit.single.1.{p}" for p in ("mod", "q", "k", "v", "ffn.in", "out")]
    assert {"dit.context.proj", "dit.pooled.in", "dit.time.guidance.in", "dit.out.proj"} <= set(select(flux, "dit.*"))
    assert select(sd3, "dit.0.img.attn2") == [f"dit.0.img.attn2.{p}" for p in ("q", "k", "v", "out")]
    assert "dit.1.text.out" not in select(sd3, "dit.*")  # SD 3's last text stream ends after attention
    assert select(flux, "text2.0.ffn") == ["text2.0.ffn.in", "text2.0.ffn.gate", "text2.0.ffn.out"]
    assert select(sd3, "text3.1.attn.q") == ["text3.1.attn.q"]
    assert (layer_of("dit.single.1.ffn.in"), component_of("dit.1.text.k")) == ("dit.single.1", "text.k")


def test_the_conditioning_is_the_pipelines_own_encoding(flux, sd3):
    prompts = ["a red apple", ""]
    cond = family_of(flux).encode(flux, prompts)
    with torch.no_grad():
        tokens, pooled, _ = flux.encode_prompt(prompts, None, max_sequence_length=32)
    torch.testing.assert_close(cond.tokens, tokens)
    assert torch.equal(cond.pooled, pooled) and cond.tokens.shape == (2, 32, 32)
    cond = family_of(sd3).encode(sd3, prompts)
    with torch.no_grad():
        tokens, _, pooled, _ = sd3.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                 max_sequence_length=32)
    assert torch.equal(cond.tokens, tokens) and torch.equal(cond.pooled, pooled)
    assert cond.tokens.shape == (2, 32 + 32, 96)  # CLIP rows (32 + 48 wide, padded to 96), then T5 rows


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_images_from_a_conditioning_are_the_pipelines_images(name, request):
    pipe = request.getfixturevalue(name)
    made = generate_from(pipe, conditioning(pipe, ["a red apple"]), seed=3, steps=3, guidance=3.0)
    generator = workbench.seeded(3)
    plain = pipe(["a red apple"], num_inference_steps=3, guidance_scale=3.0, generator=generator,
                 max_sequence_length=32, height=32, width=32).images
    assert made[0].tobytes() == plain[0].tobytes()
    assert generate(pipe, ["a red apple"], seed=3, steps=3, guidance=3.0)[0].tobytes() == plain[0].tobytes()
    with pytest.raises(ValueError, match="pooled text embedding"):
        generate_from(pipe, conditioning(pipe, ["a red apple"]).tokens, steps=2)


def test_sd3_without_t5_conditions_on_zeros_as_the_pipeline_does(tiny_sd3_dir):
    pipe = workbench.load(tiny_sd3_dir)
    pipe.text_encoder_3 = pipe.tokenizer_3 = None
    cond = conditioning(pipe, ["a red apple"])
    assert cond.tokens.shape == (1, 32 + 256, 96) and not cond.tokens[:, 32:].any()
    plain = pipe(["a red apple"], num_inference_steps=2, guidance_scale=3.0, generator=workbench.seeded(1),
                 height=32, width=32).images
    assert generate_from(pipe, cond, seed=1, steps=2, guidance=3.0)[0].tobytes() == plain[0].tobytes()


def test_the_concept_rows_are_t5s_on_flux_and_both_clip_and_t5_runs_on_sd3(flux, sd3):
    # the ASCII tokenizers give one token per character after the first of each word
    assert word_positions(flux, "a red apple", "apple") == [4, 5, 6, 7, 8]  # T5: no start token
    assert concept_spans(flux, ["a red apple"]) == [[(4, 32)]]
    assert word_positions(sd3, "a red apple", "apple") == [5, 6, 7, 8, 9] + [32 + p for p in (4, 5, 6, 7, 8)]
    assert concept_spans(sd3, ["a red apple", ""]) == [[(5, 32), (36, 64)], [(0, 32), (32, 64)]]


def test_a_blocks_text_keys_are_captured_per_prompt_and_timestep_and_differ_from_the_token_rows(flux):
    found = entry_rows(flux, ["an apple", "a car"], ["tokens", "pooled", "dit.1.text"])
    assert found["tokens"].shape == (2, 32, 32) and found["pooled"].shape == (2, 1, 32)
    keys = found["dit.1.text"]
    assert keys.shape == (2 * 3, 32, 32)
    assert not torch.allclose(keys[0], keys[1])  # the timestep modulates the text stream
    again = entry_rows(flux, ["a car"], ["dit.1.text"])["dit.1.text"]
    torch.testing.assert_close(again, keys[3:], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="dit.0.text"):
        entry_rows(flux, ["a car"], ["dit.0.img"])


@pytest.mark.parametrize("method", [uce, rece])
def test_closed_forms_edit_where_text_enters_by_default_and_revert_exactly(dit, method):
    state = family_state(dit)
    edit = method(dit, "apple", preserve=["a pear"])
    assert sorted(edit.parts) == ["dit.context.proj", "dit.pooled.in"]
    before = conditioning(dit, ["an apple"])
    with edit.apply(dit):
        assert not same_family_state(dit, state)
        assert torch.equal(conditioning(dit, ["an apple"]).tokens, before.tokens)  # the encoders are untouched
    assert same_family_state(dit, state)


def test_uce_maps_the_concept_rows_to_the_guides_through_context_embedder_and_keeps_preserved_prompts(flux):
    edit = uce(flux, "apple", guide="car", preserve=["a pear"], parts="dit.context.proj", lam=1e-4,
               preserve_scale=10.0)
    proj = select(flux, "dit.context.proj")[0]
    layer = workbench.anatomy.parts(flux)[proj]
    rows = conditioning(flux, ["apple", "car", "a pear"]).tokens
    with torch.no_grad():
        before = layer(rows)
        with edit.apply(flux):
            after = layer(rows)
    (a, end), = concept_spans(flux, ["apple"])[0]
    (b, _), = concept_spans(flux, ["car"])[0]
    n = min(end - a, 32 - b)
    gap_before = (before[0, a:a + n] - before[1, b:b + n]).norm()
    gap_after = (after[0, a:a + n] - before[1, b:b + n]).norm()
    assert gap_after < 0.2 * gap_before
    assert (after[2] - before[2]).norm() < 0.2 * (after[0] - before[0]).norm()


@pytest.mark.parametrize("method", [uce, rece])
def test_closed_forms_edit_each_double_blocks_text_kv_with_the_keys_that_block_sees(dit, method):
    state = family_state(dit)
    edit = method(dit, "apple", preserve=["a pear"], parts="dit.*.text.[kv]")
    assert sorted(edit.parts) == select(dit, "dit.*.text.[kv]")
    assert all(torch.isfinite(d).all() and d.abs().max() > 0 for d in edit.deltas.values())
    with edit.apply(dit):
        images = generate(dit, ["an apple"], seed=0, steps=2)
    assert images[0].size == (32, 32) and same_family_state(dit, state)


def test_rece_derives_an_embedding_in_each_space_it_edits(flux):
    edit = rece(flux, "apple", parts=["dit.context.proj", "dit.pooled.in", "dit.1.text.k"], epochs=2)
    assert {"derived.1", "derived.pooled.1", "derived.dit.1.text.1"} <= set(edit.extras)
    assert edit.extras["derived.1"].shape == (32, 32) and edit.extras["derived.pooled.1"].shape == (1, 32)
    assert edit.extras["derived.dit.1.text.1"].shape == (3, 32, 32)


def test_closed_forms_refuse_a_part_that_does_not_read_text_and_name_the_ones_that_do(flux):
    with pytest.raises(ValueError, match=r"dit\.\*\.text\.\[kv\]"):
        uce(flux, "apple", parts="dit.0.img.k")
    with pytest.raises(ValueError, match="few-shot"):
        rece(flux, "apple", parts="text2.0.ffn")


def test_the_derived_embedding_attack_answers_an_edit_of_context_embedder_and_pooled_projection(dit):
    cs = ConceptSet.of(objects=["apple", "car"])
    with uce(dit, "apple").apply(dit):
        crafted = derived(dit, "apple", cs)
    plain = conditioning(dit, [p.removeprefix("derived from: ") for p in crafted.prompts])
    assert isinstance(crafted.embeds, Conditioning)
    assert crafted.embeds.tokens.shape == plain.tokens.shape and crafted.embeds.pooled.shape == plain.pooled.shape
    assert not torch.allclose(crafted.embeds.tokens, plain.tokens)
    assert not torch.allclose(crafted.embeds.pooled, plain.pooled)
    with uce(dit, "apple", parts="dit.*.text.[kv]").apply(dit):
        unmoved = derived(dit, "apple", cs)
    context = workbench.anatomy.parts(dit)["dit.context.proj"]
    with torch.no_grad():  # what the transformer sees of the derived rows is what it saw of the prompts'
        torch.testing.assert_close(context(unmoved.embeds.tokens), context(plain.tokens), rtol=0.02, atol=0.02)


def test_the_layer_sweep_of_the_closed_forms_walks_the_double_blocks_text_kv(flux):
    scope, components = REGISTRY["uce"].scope_on(flux)
    assert select(flux, scope) == select(flux, "dit.*.text.[kv]") and components == ("text.k", "text.v")
    edit = erase(flux, "apple", "uce", parts="dit.1.text.v")
    assert edit.parts == ["dit.1.text.v"]


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_closed_forms_in_bfloat16_keep_float32_deltas_and_revert_exactly(name, request):
    folder = request.getfixturevalue(f"tiny_{name}_dir")
    pipe = workbench.load(folder, dtype=torch.bfloat16)
    state = family_state(pipe)
    for method in (uce, rece):
        edit = method(pipe, "apple", parts=["dit.context.proj", "dit.pooled.in", "dit.0.text.k"])
        assert all(d.dtype == torch.float32 for d in edit.deltas.values())
        with edit.apply(pipe):
            assert generate(pipe, ["an apple"], seed=0, steps=2)[0].size == (32, 32)
        assert same_family_state(pipe, state)


@pytest.mark.parametrize("form", ["diffusers-folder", "safetensors"])
def test_a_transformer_edit_written_elsewhere_comes_back_and_reverts_exactly(dit, form, tmp_path):
    state = family_state(dit)
    edit = uce(dit, "apple", parts=["dit.context.proj", "dit.*.text.[kv]"])
    path = save_erased(dit, edit, tmp_path / ("erased" if form == "diffusers-folder" else "erased.safetensors"), form)
    back = load_edit(dit, path)
    assert sorted(back.parts) == sorted(edit.parts)
    assert all(torch.equal(back.deltas[k], edit.deltas[k].to(back.deltas[k].dtype)) for k in edit.deltas)
    with back.apply(dit):
        assert not same_family_state(dit, state)
    assert same_family_state(dit, state)


def test_an_unknown_pipeline_class_is_refused_with_the_families_the_workbench_loads(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    with pytest.raises(ValueError, match="FluxPipeline"):
        workbench.load(tmp_path)


def test_flux_dev_is_distilled_and_its_denoiser_takes_the_guidance_as_input(flux):
    family = family_of(flux)
    assert family.distilled(flux)
    x = family.noise(flux, workbench.seeded(0))
    cond = conditioning(flux, ["an apple"])
    with torch.no_grad():
        a = family.denoise(flux, x, torch.tensor(500.0), cond, guidance=1.0)
        b = family.denoise(flux, x, torch.tensor(500.0), cond, guidance=6.0)
    assert a.shape == x.shape and not torch.allclose(a, b)


def test_the_flow_matching_pair_is_a_straight_line_from_image_to_noise_with_velocity_target(flux):
    family = family_of(flux)
    clean, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    noisy, target = family.training_pair(flux, clean, noise, torch.tensor([0, 1000]))
    torch.testing.assert_close(noisy[0], clean[0])
    torch.testing.assert_close(noisy[1], noise[1])
    torch.testing.assert_close(target, noise - clean)
    assert np.isclose(family.sampling_scheduler(flux).config.shift, np.exp(0.5 + (64 - 256) * 0.65 / 3840))
