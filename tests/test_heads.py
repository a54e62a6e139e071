"""Attention heads' attribution: a head's patch touches its own columns only, a layer's heads are rows of
one batch, the head ablation installs and removes itself exactly, and bad input is named with what is valid."""
import math

import pytest
import torch

import workbench
from conftest import same_state, state_of
from workbench.edits import applied
from workbench.families import Conditioning, family_of
from workbench.heads import HeadAblation, _head_hook, ablate_heads, attribute, head_sites
from workbench.hooks import cache, hooked
from workbench.interventions import load
from workbench.sampling import generate, seeded
from workbench.tracing import Sampler


@pytest.fixture(scope="module")
def toy_dit():
    return workbench.load("toy-dit")


def hooks(pipe) -> set:
    """Every forward and forward-pre hook on the pipeline's modules."""
    return {(id(m), kind, key) for c in family_of(pipe).components(pipe).values() for m in c.modules()
            for kind, table in (("forward", m._forward_hooks), ("pre", m._forward_pre_hooks)) for key in table}


def one_denoiser_call(pipe, prompt: str = "an apple") -> None:
    family = family_of(pipe)
    cond = family.encode(pipe, [prompt])
    family.denoise(pipe, family.noise(pipe, seeded(0)), torch.tensor([500.0]), cond)


def inputs_of(pipe, parts: list[str], run, erasure=None) -> dict[str, torch.Tensor]:
    """What each part reads during ``run()``, with ``erasure`` applied when given."""
    with cache(pipe, parts, inputs=True) as seen:
        if erasure is None:
            run()
        else:
            with erasure.apply(pipe):
                run()
    return {p: torch.cat(seen[p]) for p in parts}


def test_head_sites_are_every_text_layer_and_cross_attention_layer_with_heads_filling_the_projection(toy):
    sites = head_sites(toy)
    parts = family_of(toy).parts(toy)
    assert list(sites) == [f"text.{i}" for i in range(6)] + list(family_of(toy).cross_attention(toy))
    assert len([s for s in sites.values() if s.component == "unet"]) == 7
    for site in sites.values():
        assert site.heads * site.width == parts[site.parts[0]].in_features and site.offset == 0
    assert (sites["unet.mid.0"].heads, sites["unet.mid.0"].width) == (32, 4)
    assert (sites["text.0"].heads, sites["text.0"].width, sites["text.0"].parts) == (12, 32, ("text.0.attn.out",))
    assert list(head_sites(toy, text=False)) == list(sites)[6:]


def test_ablating_a_head_zeroes_exactly_its_columns_and_leaves_every_other_column_as_it_was(toy):
    off = HeadAblation.of(toy, "apple", {"unet.mid.0": [3], "text.2": 5})
    parts = ["unet.mid.0.xattn.out", "text.2.attn.out"]
    before = inputs_of(toy, parts, lambda: one_denoiser_call(toy))
    after = inputs_of(toy, parts, lambda: one_denoiser_call(toy), off)
    for part, cols in (("unet.mid.0.xattn.out", slice(12, 16)), ("text.2.attn.out", slice(160, 192))):
        assert before[part][..., cols].abs().sum() > 0 and torch.all(after[part][..., cols] == 0)
        keep = torch.ones(before[part].shape[-1], dtype=torch.bool)
        keep[cols] = False
        if part == "text.2.attn.out":  # the first layers patched: what they read before is untouched
            assert torch.equal(after[part][..., keep], before[part][..., keep])
    mid_before = inputs_of(toy, ["unet.mid.0.xattn.out"], lambda: one_denoiser_call(toy),
                           HeadAblation.of(toy, "apple", {"text.2": [5]}))["unet.mid.0.xattn.out"]
    keep = torch.ones(128, dtype=torch.bool)
    keep[12:16] = False
    assert torch.equal(after["unet.mid.0.xattn.out"][..., keep], mid_before[..., keep])


def test_ablating_every_head_of_a_layer_is_one_batched_run_patching_each_row_in_both_guidance_copies(toy, monkeypatch):
    calls, ticks = [], []
    draw = Sampler.draw
    monkeypatch.setattr(Sampler, "draw", lambda self, embeds, hooks=(): calls.append(len(embeds)) or draw(self, embeds))
    with cache(toy, ["unet.mid.0.xattn.out"], inputs=True) as seen:
        result = attribute(toy, "apple", layers="unet.mid.0", n=1, steps=2, batch=64,
                           progress=lambda done, total: ticks.append((done, total)))
    assert calls == [33] and ticks == [(0, 32), (32, 32)]
    assert len(seen["unet.mid.0.xattn.out"]) == 2  # one call per step, the two guidance copies in it
    for x in seen["unet.mid.0.xattn.out"]:
        assert len(x) == 66
        for copy in (0, 33):
            assert x[copy].abs().sum() > 0  # the clean row
            for head in range(32):
                row = x[copy + 1 + head]
                assert torch.all(row[:, 4 * head:4 * head + 4] == 0) and row.abs().sum() > 0
    table = result.table
    assert list(table.columns) == ["component", "layer", "head", "probability", "effect"]
    assert list(table["head"]) == list(range(32)) and set(table["layer"]) == {"unet.mid.0"}
    assert table["effect"].map(math.isfinite).all() and result.baseline == result.clean
    assert result.grid().shape == (1, 32) and len(result.top(3)) == 3
    assert result.top(1)["effect"].iloc[0] == table["effect"].min()


