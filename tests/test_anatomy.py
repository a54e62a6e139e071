import pytest

import workbench
from workbench.anatomy import component_of, layer_of, names, parts, select

SD14_XATTN = ("down.0.0 down.0.1 down.1.0 down.1.1 down.2.0 down.2.1 mid.0 "
              "up.1.0 up.1.1 up.1.2 up.2.0 up.2.1 up.2.2 up.3.0 up.3.1 up.3.2").split()


def test_toy_names(toy):
    n = names(toy)
    assert len([x for x in n if x.startswith("text.")]) == 6 * 6
    assert [x[5:-8] for x in n if x.endswith(".xattn.k")] == [
        "down.1.0", "down.2.0", "mid.0", "up.0.0", "up.0.1", "up.1.0", "up.1.1"]
    assert parts(toy)["text.2.ffn.in"] is toy.text_encoder.encoder.layer[2].intermediate.dense
    assert parts(toy)["unet.mid.0.xattn.v"] is toy.unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_v


def test_tiny_sd_has_sd14_cross_attention_names(tiny_sd_dir):
    pipe = workbench.load(tiny_sd_dir)
    assert [x[5:-8] for x in names(pipe) if x.endswith(".xattn.k")] == SD14_XATTN
    fc2 = parts(pipe)["text.1.ffn.out"]
    assert (fc2.in_features, fc2.out_features) == (64, 32)  # CLIP mlp.fc2 of the tiny config


def test_globs_select_groups(toy):
    assert select(toy, "text.3.ffn") == ["text.3.ffn.in", "text.3.ffn.out"]
    assert len(select(toy, "text.*.attn")) == 24
    assert select(toy, ["text.0.attn.q", "text.5.ffn.out"]) == ["text.0.attn.q", "text.5.ffn.out"]
    assert len(select(toy, "unet.*")) == 14
    assert layer_of("text.3.ffn.in") == "text.3" and component_of("unet.up.0.1.xattn.v") == "xattn.v"


def test_selector_matching_nothing_lists_names(toy):
    with pytest.raises(KeyError, match="text.0.attn.q"):
        select(toy, "text.9.ffn")
