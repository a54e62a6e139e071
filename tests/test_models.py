import numpy as np
import pytest
import torch

import workbench
from workbench import models
from workbench.toy import model as toy_model
from workbench.toy.world import OBJECTS, a


def _pixels(images):
    return np.stack([np.asarray(im) for im in images])


def test_toy_is_a_stable_diffusion_pipeline(toy):
    from diffusers import StableDiffusionPipeline

    assert isinstance(toy, StableDiffusionPipeline)
    assert type(toy.text_encoder).__name__ == "BertModel"
    assert not any(p.requires_grad for p in toy.text_encoder.parameters())


@pytest.mark.slow
def test_toy_generates_deterministically(toy):
    prompts = ["a red apple", "a car by van gogh", "a cat", "a blue star"]
    first = toy(prompts, num_inference_steps=10, generator=workbench.seeded(3)).images
    again = toy(prompts, num_inference_steps=10, generator=workbench.seeded(3)).images
    other = toy(prompts, num_inference_steps=10, generator=workbench.seeded(4)).images
    assert len(first) == 4 and first[0].size == (32, 32)
    assert np.array_equal(_pixels(first), _pixels(again))
    assert not np.array_equal(_pixels(first), _pixels(other))


@pytest.mark.slow
def test_toy_draws_what_it_is_asked(toy, oracle):
    prompts = [a(o) for o in OBJECTS for _ in range(2)]
    images = toy(prompts, num_inference_steps=20, guidance_scale=5.0, generator=workbench.seeded(11)).images
    hits = [p["object"] == o for p, o in zip(oracle.predict(images), [x for x in OBJECTS for _ in range(2)])]
    assert np.mean(hits) >= 0.6, f"object accuracy {np.mean(hits):.0%} on generated images"


def test_tiny_sd_pipeline_loads_from_a_folder(tiny_sd_dir):
    pipe = workbench.load(tiny_sd_dir)
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    names = [n for n, _ in pipe.unet.named_modules() if n.endswith("attn2")]
    assert len(names) == 16  # as in SD 1.4
    images = pipe(["a red apple", "a castle"], num_inference_steps=3, generator=workbench.seeded(0)).images
    again = pipe(["a red apple", "a castle"], num_inference_steps=3, generator=workbench.seeded(0)).images
    assert images[0].size == (64, 64)
    assert np.array_equal(_pixels(images), _pixels(again))


def test_unknown_model_name_says_what_is_accepted():
    with pytest.raises(ValueError, match="Accepted: 'toy'"):
        workbench.load("tyo")


def test_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="no model_index.json"):
        workbench.load(tmp_path)


@pytest.mark.slow
def test_hub_id_not_cached_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="could not load 'nobody/no-such-model'"):
        workbench.load("nobody/no-such-model")


def test_missing_data_file_says_how_to_rebuild(tmp_path, monkeypatch):
    monkeypatch.setattr(toy_model, "TOY_DIR", tmp_path / "toy")
    with pytest.raises(FileNotFoundError, match="python -m workbench.toy.train"):
        workbench.load("toy")
    from workbench.toy.oracle import Oracle

    with pytest.raises(FileNotFoundError, match="python -m workbench.toy.train"):
        Oracle.load(tmp_path / "toy")


def test_seeded_generator():
    assert torch.equal(torch.randn(3, generator=workbench.seeded(1)), torch.randn(3, generator=workbench.seeded(1)))