def test_restoring_every_cross_attention_head_from_the_clean_rows_draws_the_clean_images(toy):
    sites = head_sites(toy, text=False)
    parts = family_of(toy).parts(toy)
    clean = family_of(toy).encode(toy, ["an apple"])
    other = family_of(toy).encode(toy, ["a blue car"])
    sampler = Sampler(toy, 1, 0, 2, 5.0)
    everything = torch.tensor([[[False]], [[True]]]).expand(2, 1, 128)
    pairs = [(parts[s.parts[0]], _head_hook(everything, torch.tensor([0, 0]))) for s in sites.values()]
    with hooked(pairs, pre=True):
        restored = sampler.draw(Conditioning.cat([clean, other]))  # the UNet sees text only there
    assert restored[0].tobytes() == restored[1].tobytes()
    assert restored[1].tobytes() != sampler.draw(other)[0].tobytes()


def test_restore_mode_measures_text_heads_from_the_corrupted_run(toy):
    result = attribute(toy, "apple", layers=["text.5"], mode="restore", n=1, steps=2)
    assert len(result.table) == 12 and set(result.table["component"]) == {"text"}
    assert result.baseline < result.clean
    assert result.table["effect"].map(math.isfinite).all()
    assert result.top(1)["effect"].iloc[0] == result.table["effect"].max()


def test_the_head_ablation_applies_and_removes_itself_exactly_and_saves(toy, tmp_path):
    state, hooked_before = state_of(toy), hooks(toy)
    clean = generate(toy, ["an apple"], steps=2)[0].tobytes()
    off = ablate_heads(toy, "apple", {"unet.mid.0": [0, 1, 2], "unet.up.1.1": range(32)})
    with off.apply(toy):
        assert [e.kind for e in applied(toy)] == ["heads"]
        assert generate(toy, ["an apple"], steps=2)[0].tobytes() != clean
    assert applied(toy) == [] and hooks(toy) == hooked_before and same_state(toy, state)
    assert generate(toy, ["an apple"], steps=2)[0].tobytes() == clean
    assert off.summary()["units"].tolist() == [3, 32]
    again = load(off.save(tmp_path / "heads.safetensors"))
    assert isinstance(again, HeadAblation) and again.params["heads"] == off.params["heads"]
    assert all(torch.equal(again.tensors[p], off.tensors[p]) for p in off.tensors)


def test_ablate_heads_without_heads_zeroes_the_heads_whose_ablation_lowers_the_concept(toy, monkeypatch):
    found = attribute(toy, "apple", layers="unet.mid.0", n=1, steps=2)
    monkeypatch.setattr(workbench.heads, "attribute", lambda *args, **kwargs: found)
    off = ablate_heads(toy, "apple", top=3)
    assert off.params["heads"] == found.heads(3)
    assert all(h in found.top(3)["head"].tolist() for h in off.params["heads"]["unet.mid.0"])


def test_bad_input_is_named_with_what_is_valid_and_leaves_the_pipeline_unchanged(toy):
    state, before = state_of(toy), hooks(toy)
    with pytest.raises(ValueError, match="'unet.mid.9': no such attention layer; layers with heads: text.0, .*unet.up.1.1"):
        attribute(toy, "apple", layers=["unet.mid.9"])
    with pytest.raises(ValueError, match="head 32 of unet.mid.0: it has heads 0..31"):
        HeadAblation.of(toy, "apple", {"unet.mid.0": [1, 32]})
    with pytest.raises(ValueError, match="no such attention layer; layers with heads"):
        ablate_heads(toy, "apple", {"unet.mid": [0]})
    with pytest.raises(ValueError, match="at least 1, not 0"):
        attribute(toy, "apple", n=0)
    with pytest.raises(ValueError, match="unknown mode 'zap'; modes: ablate, restore"):
        attribute(toy, "apple", mode="zap")
    with pytest.raises(ValueError, match="'unicorn' is not in the concept set.*concepts: .*apple"):
        attribute(toy, "unicorn")
    with pytest.raises(ValueError, match="no heads to ablate"):
        HeadAblation.of(toy, "apple", {"unet.mid.0": []})
    assert hooks(toy) == before and same_state(toy, state) and applied(toy) == []


def test_toy_dit_heads_span_both_streams_of_a_joint_block_and_the_heads_of_a_single_block(toy_dit):
    sites = head_sites(toy_dit)
    assert [s for s in sites if s.startswith("text")] == [f"text{e}.{i}" for e in ("", "2") for i in range(6)]
    assert sites["dit.0"].parts == ("dit.0.img.out", "dit.0.text.out") and sites["dit.0"].heads == 4
    parts = ["dit.0.img.out", "dit.0.text.out", "dit.single.0.out"]
    off = HeadAblation.of(toy_dit, "apple", {"dit.0": [1], "dit.single.0": [2]})
    before = inputs_of(toy_dit, parts, lambda: one_denoiser_call(toy_dit))
    after = inputs_of(toy_dit, parts, lambda: one_denoiser_call(toy_dit), off)
    for part in parts[:2]:
        assert torch.all(after[part][..., 32:64] == 0) and torch.equal(after[part][..., :32], before[part][..., :32])
    single = after["dit.single.0.out"]
    assert single.shape[-1] == 640 and torch.all(single[..., 64:96] == 0)
    assert single[..., 128:].abs().sum() > 0  # the MLP's columns are not heads
    result = attribute(toy_dit, "apple", layers=["dit.0", "dit.single.0"], n=1, steps=2)
    assert len(result.table) == 8 and set(result.table["component"]) == {"dit"}
    assert result.table["effect"].map(math.isfinite).all()
