"""The CLIP judge and the bundled concept sets, on a tiny random CLIP written by tiny_clip (no downloads)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from workbench.concepts import ConceptSet
from workbench.judges import ClipJudge, Judge, tiny_clip

CONCEPT_SETS = Path(__file__).resolve().parent.parent / "data" / "concept_sets"
LABELS = ["tench", "church", "golf ball", "van gogh", "a photo"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def judge(clip_dir):
    return ClipJudge.load(clip_dir)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (48, 40), (40, 64), (20, 20), (100, 30), (33, 31), (64, 64)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def test_clip_judge_gives_one_probability_row_per_image_over_the_labels(judge, images):
    probs = judge.classify(images, LABELS)
    assert probs.shape == (len(images), len(LABELS)) and probs.dtype == np.float64
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert set(judge.choose(images, LABELS)) <= set(LABELS)


def test_clip_judge_batches_give_the_same_probabilities_as_one_batch(clip_dir, judge, images):
    small = ClipJudge.load(clip_dir, batch_size=2)
    np.testing.assert_allclose(small.classify(images, LABELS), judge.classify(images, LABELS), atol=1e-5)


def test_clip_judge_gives_the_same_answer_for_the_same_images(clip_dir, judge, images):
    first = judge.classify(images, LABELS)
    np.testing.assert_array_equal(judge.classify(images, LABELS), first)  # cached prompts, same model
    np.testing.assert_allclose(ClipJudge.load(clip_dir).classify(images, LABELS), first, atol=1e-6)


def test_permuting_the_labels_permutes_the_columns(judge, images):
    order = [3, 0, 4, 2, 1]
    probs = judge.classify(images, LABELS)
    permuted = judge.classify(images, [LABELS[i] for i in order])
    np.testing.assert_allclose(permuted, probs[:, order], atol=1e-6)


def test_prompts_come_from_the_template_or_the_prompt_table(clip_dir, images):
    judge = ClipJudge.load(clip_dir, template="a painting by {}", prompts={"a photo": "a photo"})
    assert [judge.prompt(label) for label in ["van gogh", "a photo"]] == ["a painting by van gogh", "a photo"]
    same_texts = ClipJudge.load(clip_dir, template="{}", prompts={"x": "a painting by van gogh", "y": "a photo"})
    np.testing.assert_allclose(judge.classify(images, ["van gogh", "a photo"]),
                               same_texts.classify(images, ["x", "y"]), atol=1e-6)


def test_a_bfloat16_clip_judge_runs_and_agrees_with_float32_at_bfloat16_precision(clip_dir, judge, images):
    half = ClipJudge.load(clip_dir, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    probs = half.classify(images, LABELS)
    assert probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(probs, judge.classify(images, LABELS), atol=0.05)


def test_the_plain_constructor_takes_an_in_memory_model_and_tokenizer(judge, images):
    again = ClipJudge(judge.model, judge.tokenizer, image_size=32)
    np.testing.assert_allclose(again.classify(images, LABELS), judge.classify(images, LABELS), atol=1e-6)


def test_no_images_give_an_empty_table_and_no_labels_an_error(judge, images):
    assert judge.classify([], LABELS).shape == (0, len(LABELS))
    assert judge.choose([], LABELS) == []
    with pytest.raises(ValueError, match="at least one label"):
        judge.classify(images, [])


def test_an_empty_folder_is_not_a_clip_model(tmp_path):
    with pytest.raises(ValueError, match="no config.json") as e:
        ClipJudge.load(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_a_folder_with_a_bert_config_is_not_a_clip_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(ValueError, match="'bert', not a CLIP model") as e:
        ClipJudge.load(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_a_clip_text_encoder_alone_is_not_a_clip_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    with pytest.raises(ValueError, match="text or vision tower alone"):
        ClipJudge.load(tmp_path)


def test_a_clip_folder_without_a_tokenizer_is_refused(clip_dir, tmp_path):
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        (tmp_path / name).write_bytes((clip_dir / name).read_bytes())
    with pytest.raises(ValueError, match="no tokenizer files") as e:
        ClipJudge.load(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_an_uncached_hub_id_says_how_to_download_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="huggingface-cli download openai/clip-vit-large-patch14") as e:
        ClipJudge.load("nobody-here/no-such-clip-model")
    assert "nobody-here/no-such-clip-model" in str(e.value) and "not in the local Hugging Face cache" in str(e.value)


def test_a_hub_id_in_the_local_cache_loads_without_a_download(monkeypatch, clip_dir, tmp_path, images):
    import huggingface_hub.constants

    commit = "0" * 40  # the cache layout huggingface-cli download writes: refs/main -> snapshots/<commit>/
    repo = tmp_path / "hub" / "models--someone--tiny-clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in clip_dir.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = ClipJudge.load("someone/tiny-clip")
    reference = ClipJudge.load(clip_dir)
    np.testing.assert_allclose(cached.classify(images, LABELS), reference.classify(images, LABELS), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_float16_clip_judge_on_the_gpu_agrees_with_float32_on_the_cpu(clip_dir, judge, images):
    gpu = ClipJudge.load(clip_dir, device="cuda", dtype=torch.float16)
    assert gpu.device.type == "cuda"
    np.testing.assert_allclose(gpu.classify(images, LABELS), judge.classify(images, LABELS), atol=0.02)


def test_a_path_that_does_not_exist_is_neither_a_folder_nor_a_hub_id(tmp_path):
    with pytest.raises(ValueError, match="no folder"):
        ClipJudge.load(tmp_path / "missing" / "clip")


def test_the_preprocessing_matches_transformers_clip_image_processor(clip_dir, judge, images):
    import transformers

    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = processor_class.from_pretrained(clip_dir)
    theirs = processor(images=images, return_tensors="pt")["pixel_values"]
    np.testing.assert_allclose(judge.preprocess(images).numpy(), theirs.numpy(), atol=1e-4)


def test_choose_agrees_with_the_argmax_of_classify(judge, images):
    probs = judge.classify(images, LABELS)
    assert judge.choose(images, LABELS) == [LABELS[i] for i in probs.argmax(axis=1)]

    class Redness(Judge):
        def classify(self, images, labels):
            red = np.array([np.asarray(im.convert("RGB"), dtype=float)[..., 0].mean() / 255 for im in images])
            return np.stack([red, 1 - red], axis=1)

    reds = [Image.new("RGB", (4, 4), (v, 0, 0)) for v in (0, 100, 200, 255)]
    assert Redness().choose(reds, ["red", "dark"]) == ["dark", "dark", "red", "red"]


def test_the_imagenette_concept_set_has_its_ten_object_classes():
    cs = ConceptSet.load(CONCEPT_SETS / "imagenette.json")
    assert cs.name == "imagenette"
    assert cs.names == ["tench", "English springer", "cassette player", "chain saw", "church", "French horn",
                        "garbage truck", "gas pump", "golf ball", "parachute"]
    assert {cs.kind(c) for c in cs.names} == {"object"}
    assert cs.labels("object") == tuple(cs.names) and cs.labels("style") == ()
    assert cs.prompts("English springer")[0] == "a photo of an English springer"
    assert all("English springer" in p for p in cs.probe("English springer", 5))


def test_the_painters_concept_set_has_the_uce_artists_and_a_neutral_label():
    cs = ConceptSet.load(CONCEPT_SETS / "painters.json")
    uce = ["van gogh", "pablo picasso", "rembrandt", "andy warhol", "caravaggio"]
    assert cs.name == "painters" and cs.names[:5] == uce
    assert set(cs.names) == {*uce, "claude monet", "salvador dali", "johannes vermeer"}
    assert {cs.kind(c) for c in cs.names} == {"style"}
    assert cs.labels("style") == (*cs.names, "a photo") and cs.labels("object") == ()
    assert "claude monet" in cs.related("van gogh")
    probes = cs.probe("rembrandt", 8)
    assert len(set(probes)) == 8 and all(p.endswith("rembrandt") for p in probes)
