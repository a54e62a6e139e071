"""The hooks module: every hook restores the model exactly."""
import pytest
import torch

from workbench.families import family_of
from workbench.hooks import cache, frozen, hooked, modules, processors


def test_cache_captures_every_call_of_parts_layers_and_blocks_and_removes_its_hooks(toy):
    family = family_of(toy)
    before = {n: dict(m._forward_hooks) for n, m in modules(toy, ["text.2.ffn.out", "unet.mid"]).items()}
    with cache(toy, ["text.2.ffn.out", "unet.mid"]) as seen:
        family.encode(toy, ["an apple", "a car"])
        family.encode(toy, ["a cat"])
    assert [t.shape[0] for t in seen["text.2.ffn.out"]] == [2, 1] and seen["unet.mid"] == []
    assert {n: dict(m._forward_hooks) for n, m in modules(toy, ["text.2.ffn.out", "unet.mid"]).items()} == before


def test_a_name_that_is_no_part_layer_or_block_is_refused_with_the_blocks(toy):
    with pytest.raises(KeyError, match="'unet.nowhere': no such part, layer or block; blocks: unet.down.0"):
        with cache(toy, ["unet.nowhere"]):
            pass


def test_a_hook_that_returns_a_new_output_changes_the_run_only_inside_the_block(toy):
    family = family_of(toy)
    plain = family.encode(toy, ["an apple"]).tokens
    layer = modules(toy, ["text.5.ffn.out"])["text.5.ffn.out"]
    with hooked([(layer, lambda m, i, o: o * 0)]):
        changed = family.encode(toy, ["an apple"]).tokens
    assert not torch.equal(plain, changed) and torch.equal(plain, family.encode(toy, ["an apple"]).tokens)


def test_frozen_turns_gradients_off_and_restores_each_flag(toy):
    encoder = family_of(toy).encoders(toy)["text"]
    flags = [q.requires_grad for q in encoder.parameters()]
    p = next(encoder.parameters())
    p.requires_grad_(not flags[0])
    with frozen(encoder):
        assert not any(q.requires_grad for q in encoder.parameters())
    assert p.requires_grad == (not flags[0])
    p.requires_grad_(flags[0])
    assert [q.requires_grad for q in encoder.parameters()] == flags


def test_processors_are_swapped_and_the_very_same_objects_come_back(toy):
    layers = family_of(toy).cross_attention(toy)
    saved = {n: m.processor for n, m in layers.items()}
    with processors(layers, lambda name, inner: type(inner)()):
        assert all(m.processor is not saved[n] for n, m in layers.items())
    assert all(m.processor is saved[n] for n, m in layers.items())
