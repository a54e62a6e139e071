import pytest
import torch

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
    assert len(select(toy, "unet.*.xattn.[kv]")) == 14
    assert layer_of("text.3.ffn.in") == "text.3" and component_of("unet.up.0.1.xattn.v") == "xattn.v"


def test_selector_matching_nothing_lists_names(toy):
    with pytest.raises(KeyError, match="text.0.attn.q"):
        select(toy, "text.9.ffn")


def test_every_linear_and_convolution_of_the_toy_unet_has_one_name(toy):
    unet = [n for n in names(toy) if n.startswith("unet.")]
    modules = [m for m in toy.unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(unet) == len(set(unet)) == len(modules) == 132
    assert {id(parts(toy)[n]) for n in unet} == {id(m) for m in modules}
    block = toy.unet.up_blocks[1].attentions[0].transformer_blocks[0]
    assert parts(toy)["unet.up.1.0.attn.q"] is block.attn1.to_q
    assert parts(toy)["unet.up.1.0.xattn.out"] is block.attn2.to_out[0]
    assert parts(toy)["unet.up.1.0.ffn.in"] is block.ff.net[0].proj
    assert parts(toy)["unet.up.1.0.res.conv2"] is toy.unet.up_blocks[1].resnets[0].conv2
    assert parts(toy)["unet.down.0.sample.conv"] is toy.unet.down_blocks[0].downsamplers[0].conv
    assert parts(toy)["unet.in.conv"] is toy.unet.conv_in and parts(toy)["unet.out.conv"] is toy.unet.conv_out


def test_unet_parts_follow_the_data_through_each_layer(toy):
    assert select(toy, "unet.mid") == [
        *(f"unet.mid.0.res.{c}" for c in ("conv1", "time", "conv2")), "unet.mid.0.proj.in",
        *(f"unet.mid.0.attn.{m}" for m in "qkv"), "unet.mid.0.attn.out",
        *(f"unet.mid.0.xattn.{m}" for m in "qkv"), "unet.mid.0.xattn.out",
        "unet.mid.0.ffn.in", "unet.mid.0.ffn.out", "unet.mid.0.proj.out",
        *(f"unet.mid.1.res.{c}" for c in ("conv1", "time", "conv2"))]
    assert layer_of("unet.down.0.sample.conv") == "unet.down.0.sample" and layer_of("unet.in.conv") == "unet.in"
    assert layer_of("unet.down.2.0.t1.attn.q") == "unet.down.2.0.t1"
    assert [component_of(n) for n in ("unet.mid.0.attn.q", "unet.mid.0.ffn.out", "unet.mid.0.xattn.out",
                                      "unet.mid.1.res.conv1", "unet.time.mlp.in")] == ["attn", "ffn", "xattn.out", "res", "mlp"]
    assert len(select(toy, "unet.*.attn")) == len(select(toy, "unet.*.xattn")) == 28
    assert len(select(toy, "unet.*.ffn")) == 14 and len(select(toy, "unet.*.res.conv[12]")) == 22


def test_the_sd14_unet_has_a_name_for_each_of_its_282_linear_and_conv_layers():
    from workbench import sd14

    with torch.device("meta"):
        modules = sd14.sd14_modules(("text", "unet"))

    class Shell:
        text_encoder, unet = modules["text"], modules["unet"]

    unet = [n for n in names(Shell()) if n.startswith("unet.")]
    assert len(unet) == len(set(unet)) == 282 and not any(".extra." in n for n in unet)
    assert [x[5:-8] for x in unet if x.endswith(".xattn.k")] == SD14_XATTN
    assert select(Shell(), "unet.down.3")[:3] == ["unet.down.3.0.res.conv1", "unet.down.3.0.res.time",
                                                 "unet.down.3.0.res.conv2"]


def test_a_unet_selector_matching_nothing_lists_the_unet_names(toy):
    with pytest.raises(KeyError, match=r"unet\.mid\.1\.res\.conv1.*unet\.out\.conv"):
        select(toy, "unet.*.xattn.z")
