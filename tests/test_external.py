"""Erasures made elsewhere: a native edit written as a diffusers folder, a safetensors file or an LDM
checkpoint reads back as the same deltas, applies and reverts exactly and is attacked the same; files
that do not fit the pipeline are refused and leave it unchanged."""
import shutil

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

import workbench
from conftest import same_state, state_of
from workbench.anatomy import parts
from workbench.attacks import attack
from workbench.edits import Edit
from workbench.external import load_edit, save_erased
from workbench.methods import erase, uce
from workbench.profile import profile_of

WRITTEN_AS = {"diffusers-folder": "unet", "safetensors": "erased.safetensors", "ldm-checkpoint": "erased.pt"}


class NotATensor:
    """Something a weights-only unpickler must refuse."""


@pytest.fixture(scope="module")
def tiny(tiny_sd_dir):
    return workbench.load(tiny_sd_dir)


@pytest.fixture(scope="module")
def native(toy, tiny):
    """Each model's pipeline and a native UCE edit of "apple" (UNet cross-attention k and v)."""
    return {"toy": (toy, uce(toy, "apple")), "tiny": (tiny, erase(tiny, "apple", "uce"))}


def every_part(pipe, seed=0) -> Edit:
    """An edit of every weight and bias of every part, text encoder and UNet."""
    g = torch.Generator().manual_seed(seed)
    deltas = {f"{name}.{attr}": 1e-2 * torch.randn(p.shape, generator=g)
              for name, module in parts(pipe).items() for attr, p in module.named_parameters(recurse=False)}
    return Edit(deltas, "test", "everything")


def assert_same_deltas(pipe, imported: Edit, native: Edit) -> None:
    """The same keys, and values equal up to float32's rounding of (W + dW) - W."""
    assert sorted(imported.deltas) == sorted(native.deltas)
    table = parts(pipe)
    for key, delta in native.deltas.items():
        part, attr = key.rsplit(".", 1)
        w = getattr(table[part], attr).detach().float()
        atol = 4 * torch.finfo(torch.float32).eps * float((w.abs() + delta.abs()).max())
        torch.testing.assert_close(imported.deltas[key], delta, rtol=1e-5, atol=atol)


def assert_applies_and_reverts_exactly(pipe, edit: Edit) -> None:
    before = state_of(pipe)
    with edit.apply(pipe):
        assert not same_state(pipe, before)
    assert same_state(pipe, before)


def round_trip(pipe, edit: Edit, folder, format: str, **options) -> Edit:
    """Write ``edit`` in ``format``, check the pipeline is exactly as before, and read it back."""
    before = state_of(pipe)
    path = save_erased(pipe, edit, folder / WRITTEN_AS[format], format=format, **options)
    assert same_state(pipe, before)
    imported = load_edit(pipe, path, concept=edit.concept)
    assert same_state(pipe, before)
    assert imported.params["format"] == format and imported.params["source"] == str(path)
    return imported


@pytest.mark.parametrize("model", ["toy", "tiny"])
def test_an_edit_written_as_a_diffusers_unet_folder_comes_back_as_the_same_deltas(native, model, tmp_path):
    pipe, edit = native[model]
    imported = round_trip(pipe, edit, tmp_path, "diffusers-folder")
    assert_same_deltas(pipe, imported, edit)
    assert_applies_and_reverts_exactly(pipe, imported)
    counts = imported.params["counts"]  # the whole UNet was read; only what changed is in the edit
    assert counts["changed"] == len(edit.deltas) and counts["read"] == len(pipe.unet.state_dict())
    assert imported.params["components"] == ["unet"] and imported.concept == "apple"


