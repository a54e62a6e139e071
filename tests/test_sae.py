"""Sparse-autoencoder features as an erasure (workbench/sae.py): the TopK SAE, resumable training, feature
scores, and the intervention's hooks (exact restore, tuple outputs, half precision, bad input)."""
import math

import pytest
import torch

import workbench
from workbench import sae as saes
from workbench.edits import applied
from workbench.families import family_of
from workbench.hooks import cache
from workbench.interventions import load as load_erasure
from workbench.sae import SAE, FeatureAblation, TopKSAE, concept_features, features, sae, train
from workbench.sampling import generate

TINY = dict(steps=20, batch=64, sample_steps=3)
PROMPTS = ["an apple", "a cat", "a car", "a banana"]
APPLE = dict(prompts=["an apple", "a photo of an apple"], preserve=["a cat", "a car", "a banana"])


@pytest.fixture(scope="module")
def tiny(toy, tmp_path_factory) -> SAE:
    """A tiny SAE on the toy's mid block (20 steps on four prompts)."""
    return train(toy, "unet.mid", PROMPTS, **TINY, path=tmp_path_factory.mktemp("sae") / "mid.safetensors")


def _block_output(pipe, block, prompt="an apple"):
    with cache(pipe, [block]) as seen:
        generate(pipe, [prompt], steps=2)
    return torch.cat(seen[block])


def test_topk_keeps_exactly_k_latents_nonzero():
    m = TopKSAE(16, expansion=4, k=5)
    z = m.encode(torch.randn(64, 16))
    assert z.shape == (64, 64)
    assert ((z != 0).sum(1) == 5).all()
    assert (z >= 0).all()


def test_decoder_columns_keep_unit_norm_through_training(tiny):
    norms = tiny.module.W_dec.norm(dim=0)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert tiny.step == 20 and len(tiny.curve) == 20 and 0 < tiny.fvu < 2


def test_training_resumes_from_its_checkpoint_and_returns_at_once_when_done(toy, tmp_path, monkeypatch):
    path = tmp_path / "mid.safetensors"
    half = train(toy, "unet.mid", PROMPTS[:2], steps=10, batch=32, sample_steps=2, path=path)
    assert half.step == 10
    whole = train(toy, "unet.mid", PROMPTS[:2], steps=20, batch=32, sample_steps=2, path=path)
    assert whole.step == 20 and whole.curve[:10] == half.curve
    straight = train(toy, "unet.mid", PROMPTS[:2], steps=20, batch=32, sample_steps=2)
    assert torch.allclose(whole.module.W_enc, straight.module.W_enc, atol=1e-6)

    def no_sampling(*args, **kwargs):
        raise AssertionError("a finished SAE must not sample again")
    monkeypatch.setattr(saes, "collect", no_sampling)
    again = train(toy, "unet.mid", PROMPTS[:2], steps=20, batch=32, sample_steps=2, path=path)
    assert again.step == 20 and again.curve == whole.curve


def test_a_checkpoint_with_other_settings_is_refused(toy, tmp_path):
    path = tmp_path / "mid.safetensors"
    train(toy, "unet.mid", PROMPTS[:2], steps=2, batch=32, sample_steps=1, path=path)
    with pytest.raises(ValueError, match=r"other settings.*k 32 vs 8"):
        train(toy, "unet.mid", PROMPTS[:2], k=8, steps=4, batch=32, sample_steps=1, path=path)


def test_features_table_has_one_row_per_feature_best_first(toy, tiny):
    table = features(toy, tiny, "apple", prompts=APPLE["prompts"], others=APPLE["preserve"])
    assert len(table) == tiny.latents and sorted(table["feature"]) == list(range(tiny.latents))
    assert table["score"].is_monotonic_decreasing
    assert table["p_concept"].sum() == pytest.approx(1, abs=1e-4)
    assert concept_features(table, top=5) == [f for f, s in zip(table["feature"][:5], table["score"][:5]) if s > 0]
    specific = table.set_index("feature").loc[concept_features(table, top=50, specificity=4)]
    assert (specific["mean_concept"] >= 4 * specific["mean_others"]).all() and len(specific) <= 50


def test_the_intervention_restores_outputs_exactly_on_exit(toy, tiny):
    erasure = sae(toy, "apple", block="unet.mid", sae_path=tiny.path, features=8, multiplier=-3.0, **APPLE)
    assert erasure.kind == "sae" and erasure.params["units"] == {"unet.mid": erasure.params["features"]}
    before = generate(toy, ["an apple"], steps=3)[0].tobytes()
    with erasure.apply(toy):
        assert applied(toy) == [erasure]
        during = generate(toy, ["an apple"], steps=3)[0].tobytes()
    assert during != before
    assert generate(toy, ["an apple"], steps=3)[0].tobytes() == before
    assert applied(toy) == []


