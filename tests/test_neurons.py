"""Feed-forward neurons: their scores per step, ConceptPrune's skilled neurons, and pruning them as an edit."""
import pytest
import torch

import workbench
from conftest import same_state, state_of
from workbench.anatomy import parts
from workbench.methods import erase
from workbench.methods.prune import prune
from workbench.neurons import neuron_layers, scores

FEW = dict(prompts=["an icon of an apple", "a photo of an apple"], preserve=["an icon of a car", "a photo of a cat"],
           steps=3)


@pytest.fixture(scope="module")
def toy_dit():
    return workbench.load("toy-dit")


def test_every_feed_forward_layer_of_the_toy_has_its_neurons_named_by_the_linear_that_reads_them(toy):
    every = neuron_layers(toy, "*")
    assert [n for n in every if n.startswith("text.")] == [f"text.{i}.ffn.out" for i in range(6)]
    assert list(neuron_layers(toy)) == [n for n in every if n.startswith("unet.")] and len(neuron_layers(toy)) == 7
    assert {l.count for l in every.values()} == {1536, 512}


def test_a_dit_single_block_s_neurons_are_the_mlp_columns_of_its_output_linear(toy_dit):
    layers = neuron_layers(toy_dit)
    single = layers["dit.single.0.out"]
    table = parts(toy_dit)
    assert single.start + single.count == table["dit.single.0.out"].in_features
    assert single.count == table["dit.single.0.ffn.in"].out_features
    assert {"dit.0.img.ffn.out", "dit.0.text.ffn.out"} <= set(layers)
    assert layers["dit.0.text.ffn.out"].component == "dit.text"


def test_a_part_without_neurons_is_refused_with_the_layers_that_have_them(toy):
    with pytest.raises(ValueError, match="selects no feed-forward neurons.*unet.mid.0.ffn.out"):
        neuron_layers(toy, "unet.mid.0.xattn.k")


def test_scores_per_step_and_the_contrastive_score_is_the_concept_s_wanda_minus_the_preserve_prompts(toy):
    s = scores(toy, "apple", parts=["text.5", "unet.mid.0"], **FEW)
    assert s.norms["unet.mid.0.ffn.out"].shape == (3, 512) and s.norms["text.5.ffn.out"].shape == (1, 1536)
    name = "unet.mid.0.ffn.out"
    assert torch.equal(s.score(name, "contrastive"), s.wanda(name) - s.wanda(name, preserve=True))
    table = s.table()
    assert len(table) == 512 + 1536 and table["wanda"].ge(0).all()


def test_skilled_neurons_are_at_most_the_share_per_step_and_all_driven_harder_by_the_concept(toy):
    s = scores(toy, "apple", parts="unet.mid.0", **FEW)
    name = "unet.mid.0.ffn.out"
    chosen = s.skilled(share=0.02, timesteps=1)[name]
    assert 0 < len(chosen) <= int(0.02 * 512)
    assert bool((s.norms[name][0, chosen] > s.preserve_norms[name][0, chosen]).all())
    united = s.skilled(share=0.02, timesteps=3)[name]
    assert set(chosen.tolist()) <= set(united.tolist())
    counts = s.counts(share=0.02, timesteps=3)
    assert counts.loc[0, "skilled"] == len(united) and counts.loc[0, "neurons"] == 512


def test_pruning_zeroes_exactly_the_skilled_columns_and_reverting_restores_every_bit(toy):
    state = state_of(toy)
    edit = prune(toy, "apple", parts="unet.mid.0", share=0.02, timesteps=3, **FEW)
    chosen = edit.params["skilled"]["unet.mid.0.ffn.out"]
    weight = parts(toy)["unet.mid.0.ffn.out"].weight
    before = weight.detach().clone()
    with edit.apply(toy):
        assert weight[:, chosen].abs().sum() == 0
        others = [i for i in range(512) if i not in chosen]
        assert torch.equal(weight[:, others], before[:, others])
    assert same_state(toy, state)


def test_pruning_single_weights_masks_at_most_the_share_of_each_row(toy):
    edit = prune(toy, "apple", parts="unet.mid.0", share=0.02, timesteps=1, unit="weight", **FEW)
    zeroed = edit.deltas["unet.mid.0.ffn.out.weight"] != 0
    assert 0 < int(zeroed.sum(1).max()) <= int(0.02 * 512)


@pytest.mark.parametrize("bad, match", [(dict(share=0), r"in \(0, 1\]"), (dict(share=1.5), r"in \(0, 1\]"),
                                        (dict(unit="row"), "neuron, weight"), (dict(score="gradient"), "wanda"),
                                        (dict(timesteps=0), "whole number"),
                                        (dict(parts="unet.mid.0.xattn.k"), "no feed-forward neurons")])
def test_bad_pruning_settings_are_refused_and_leave_the_model_alone(toy, bad, match):
    state = state_of(toy)
    with pytest.raises(ValueError, match=match):
        prune(toy, "apple", **{**FEW, "parts": "unet.mid.0", **bad})
    assert same_state(toy, state)


def test_prune_is_a_registered_method_that_erase_fills_from_the_concept_set(toy):
    edit = erase(toy, "apple", "prune", parts="unet.mid.0", steps=2, preserve=["an icon of a car"])
    assert edit.method == "prune" and edit.params["prompts"][0] == "a photo of an apple"


def test_pruning_a_bfloat16_model_gives_float32_deltas_that_revert_exactly(toy_bf16):
    state = state_of(toy_bf16)
    edit = prune(toy_bf16, "apple", parts=["unet.mid.0", "text.5"], share=0.02, **FEW)
    assert all(d.dtype == torch.float32 and torch.isfinite(d).all() for d in edit.deltas.values())
    with edit.apply(toy_bf16):
        assert not same_state(toy_bf16, state)
    assert same_state(toy_bf16, state)


def test_the_dit_s_neurons_are_scored_and_pruned_in_both_streams_and_single_blocks(toy_dit):
    edit = prune(toy_dit, "apple", parts=["dit.0", "dit.single.0"], share=0.05, timesteps=2, **FEW)
    assert set(edit.params["parts"]) == {"dit.0.img.ffn.out", "dit.0.text.ffn.out", "dit.single.0.out"}
    single = edit.deltas.get("dit.single.0.out.weight")
    if single is not None:  # only the MLP columns may change
        assert single[:, :neuron_layers(toy_dit)["dit.single.0.out"].start].abs().sum() == 0