@pytest.mark.parametrize("model", ["toy", "tiny"])
def test_an_edit_written_as_a_safetensors_file_of_the_changed_modules_comes_back_as_the_same_deltas(
        native, model, tmp_path):
    pipe, edit = native[model]
    imported = round_trip(pipe, edit, tmp_path, "safetensors")
    assert_same_deltas(pipe, imported, edit)
    assert_applies_and_reverts_exactly(pipe, imported)
    assert imported.params["counts"]["read"] == len(edit.deltas)  # k and v have no bias
    assert imported.method == "external" and imported.params["naming"] == "diffusers"


@pytest.mark.parametrize("model", ["toy", "tiny"])
def test_an_edit_written_as_an_ldm_checkpoint_comes_back_as_the_same_deltas(native, model, tmp_path):
    pipe, edit = native[model]
    imported = round_trip(pipe, edit, tmp_path, "ldm-checkpoint")
    assert_same_deltas(pipe, imported, edit)
    assert_applies_and_reverts_exactly(pipe, imported)
    assert imported.params["naming"] == "ldm"


@pytest.mark.parametrize("model", ["toy", "tiny"])
def test_an_edit_of_every_part_of_both_components_survives_each_format(native, model, tmp_path):
    pipe = native[model][0]
    edit = every_part(pipe)
    for format in WRITTEN_AS:
        imported = round_trip(pipe, edit, tmp_path / format, format)
        assert_same_deltas(pipe, imported, edit)
        assert imported.params["components"] == ["text_encoder", "unet"]
    assert_applies_and_reverts_exactly(pipe, imported)


def test_ldm_names_are_those_of_stable_diffusion_checkpoints(native, tmp_path):
    pipe = native["tiny"][0]  # SD 1.4's block layout
    keys = set(torch.load(save_erased(pipe, every_part(pipe), tmp_path / "sd.ckpt", format="ldm-checkpoint"),
                          weights_only=True))
    unet = "model.diffusion_model."
    assert {unet + k for k in [
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "input_blocks.3.0.op.weight",
        "input_blocks.7.0.skip_connection.weight", "middle_block.1.proj_in.weight",
        "middle_block.2.in_layers.2.weight", "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.bias",
        "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight", "time_embed.0.weight", "out.2.weight",
    ]} | {"cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight"} <= keys
    assert len(keys) == len(pipe.unet.state_dict()) + len(pipe.text_encoder.state_dict())


def test_an_esd_style_partial_checkpoint_reads_the_same_with_or_without_its_prefix_and_wrapper(native, tmp_path):
    pipe, edit = native["tiny"]
    full = torch.load(save_erased(pipe, edit, tmp_path / "full.ckpt", format="ldm-checkpoint"), weights_only=True)
    xattn = {k: v for k, v in full.items() if ".attn2." in k}  # what esd-x trains: cross-attention only
    bare = {k.removeprefix("model.diffusion_model."): v for k, v in xattn.items()}
    whole = {**full, "first_stage_model.decoder.conv_in.weight": torch.zeros(1), "betas": torch.zeros(3)}
    for name, state in [("esd-x.pt", xattn), ("wrapped.ckpt", {"state_dict": xattn, "global_step": 7}),
                        ("bare.pth", bare), ("whole.ckpt", whole)]:
        torch.save(state, tmp_path / name)
        imported = load_edit(pipe, tmp_path / name)
        assert_same_deltas(pipe, imported, edit)
        assert imported.params["format"] == "ldm-checkpoint"
    assert imported.params["ignored"] == {"first_stage_model": 1, "(top level)": 1}


def test_whole_weights_give_an_edit_of_only_what_changed(native, tmp_path):
    pipe, edit = native["tiny"]
    with edit.apply(pipe):
        whole = {**{f"unet.{k}": v.clone() for k, v in pipe.unet.state_dict().items()},
                 **{f"text_encoder.{k}": v.clone() for k, v in pipe.text_encoder.state_dict().items()}}
    save_file(whole, tmp_path / "whole.safetensors")
    imported = load_edit(pipe, tmp_path / "whole.safetensors")
    assert_same_deltas(pipe, imported, edit)
    assert imported.params["counts"]["unchanged"] == len(whole) - len(edit.deltas)
    assert imported.params["components"] == ["text_encoder", "unet"]