def test_multiplier_one_changes_nothing(toy, tiny):
    same = sae(toy, "apple", block="unet.mid", sae_path=tiny.path, features=8, multiplier=1.0, **APPLE)
    before = _block_output(toy, "unet.mid")
    with same.apply(toy):
        during = _block_output(toy, "unet.mid")
    assert torch.allclose(during, before, atol=1e-6)


def test_a_saved_intervention_loads_and_acts_the_same(toy, tiny, tmp_path):
    erasure = sae(toy, "apple", block="unet.mid", sae_path=tiny.path, features=8, multiplier=-3.0, **APPLE)
    back = load_erasure(erasure.save(tmp_path / "apple.safetensors"))
    assert isinstance(back, FeatureAblation) and back.params["features"] == erasure.params["features"]
    with erasure.apply(toy):
        a = generate(toy, ["an apple"], steps=3)[0].tobytes()
    with back.apply(toy):
        assert generate(toy, ["an apple"], steps=3)[0].tobytes() == a


def test_a_down_block_output_tuple_and_its_skip_change_together(toy, tmp_path):
    down = train(toy, "unet.down.1", PROMPTS[:2], **TINY, path=tmp_path / "down.safetensors")
    erasure = sae(toy, "apple", block="unet.down.1", sae_path=down.path, features=8, multiplier=-3.0, **APPLE)
    module = family_of(toy).blocks(toy)["unet.down.1"]
    seen = []
    erasure_hook = erasure.hooks(toy)[0][1]
    handle = module.register_forward_hook(lambda m, i, o: seen.append(erasure_hook(m, i, o)) or None)
    try:
        generate(toy, ["an apple"], steps=1)
    finally:
        handle.remove()
    states, skips = seen[0]
    assert skips[-1] is states


@pytest.mark.slow
def test_a_transformer_block_changes_its_image_stream_only():
    pipe = workbench.load("toy-dit")
    dit = train(pipe, "dit.3", PROMPTS[:2], **TINY)
    table = features(pipe, dit, "apple", prompts=APPLE["prompts"], others=APPLE["preserve"])
    erasure = FeatureAblation.of(dit, table, concept_features(table, top=8), -3.0, "apple")
    module = family_of(pipe).blocks(pipe)["dit.3"]
    pairs = []
    hook = erasure.hooks(pipe)[0][1]
    handle = module.register_forward_hook(lambda m, i, o: pairs.append((o, hook(m, i, o))) or None)
    try:
        generate(pipe, ["an apple"], steps=2)
    finally:
        handle.remove()
    assert all(new[0] is old[0] for old, new in pairs)
    assert any(not torch.equal(new[1], old[1]) for old, new in pairs)
    before = generate(pipe, ["an apple"], steps=2)[0].tobytes()
    with erasure.apply(pipe):
        pass
    assert generate(pipe, ["an apple"], steps=2)[0].tobytes() == before


def test_half_precision_outputs_keep_their_dtype_and_come_back_exactly(toy_bf16, tiny):
    erasure = sae(toy_bf16, "apple", block="unet.mid", sae_path=tiny.path, features=8, multiplier=-3.0, **APPLE)
    before = _block_output(toy_bf16, "unet.mid")
    with erasure.apply(toy_bf16):
        during = _block_output(toy_bf16, "unet.mid")
    assert during.dtype == torch.bfloat16 and torch.isfinite(during.float()).all()
    assert not torch.equal(during, before)
    assert torch.equal(_block_output(toy_bf16, "unet.mid"), before)


def test_bad_inputs_are_refused_with_what_is_valid(toy, tiny):
    with pytest.raises(ValueError, match=r"unet.nope.*unet.down.0, unet.down.1.*unet.up.2"):
        sae(toy, "apple", block="unet.nope", **APPLE)
    with pytest.raises(ValueError, match=r"unet.nope.*unet.mid"):
        train(toy, "unet.nope", PROMPTS, **TINY)
    with pytest.raises(ValueError, match=r"k=5000 .*128 x 16 = 2048"):
        train(toy, "unet.mid", PROMPTS, k=5000, **TINY)
    with pytest.raises(ValueError, match="expansion"):
        train(toy, "unet.mid", PROMPTS, expansion=0, **TINY)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="finite"):
            sae(toy, "apple", block="unet.mid", sae_path=tiny.path, multiplier=bad, **APPLE)
    with pytest.raises(ValueError, match=r"'dragon' is not in.*apple, banana"):
        sae(toy, "dragon", block="unet.mid", sae_path=tiny.path)
    with pytest.raises(ValueError, match="features"):
        sae(toy, "apple", block="unet.mid", sae_path=tiny.path, features=0, **APPLE)
    with pytest.raises(ValueError, match="specificity"):
        sae(toy, "apple", block="unet.mid", sae_path=tiny.path, specificity=-1.0, **APPLE)
    assert applied(toy) == []
