"""The SDXL base 1.0-shaped pipeline's configs, checked on the meta device (no memory, no weights)."""
import pytest
import torch

from workbench import sdxl_shaped
from workbench.anatomy import names, select
from workbench.families import family_of

# transformer_layers_per_block (1, 2, 10): down.1 has 2 attentions of 2 transformer blocks, down.2 and
# the mid block 10-deep ones, up.0 three 10-deep, up.1 three of 2 (``t{i}``: the i-th block, 0 unnamed)
SDXL_XATTN = [f"{layer}{f'.t{i}' if i else ''}" for layer, depth in (
    *((f"down.1.{j}", 2) for j in range(2)), *((f"down.2.{j}", 10) for j in range(2)), ("mid.0", 10),
    *((f"up.0.{j}", 10) for j in range(3)), *((f"up.1.{j}", 2) for j in range(3))) for i in range(depth)]


class _Shell:
    """Just enough of an SDXL pipeline for ``workbench.anatomy`` and ``family_of``."""

    def __init__(self, modules) -> None:
        self.text_encoder, self.text_encoder_2, self.unet = modules["text"], modules["text2"], modules["unet"]


@pytest.fixture(scope="module")
def meta_sdxl():
    with torch.device("meta"):
        return sdxl_shaped.sdxl_modules(dtype=torch.bfloat16)


def test_sdxl_shapes_have_sdxl_base_1_0s_parameter_counts():
    counts = sdxl_shaped.parameter_counts()
    assert counts["unet"] == 2_567_463_684
    assert counts["text"] == 123_060_480 and counts["text2"] == 694_659_840
    assert counts["vae"] == 83_653_863


def test_sdxl_unet_has_the_70_cross_attention_layers_with_2048_wide_keys(meta_sdxl):
    shell = _Shell(meta_sdxl)
    assert family_of(shell).name == "sdxl"
    keys = select(shell, "unet.*.xattn.k")
    assert len(SDXL_XATTN) == 70 and keys == [f"unet.{layer}.xattn.k" for layer in SDXL_XATTN]
    table = family_of(shell).parts(shell)
    assert {table[k].in_features for k in keys} == {2048}
    assert {table[k].out_features for k in keys} == {640, 1280}
    assert len([n for n in names(shell) if n.startswith("text2.") and n.endswith(".ffn.in")]) == 32
    assert {p.dtype for p in meta_sdxl["unet"].parameters()} == {torch.bfloat16}


def test_small_stand_ins_keep_sdxls_interfaces():
    with torch.device("meta"):
        modules = sdxl_shaped.sdxl_modules(("text",))
    shell = _Shell(modules)
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()}
    assert counts["text2"] == 694_659_840 and counts["unet"] < 30e6
    config = modules["unet"].config
    assert config.cross_attention_dim == 2048 and config.addition_embed_type == "text_time"
    assert select(shell, "unet.*.xattn.k") == [f"unet.{layer}.xattn.k" for layer in SDXL_XATTN]


def test_the_second_tokenizer_pads_with_an_exclamation_mark():
    first, second = sdxl_shaped.tokenizers()
    assert first("a cat", padding="max_length").input_ids[3:6] == [49407] * 3
    assert second("a cat", padding="max_length").input_ids[:6] == [49406, 320, 2368, 49407, 0, 0]