def test_a_sharded_unet_folder_and_a_whole_pipeline_folder_read_the_same(native, tiny_sd_dir, tmp_path):
    pipe, edit = native["tiny"]
    sharded = save_erased(pipe, edit, tmp_path / "unet", format="diffusers-folder", max_shard_size="100KB")
    assert (sharded / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert_same_deltas(pipe, load_edit(pipe, sharded), edit)
    folder = shutil.copytree(tiny_sd_dir, tmp_path / "pipeline")
    shutil.rmtree(folder / "unet")
    shutil.copytree(sharded, folder / "unet")
    imported = load_edit(pipe, folder)
    assert_same_deltas(pipe, imported, edit)
    assert imported.params["components"] == ["text_encoder", "unet"]
    with pytest.warns(UserWarning, match="the edit is empty"):  # the base model itself
        assert load_edit(pipe, tiny_sd_dir).deltas == {}


def test_a_bare_file_goes_to_the_component_its_keys_name_or_the_one_given(native, tmp_path):
    pipe = native["tiny"][0]
    text_only = Edit({k: v for k, v in every_part(pipe).deltas.items() if k.startswith("text.1.ffn.")},
                     "test", "x")
    path = save_erased(pipe, text_only, tmp_path / "text.safetensors")
    assert all(".layers.1.mlp.fc" in k and not k.startswith("text_encoder.") for k in load_file(path))  # bare
    imported = load_edit(pipe, path)
    assert_same_deltas(pipe, imported, text_only)
    assert imported.params["components"] == ["text_encoder"]
    assert_same_deltas(pipe, load_edit(pipe, path, component="text_encoder"), text_only)
    # AdvUnlearn's way: torch.save of the text encoder's state dict, in the names of the hub's
    # CLIP folders (text_model.encoder...), which are also those in LDM checkpoints
    ldm = torch.load(save_erased(pipe, text_only, tmp_path / "sd.ckpt", format="ldm-checkpoint"), weights_only=True)
    hub = {k.removeprefix("cond_stage_model.transformer."): v for k, v in ldm.items() if k.startswith("cond_stage")}
    assert "text_model.encoder.layers.1.mlp.fc1.weight" in hub
    torch.save(hub, tmp_path / "advunlearn.pt")
    imported = load_edit(pipe, tmp_path / "advunlearn.pt")
    assert_same_deltas(pipe, imported, text_only)
    assert imported.params["format"] == "torch-checkpoint" and imported.params["components"] == ["text_encoder"]
    before = state_of(pipe)
    with pytest.raises(ValueError, match="unet has no such parameter"):
        load_edit(pipe, path, component="unet")
    save_file({"encoder.layer.0.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="cannot tell which component.*name no parameter.*component= one of unet"):
        load_edit(pipe, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="component cannot be 'vae'; this pipeline has unet, text_encoder"):
        load_edit(pipe, path, component="vae")
    assert same_state(pipe, before)


def test_an_imported_edit_is_attacked_like_the_native_one(native, tmp_path):
    pipe, edit = native["toy"]
    imported = load_edit(pipe, save_erased(pipe, edit, tmp_path / "esd.pt", format="ldm-checkpoint"))
    judge = profile_of(pipe).judge()
    rows = [attack(pipe, e, "apple", judge, "derived", eval_seeds=[7000]) for e in (edit, imported)]
    pd.testing.assert_frame_equal(rows[1].table, rows[0].table)
    assert rows[1].crafted.prompts == rows[0].crafted.prompts


def test_a_file_with_a_key_or_shape_the_unet_lacks_is_refused_and_the_pipeline_is_unchanged(native, tmp_path):
    pipe, edit = native["tiny"]
    good = load_file(save_erased(pipe, edit, tmp_path / "good.safetensors"))
    before = state_of(pipe)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    ldm = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    bad = {"extra key": {**good, key.replace("attn2", "attn9"): good[key].clone()},
           "shape": {**good, key: good[key][:, :-1].contiguous()},
           "ldm key": {"model.diffusion_model.input_blocks.99.1.proj_in.weight": good[key]},
           "ldm shape": {ldm: good[key][:3].clone()},
           "many": {f"unet.down_blocks.0.nothing.{i}.weight": good[key].clone() for i in range(9)}}
    messages = {"extra key": r"1 mismatch\(es\): unet.down_blocks.0.*attn9.to_k.weight: this pipeline's unet has no",
                "shape": r"the file has shape \(32, 31\), the model \(32, 32\)",
                "ldm key": "input_blocks.99.1.proj_in.weight: this UNet has no such parameter",
                "ldm shape": rf"unet.{key} \({ldm} in the file\): the file has shape \(3, 32\)",
                "many": r"9 mismatch\(es\).*nothing.5.weight: .*\(and 3 more\)"}
    for name, tensors in bad.items():
        save_file(tensors, tmp_path / f"{name}.safetensors")
        with pytest.raises(ValueError, match="does not fit this pipeline; the pipeline was not changed"):
            load_edit(pipe, tmp_path / f"{name}.safetensors")
        with pytest.raises(ValueError, match=messages[name]):
            load_edit(pipe, tmp_path / f"{name}.safetensors")
    assert same_state(pipe, before)


def test_a_pickle_that_needs_more_than_tensors_is_refused_unread(native, tmp_path):
    pipe, edit = native["tiny"]
    before = state_of(pipe)
    torch.save({"model.diffusion_model.out.2.weight": torch.zeros(1), "note": NotATensor()}, tmp_path / "esd.ckpt")
    with pytest.raises(ValueError, match=r"cannot be read safely.*needs test_external.NotATensor.*"
                                         r"weights_only=True.*never running.*save_file"):
        load_edit(pipe, tmp_path / "esd.ckpt")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot be read safely"):
        load_edit(pipe, tmp_path / "junk.pt")
    edit.save(tmp_path / "native.safetensors")
    with pytest.raises(ValueError, match=r"is a workbench edit.*Edit.load"):
        load_edit(pipe, tmp_path / "native.safetensors")
    assert same_state(pipe, before)


def test_a_changed_norm_is_refused_unless_strict_is_off_and_then_recorded(native, tmp_path):
    pipe, edit = native["tiny"]
    before = state_of(pipe)
    norm = "mid_block.attentions.0.norm.weight"
    with edit.apply(pipe):
        whole = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    whole[norm] = whole[norm] + 1
    save_file(whole, tmp_path / "unet.safetensors")
    with pytest.raises(ValueError, match=r"1 parameter\(s\) that belong to no editable part.*"
                                         rf"unet.{norm}.*strict=False"):
        load_edit(pipe, tmp_path / "unet.safetensors")
    imported = load_edit(pipe, tmp_path / "unet.safetensors", strict=False)
    assert_same_deltas(pipe, imported, edit)
    assert imported.params["skipped"] == [f"unet.{norm}"] and imported.params["counts"]["skipped"] == 1
    assert same_state(pipe, before)


def test_a_half_precision_file_is_compared_at_its_own_precision(native, tmp_path):
    pipe, edit = native["tiny"]
    with edit.apply(pipe):
        half = {k: v.half() for k, v in pipe.unet.state_dict().items()}
    save_file(half, tmp_path / "fp16.safetensors")
    imported = load_edit(pipe, tmp_path / "fp16.safetensors", component="unet")
    assert sorted(imported.deltas) == sorted(edit.deltas)  # every unchanged weight rounds to the file's
    assert imported.params["dtypes"] == ["float16"]
    for key, delta in edit.deltas.items():
        torch.testing.assert_close(imported.deltas[key], delta, rtol=0, atol=1e-2 * float(delta.abs().max()) + 1e-3)
