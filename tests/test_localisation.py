"""Cross-attention maps and causal tracing: pipelines left exactly as they were, maps that are real
attention, traces whose controls come out as they must, and bad input named with what is valid."""
import numpy as np
import pytest
import torch

import workbench
import workbench.attnmaps
from conftest import same_state, state_of
from workbench.attnmaps import attention_maps, cross_attention_layers, recording, word_positions
from workbench.concepts import ConceptSet
from workbench.judges import ClipJudge, tiny_clip
from workbench.methods import uce
from workbench.sampling import generate
from workbench.tracing import Text, sites, trace


def processors(pipe) -> dict:
    return dict(pipe.unet.attn_processors)


def hooks(pipe) -> set:
    """Every forward and forward-pre hook on the pipeline's modules. Compared before and after, not
    required empty: transformers keeps hooks of its own on a BERT encoder once hidden states were asked for."""
    modules = [*pipe.unet.modules(), *pipe.text_encoder.modules()]
    return {(id(m), kind, key) for m in modules
            for kind, table in (("forward", m._forward_hooks), ("pre", m._forward_pre_hooks)) for key in table}


def test_attention_maps_leave_the_image_and_every_processor_exactly_as_they_were(toy):
    saved = processors(toy)
    maps = attention_maps(toy, "a red apple", "apple", steps=6)
    assert all(toy.unet.attn_processors[k] is v for k, v in saved.items())
    assert maps.image.tobytes() == generate(toy, ["a red apple"], 0, steps=6)[0].tobytes()
    assert list(maps.layers) == list(cross_attention_layers(toy)) and len(maps.layers) == 7
    assert maps.total.shape == (32, 32) and all(m.min() >= 0 for m in maps.layers.values())
    assert maps.positions == [3] and maps.table()["share"].sum() == pytest.approx(1.0)


def test_attention_to_every_token_sums_to_one_at_every_pixel(toy):
    every = list(range(toy.tokenizer.model_max_length))
    with recording(toy, every) as sums:
        generate(toy, ["a cat by van gogh"], 0, steps=3)
    layers = [k for k in sums if not k.endswith("#steps")]
    assert len(layers) == 7
    for name in layers:
        assert sums[f"{name}#steps"] == 3
        assert torch.allclose(sums[name] / 3, torch.ones(()), atol=1e-4)


