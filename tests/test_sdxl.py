"""Stable Diffusion XL through the model-family seam, on a tiny SDXL pipeline built from configs."""
import pytest
import torch
from PIL import Image

import workbench
from conftest import family_state, same_family_state
from workbench.anatomy import census, select, text_encoders
from workbench.attacks import ATTACKS, attack
from workbench.attnmaps import attention_maps
from workbench.concepts import ConceptSet
from workbench.embed import conditioning, embed, encode, spaces
from workbench.families import Conditioning, family_of
from workbench.judges import ClipJudge, tiny_clip
from workbench.methods import erase, esd, fewshot, rece, uce
from workbench.methods.esd import PRESETS, preset_parts
from workbench.sampling import generate, generate_from
from workbench.tracing import sites, trace

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    return ClipJudge.load(tiny_clip(tmp_path_factory.mktemp("clip")))


def images() -> list[Image.Image]:
    return [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (64, 64), (30, 200, 30))]


def test_a_tiny_sdxl_folder_loads_as_the_sdxl_family(sdxl):
    assert type(sdxl).__name__ == "StableDiffusionXLPipeline" and family_of(sdxl).name == "sdxl"
    assert text_encoders(sdxl) == ["text", "text2"]


def test_both_text_encoders_and_the_deeper_transformer_stacks_have_part_names(sdxl):
    assert select(sdxl, "text.1.ffn") == ["text.1.ffn.in", "text.1.ffn.out"]
    assert select(sdxl, "text2.1.attn.k") == ["text2.1.attn.k"]
    keys = select(sdxl, "unet.*.xattn.k")
    assert "unet.down.2.0.t1.xattn.k" in keys and len(keys) == 17
    assert select(sdxl, "unet.time.added") == ["unet.time.added.in", "unet.time.added.out"]
    components = set(census(sdxl)["component"])
    assert {"text.ffn", "text2.ffn", "unet.xattn.k"} <= components


def test_the_conditioning_is_the_pipelines_own_encoding(sdxl):
    cond = family_of(sdxl).encode(sdxl, ["a red apple", ""])
    ref = sdxl.encode_prompt(["a red apple", ""], device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(cond.tokens, ref[0]) and torch.equal(cond.pooled, ref[2])
    assert cond.tokens.shape[-1] == 32 + 48 == sdxl.unet.config.cross_attention_dim


def test_images_from_a_conditioning_are_the_pipelines_images(sdxl):
    made = generate_from(sdxl, conditioning(sdxl, ["a red apple"]), seed=3, steps=3)
    plain = generate(sdxl, ["a red apple"], seed=3, steps=3)
    assert made[0].tobytes() == plain[0].tobytes()
    with pytest.raises(ValueError, match="pooled text embedding"):
        generate_from(sdxl, encode(sdxl, ["a red apple"]), steps=2)


@pytest.mark.parametrize("method", ["uce", "rece"])
def test_closed_form_methods_edit_every_cross_attention_kv_of_sdxl_and_revert_exactly(sdxl, method):
    state = family_state(sdxl)
    edit = (uce if method == "uce" else rece)(sdxl, "apple", preserve=["a pear"])
    assert sorted(edit.parts) == sorted(select(sdxl, "unet.*.xattn.[kv]"))
    assert edit.deltas["unet.mid.0.t1.xattn.k.weight"].shape[1] == 80
    before = encode(sdxl, ["an apple"])
    with edit.apply(sdxl):
        keys = embed(sdxl, ["apple"], space="unet.mid.0.xattn.k")
    assert keys.shape == (1, 64)
    assert same_family_state(sdxl, state) and torch.equal(encode(sdxl, ["an apple"]), before)


def test_esd_presets_follow_the_authors_sdxl_choices(sdxl):
    counts = {p: len(preset_parts(sdxl, p)) for p in PRESETS}
    assert counts["esd-x-strict"] == 2 * 17 and counts["esd-x"] == 4 * 17
    state = family_state(sdxl)
    edit = esd(sdxl, "apple", preset="esd-x-strict", iterations=2, sample_steps=3, progress=False)
    assert len(edit.parts) == 34 and all(torch.isfinite(d).all() for d in edit.deltas.values())
    assert same_family_state(sdxl, state)


@pytest.mark.parametrize("parts, encoders", [(None, {"text", "text2"}), ("text.*.ffn", {"text"}),
                                             ("text2.*.ffn", {"text2"})])
def test_few_shot_unlearning_goes_through_either_text_encoder_or_both(sdxl, parts, encoders):
    state = family_state(sdxl)
    edit = fewshot(sdxl, "apple", images=images(), steps=2, parts=parts, progress=False)
    assert {p.split(".")[0] for p in edit.parts} == encoders
    assert any(float(d.abs().max()) > 0 for d in edit.deltas.values())
    with edit.apply(sdxl):
        changed = conditioning(sdxl, ["an apple"])
    plain = conditioning(sdxl, ["an apple"])
    assert not torch.equal(changed.tokens, plain.tokens)
    assert same_family_state(sdxl, state)


def test_landing_spaces_cover_each_encoder_the_conditioning_and_every_key_value_space(sdxl):
    names = spaces(sdxl)
    assert {"text", "text.0", "text.1", "text2.0", "text2.1", "unet.mid.0.t1.xattn.v"} <= set(names)
    assert embed(sdxl, ["apple", "car"], space="text").shape == (2, 80)
    assert embed(sdxl, ["apple", "car"], space="text2.1").shape == (2, 48)
    assert embed(sdxl, ["apple", "car"], space="text.0", pool="concept").shape == (2, 32)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ATTACKS))
