"""ESD: presets, exact apply/revert (convolutions and biases included), a pipeline never changed by
training, erasure on the toy model, half precision, and the UNet FFN-versus-attention runs."""
import pytest
import torch

import workbench
from conftest import same_state, state_of
from workbench.anatomy import select
from workbench.methods import defaults, erase, esd
from workbench.methods.esd import PRESETS, preset_parts
from workbench.metrics import accuracy
from workbench.sweep import UNET_SUBSETS, unet_subsets


def test_esd_presets_select_the_parts_the_authors_name(toy):
    unet = select(toy, "unet.*")
    assert preset_parts(toy, "esd-all") == unet
    assert preset_parts(toy, "esd-x") == [n for n in unet if ".xattn." in n]
    assert preset_parts(toy, "esd-x-strict") == select(toy, ["unet.*.xattn.k", "unet.*.xattn.v"])
    assert set(preset_parts(toy, "esd-u")) == set(unet) - set(preset_parts(toy, "esd-x"))
    assert "unet.in.conv" in preset_parts(toy, "esd-u") and "unet.mid.0.attn.q" in preset_parts(toy, "esd-u")


def test_bad_esd_input_lists_what_is_valid_and_changes_nothing(toy):
    before = state_of(toy)
    with pytest.raises(ValueError, match="esd-x.*esd-x-strict.*esd-u.*esd-all"):
        esd(toy, "apple", preset="esd-xl")
    with pytest.raises(ValueError, match="text-encoder parts.*fewshot"):
        esd(toy, "apple", parts="text.*.ffn")
    with pytest.raises(KeyError, match="unet.mid.0.ffn.in"):
        esd(toy, "apple", parts="unet.*.mlp.z")
    with pytest.raises(ValueError, match="iterations must be positive"):
        esd(toy, "apple", iterations=0)
    with pytest.raises(ValueError, match="timestep cannot be 'last'; choose one of reference, reached"):
        esd(toy, "apple", timestep="last")
    assert same_state(toy, before)


def test_an_esd_edit_of_convolutions_and_biases_applies_and_reverts_exactly(toy):
    before = state_of(toy)
    flags = {n: p.requires_grad for n, p in toy.unet.named_parameters()}
    edit = esd(toy, "apple", preset="esd-u", iterations=2, sample_steps=3, lr=1e-4, progress=False)
    assert same_state(toy, before)  # training never touches the pipeline
    assert {n: p.requires_grad for n, p in toy.unet.named_parameters()} == flags
    assert all(p.grad is None for p in toy.unet.parameters())
    assert {"unet.down.0.0.res.conv1.weight", "unet.down.0.0.res.conv1.bias", "unet.in.conv.weight"} <= set(edit.deltas)
    assert edit.deltas["unet.down.0.0.res.conv1.weight"].shape == toy.unet.down_blocks[0].resnets[0].conv1.weight.shape
    assert edit.method == "esd" and edit.params["preset"] == "esd-u" and len(edit.parts) == 104
    with edit.apply(toy):
        assert not same_state(toy, before)
    assert same_state(toy, before)


def test_the_reference_timestep_is_drawn_from_the_schedules_slice_of_the_sampling_step():
    from workbench.methods.esd import _Trainer

    trainer = _Trainer.__new__(_Trainer)
    trainer.gen, trainer.device = torch.Generator().manual_seed(0), torch.device("cpu")
    trainer.sched = type("S", (), {"config": type("C", (), {"num_train_timesteps": 1000})(),
                                   "timesteps": torch.arange(50)})()
    assert all(0 <= int(trainer.reference_timestep(0)) < 20 for _ in range(20))
    assert all(980 <= int(trainer.reference_timestep(49)) < 1000 for _ in range(20))


@pytest.mark.slow
def test_esd_erases_apple_from_the_toy_model_and_keeps_a_car(toy, oracle):
    edit = erase(toy, "apple", "esd", preset="esd-x", iterations=30, lr=3e-4, sample_steps=4, progress=False)
    assert edit.params["prompts"] == ["a photo of an apple", "a picture of an apple", "an icon of an apple", "apple"]
    with edit.apply(toy):
        after = accuracy(toy, oracle, ["apple", "car"], per_prompt=4)  # unedited: 4 of 4 each (README, Quality)
    assert after["apple"] <= 0.25 and after["car"] >= 0.5  # measured 0 and 1: margins no rounding crosses


def test_esd_defaults_come_from_the_paper_and_the_toy_profile():
    paper = defaults(object(), "esd")
    assert (paper["lr"], paper["iterations"], paper["eta"], paper["preset"]) == (1e-5, 1000, 1.0, "esd-x")
    assert set(PRESETS) == {"esd-x", "esd-x-strict", "esd-u", "esd-all"}


def test_esd_trains_float32_masters_on_a_bfloat16_pipeline(tiny_sd_dir):
    pipe = workbench.load(tiny_sd_dir, dtype=torch.bfloat16)
    edit = esd(pipe, "apple", preset="esd-x-strict", iterations=2, sample_steps=2, lr=1e-3, progress=False)
    assert all(d.dtype == torch.float32 for d in edit.deltas.values())
    assert sum(float(d.norm()) for d in edit.deltas.values()) > 0
    weights = {k: p.detach().clone() for k, p in pipe.unet.named_parameters()}
    with edit.apply(pipe):
        pass
    assert all(torch.equal(weights[k], p) for k, p in pipe.unet.named_parameters())


def test_unet_subsets_run_esd_through_ffn_self_and_cross_attention(toy):
    table = unet_subsets(toy, ["apple"], seeds=[0], measure=False, progress=False, iterations=1, sample_steps=2)
    assert table["subset"].tolist() == list(UNET_SUBSETS)
    for row in table.itertuples():
        assert set(row.parts_edited) == set(select(toy, UNET_SUBSETS[row.subset]))


@pytest.mark.slow
def test_an_attack_runs_on_an_esd_edit(toy, oracle):
    from workbench.attacks import attack

    before = state_of(toy)
    edit = esd(toy, "apple", preset="esd-x", iterations=2, sample_steps=2, lr=1e-4, progress=False)
    result = attack(toy, edit, "apple", oracle, "derived", eval_seeds=[7000])
    assert len(result.table) == 3 and 0 <= result.rate.rate <= 1
    assert same_state(toy, before)