def test_bad_attention_input_lists_what_is_valid_and_restores_the_processors(toy, monkeypatch):
    saved = processors(toy)
    with pytest.raises(ValueError, match="words of the prompt: a, red, apple"):
        attention_maps(toy, "a red apple", "pear")
    with pytest.raises(ValueError, match="its layers: unet.down.1.0, .*unet.up.1.1"):
        attention_maps(toy, "a red apple", "apple", layers=["unet.mid.1"])

    def interrupted(*args, **kwargs):
        assert toy.unet.attn_processors != saved  # the recorders are in place
        raise KeyboardInterrupt

    monkeypatch.setattr(workbench.attnmaps, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        attention_maps(toy, "a red apple", "apple")
    assert all(toy.unet.attn_processors[k] is v for k, v in saved.items())
    assert word_positions(toy, "a painting by mondrian", "mondrian") == [4, 5, 6]


def test_restoring_the_last_text_layer_at_every_token_gives_the_clean_conditioning(toy):
    text = Text(toy, "an icon of an apple", [5], n=2, noise=3.0, seed=0)
    every = list(range(text.clean.shape[1]))  # padding too: with BERT's mask it still sees the noise
    clean = text.clean.expand(2).tokens
    assert torch.equal(text.corrupted("text.5", every).tokens, clean)
    assert not torch.equal(text.corrupted("text.5", list(range(7))).tokens, clean)
    assert not torch.equal(text.corrupted().tokens, clean)


@pytest.mark.slow
def test_a_trace_restores_the_clean_run_exactly_at_the_last_unet_block_and_changes_nothing(toy, oracle):
    before, hooked = state_of(toy), hooks(toy)
    t = trace(toy, "apple", "an icon of an apple", oracle, sites=["text.0", "unet.mid", "unet.up.2"], n=2,
              steps=6, tokens=True)
    assert same_state(toy, before) and hooks(toy) == hooked
    rows = t.layers().set_index("site")
    assert list(rows.index) == ["text.0", "unet.mid", "unet.up.2"]
    assert rows.loc["unet.up.2", "probability"] == pytest.approx(t.clean, abs=1e-6)
    assert t.clean > 0.9 and t.corrupted < t.clean - 0.2  # the noise takes a share of the apple away
    assert t.tokens == ["[CLS]", "an", "icon", "of", "an", "apple", "[SEP]"]
    grid = t.token_grid()
    assert list(grid.index) == ["text.0"] and grid.shape == (1, 7)
    assert grid["5:apple"].iloc[0] > 0.2 and np.abs(grid.drop(columns="5:apple").to_numpy()).max() < 0.2


def test_bad_trace_input_lists_what_is_valid(toy, oracle):
    hooked = hooks(toy)
    with pytest.raises(ValueError, match="no such site.*text.0, text.1, .*unet.down.0, .*unet.up.2"):
        trace(toy, "apple", judge=oracle, sites=["unet.mid.0"])
    with pytest.raises(ValueError, match="concepts: apple, banana"):
        trace(toy, "pineapple", judge=oracle)
    with pytest.raises(ValueError, match="words of the prompt"):
        trace(toy, "apple", "a red pear", oracle)
    assert sites(toy)[6:] == ["unet.down.0", "unet.down.1", "unet.down.2", "unet.mid", "unet.up.0", "unet.up.1",
                              "unet.up.2"]
    assert hooks(toy) == hooked


def test_tracing_and_attention_maps_run_on_an_sd_shaped_pipeline_with_a_clip_judge(tiny_sd_dir, tmp_path):
    pipe = workbench.load(tiny_sd_dir)
    judge = ClipJudge.load(tiny_clip(tmp_path / "clip"))
    cs = ConceptSet.of(objects=["apple", "car"])
    before, hooked = state_of(pipe), hooks(pipe)
    t = trace(pipe, "apple", "a photo of an apple", judge, concept_set=cs, n=1, steps=2, tokens=False)
    assert len(t.layers()) == len(sites(pipe)) == 2 + 9  # the tiny CLIP's 2 layers; SD 1.4's 9 UNet blocks
    edit = uce(pipe, "apple")
    with edit.apply(pipe):
        maps = attention_maps(pipe, "a photo of an apple", "apple", steps=2)
    assert len(maps.layers) == 16 and maps.total.shape == (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
    assert same_state(pipe, before) and hooks(pipe) == hooked


@pytest.mark.slow
def test_the_three_localisation_panels_run_on_click_and_keep_no_edit(toy, oracle):
    from workbench.widgets import AttentionPanel, EsdPanel, TracePanel

    before, saved = state_of(toy), processors(toy)
    attention = AttentionPanel(toy, run=False, concept="apple", method="uce", layer="unet.mid.0")
    attention.button.click()
    assert attention.error is None, attention.error
    assert list(attention.result) == ["before", "after uce"] and list(attention.result["before"].layers) == ["unet.mid.0"]
    traced = TracePanel(toy, oracle, run=False, concept="apple", method="uce", sites=["text.5", "unet.up.2"], n=1)
    traced.button.click()
    assert traced.error is None, traced.error
    assert "P(apple) clean" in traced.status.value and list(traced.result["traces"]) == ["before", "after uce"]
    erased = EsdPanel(toy, oracle, run=False, concept="apple", preset="esd-x-strict", iterations=1, per_prompt=1)
    erased.button.click()
    assert erased.error is None, erased.error
    assert len(erased.result["edit"].parts) == 14 and "ESD trained 14 parts" in erased.status.value
    assert same_state(toy, before) and all(toy.unet.attn_processors[k] is v for k, v in saved.items())
    assert not TracePanel(toy, None, run=False).run() and "judge" in str(TracePanel(toy, None).error)