def test_every_attack_runs_on_an_sdxl_edit_and_leaves_the_model_as_it_was(sdxl, judge, name):
    cs = ConceptSet.of(objects=["apple", "car"])
    state = family_state(sdxl)
    edit = uce(sdxl, "apple")
    budget = {"derived": None, "inversion": 2, "unlearndiff": 2, "concept_vector": 2}[name]
    result = attack(sdxl, edit, "apple", judge, name, budget, eval_seeds=[7000], concept_set=cs)
    embeds = result.crafted.embeds
    assert isinstance(embeds, Conditioning) and embeds.tokens.shape[-1] == 80 and embeds.pooled.shape[-1] == 32
    assert len(result.table) == len(result.images) > 0
    assert same_family_state(sdxl, state)


def test_tracing_restores_both_encoders_layers_and_every_unet_block(sdxl, judge):
    cs = ConceptSet.of(objects=["apple", "car"])
    state = family_state(sdxl)
    assert sites(sdxl)[:4] == ["text.0", "text.1", "text2.0", "text2.1"]
    t = trace(sdxl, "apple", "a photo of an apple", judge, concept_set=cs, n=1, steps=2)
    assert len(t.layers()) == 4 + 7
    assert same_family_state(sdxl, state)


def test_attention_maps_cover_every_sdxl_cross_attention_layer(sdxl):
    processors = dict(sdxl.unet.attn_processors)
    with uce(sdxl, "apple").apply(sdxl):
        maps = attention_maps(sdxl, "a photo of an apple", "apple", steps=2)
    assert len(maps.layers) == 17 and maps.total.shape == (64, 64)
    assert all(sdxl.unet.attn_processors[k] is v for k, v in processors.items())


def test_sdxl_in_bfloat16_runs_every_method_and_reverts_exactly(tiny_sdxl_dir):
    pipe = workbench.load(tiny_sdxl_dir, dtype=torch.bfloat16)
    state = family_state(pipe)
    for method in ("uce", "rece", "fewshot", "esd"):
        knobs = {"fewshot": {"images": images(), "steps": 2}, "esd": {"iterations": 1, "sample_steps": 2}}.get(method, {})
        edit = erase(pipe, "a red balloon", method, progress=False, **knobs)
        assert all(torch.isfinite(d).all() and d.dtype == torch.float32 for d in edit.deltas.values())
        with edit.apply(pipe):
            assert generate(pipe, ["a red balloon"], steps=2)[0].size == (64, 64)
    assert same_family_state(pipe, state)


@pytest.mark.parametrize("form", ["diffusers-folder", "safetensors", "ldm-checkpoint"])
def test_an_sdxl_edit_written_in_each_external_format_comes_back_reverts_exactly_and_is_attacked(sdxl, judge, form,
                                                                                                 tmp_path):
    from workbench.external import load_edit, save_erased

    cs = ConceptSet.of(objects=["apple", "car"])
    state = family_state(sdxl)
    native = fewshot(sdxl, "apple", images=images(), steps=2, parts="text2.*.ffn", progress=False) \
        if form == "diffusers-folder" else uce(sdxl, "apple")
    name = {"diffusers-folder": "erased", "ldm-checkpoint": "erased.ckpt", "safetensors": "erased.safetensors"}[form]
    path = save_erased(sdxl, native, tmp_path / name, form)
    imported = load_edit(sdxl, path, concept="apple")
    assert sorted(imported.deltas) == sorted(native.deltas)
    for key, delta in native.deltas.items():
        scale = float(dict(sdxl_parameters(sdxl))[key].abs().max())
        torch.testing.assert_close(imported.deltas[key], delta, rtol=0, atol=4 * scale * torch.finfo(torch.float32).eps)
    with imported.apply(sdxl):
        pass
    assert same_family_state(sdxl, state)
    mine = attack(sdxl, native, "apple", judge, "derived", eval_seeds=[7000], concept_set=cs)
    theirs = attack(sdxl, imported, "apple", judge, "derived", eval_seeds=[7000], concept_set=cs)
    assert mine.table["label"].tolist() == theirs.table["label"].tolist()
    assert same_family_state(sdxl, state)


def sdxl_parameters(pipe):
    from workbench.anatomy import parts
    from workbench.edits import parameter

    table = parts(pipe)
    return [(f"{name}.{attr}", parameter(table, f"{name}.{attr}").detach().float())
            for name in table for attr in ("weight", "bias") if getattr(table[name], attr, None) is not None]


def test_the_encoders_command_says_which_text_encoder_carries_a_concept(tiny_sdxl_dir, tmp_path, capsys):
    from workbench.cli import main

    main(["encoders", "--model", str(tiny_sdxl_dir), "--concept", "apple", "--against", "car",
          "--judge", str(tiny_clip(tmp_path / "clip")), "--n", "1"])
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines()[2:]]
    assert rows == ["none", "all", "text", "text2"] and "drop" in out


@pytest.mark.slow
def test_the_erase_and_sweep_panels_run_on_sdxl_and_keep_no_edit(sdxl):
    from workbench.sweep import layers
    from workbench.widgets import ErasePanel, SweepPanel

    state = family_state(sdxl)
    erase_panel = ErasePanel(sdxl, run=False, concept="a red balloon", method="uce", per_prompt=1, steps=2)
    erase_panel.button.click()
    assert erase_panel.error is None, repr(erase_panel.error)
    assert len(erase_panel.result["edit"].parts) == 34
    sweep = SweepPanel(sdxl, None, run=False, concept="a red balloon", method="uce", value="efficacy")
    sweep.button.click()
    assert sweep.error is None, repr(sweep.error)
    table = sweep.result["table"]
    assert len(table) == 2 * len(layers(sdxl, "uce")) == 2 * 17 and (table["dW_relative"] > 0).all()
    assert same_family_state(sdxl, state)


def test_a_grid_runs_on_an_sdxl_folder(tiny_sdxl_dir, tmp_path):
    from workbench.grid import run_grid

    grid = {"model": str(tiny_sdxl_dir), "concepts": ["a red balloon"], "methods": ["uce"],
            "parts": ["unet.mid.0.t1.xattn.k", "unet.down.1.0.xattn.v"], "measure": False}
    rows = run_grid(grid, tmp_path / "results", progress=False, log=lambda _: None)
    assert rows["error"].isna().all() and len(rows) == 2
    assert rows.set_index("part").loc["unet.mid.0.t1.xattn.k", "parts_edited"] == ("unet.mid.0.t1.xattn.k",)


def test_landing_tables_work_in_a_key_space_the_conditioning_and_the_second_encoders_layers(sdxl):
    from workbench.project import landing

    words = ["apple", "pear", "car", "cat", "dog", "sun", "moon", "tree"]
    state = family_state(sdxl)
    edit = rece(sdxl, "apple")
    keys = landing(sdxl, edit, "apple", k=3, space="unet.mid.0.t1.xattn.k", vocabulary=words)
    assert len(keys) == 3 and (keys["distance"] != keys["distance_before"]).any()
    for space in ("text", "text2.1"):
        table = landing(sdxl, edit, "apple", k=3, space=space, vocabulary=words)
        assert (table["distance"] == table["distance_before"]).all()  # RECE leaves the text encoders alone
    assert same_family_state(sdxl, state)
