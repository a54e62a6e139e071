"""Attention maps, causal tracing, landing spaces and layer sweeps on the transformer families (FLUX, SD 3)."""
import numpy as np
import pytest
import torch
from conftest import family_state, same_family_state

import workbench
from workbench.anatomy import parts, select
from workbench.attnmaps import _projections, _rotary, attention_maps, cross_attention_layers
from workbench.concepts import ConceptSet
from workbench.embed import conditioning, embed, embed_rows, spaces
from workbench.families import family_of
from workbench.hooks import processors
from workbench.judges import ClipJudge, tiny_clip
from workbench.sampling import generate
from workbench.sweep import _layer_runs, layer_sweep, layers, selectors
from workbench.tracing import Text, encoder_effects, encoder_positions, sites, trace

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    return ClipJudge.load(tiny_clip(tmp_path_factory.mktemp("clip")))


def processors_of(pipe) -> dict:
    return {name: m.processor for name, m in cross_attention_layers(pipe).items()}


def test_attention_maps_cover_every_joint_and_single_block_and_leave_the_image_as_it_was(dit):
    saved = processors_of(dit)
    maps = attention_maps(dit, "a photo of an apple", "apple", steps=2)
    expected = ["dit.0", "dit.1"] + (["dit.single.0", "dit.single.1"] if family_of(dit).name == "flux" else [])
    assert list(maps.layers) == expected
    assert maps.total.shape == (maps.image.height, maps.image.width)
    assert all(0 < m.mean() < 1 for m in maps.layers.values())
    assert maps.image.tobytes() == generate(dit, ["a photo of an apple"], steps=2)[0].tobytes()
    assert all(m.processor is saved[name] for name, m in cross_attention_layers(dit).items())


def test_the_recorded_probabilities_times_the_values_are_the_processors_own_attention(dit):
    errors = []

    class Check:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            rope = () if image_rotary_emb is None else (image_rotary_emb,)
            out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *rope)
            q, k = _projections(attn, hidden_states)
            v = attn.to_v(hidden_states).unflatten(-1, (-1, q.shape[-1]))
            if encoder_hidden_states is not None:
                cq, ck = _projections(attn, encoder_hidden_states, added=True)
                cv = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, q.shape[-1]))
                q, k, v = torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1)
            if image_rotary_emb is not None:
                q, k = _rotary(q, image_rotary_emb), _rotary(k, image_rotary_emb)
            q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))
            mixed = ((q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1) @ v).transpose(1, 2).flatten(2)
            if encoder_hidden_states is None:
                errors.append(float((mixed - out).abs().max()))
            else:
                image = mixed[:, encoder_hidden_states.shape[1]:]
                errors.append(float((attn.to_out[0](image) - out[0]).abs().max()))
            return out

    with torch.no_grad(), processors(cross_attention_layers(dit), lambda name, inner: Check(inner)):
        generate(dit, ["an apple"], steps=1)
    assert errors and max(errors) < 1e-5


def test_tracing_sites_cover_every_encoders_layers_and_every_block_and_each_stream(flux, sd3):
    assert sites(flux) == ["text.0", "text.1", "text2.0", "text2.1", "dit.0", "dit.1", "dit.single.0", "dit.single.1"]
    assert sites(sd3) == ["text.0", "text.1", "text2.0", "text2.1", "text3.0", "text3.1", "dit.0", "dit.1"]
    assert sites(sd3, streams=True)[-5:] == ["dit.0", "dit.0.img", "dit.0.text", "dit.1", "dit.1.img"]
    assert "dit.single.0.text" in sites(flux, streams=True) and "dit.single.1.text" not in sites(flux, streams=True)


def test_the_concept_is_corrupted_in_each_encoders_own_tokens(flux):
    positions = encoder_positions(flux, "a photo of an apple", "apple")
    assert positions["text2"] == workbench.embed.word_positions(flux, "a photo of an apple", "apple")
    text = Text(flux, "a photo of an apple", positions, n=1, noise=3.0, seed=0)
    clip, t5 = text.corrupted(encoders=["text"]), text.corrupted(encoders=["text2"])
    assert torch.equal(clip.tokens, text.clean.tokens) and not torch.equal(clip.pooled, text.clean.pooled)
    assert not torch.equal(t5.tokens, text.clean.tokens) and torch.equal(t5.pooled, text.clean.pooled)
    assert torch.equal(text.corrupted("text2.1", list(range(text.clean.shape[1]))).tokens, text.clean.tokens)


def test_a_trace_restores_every_layer_block_and_stream_and_leaves_the_model_as_it_was(dit, judge):
    cs = ConceptSet.of(objects=["apple", "car"])
    state, saved = family_state(dit), processors_of(dit)
    blocks = [s for s in sites(dit, streams=True) if s.startswith("dit.")]
    t = trace(dit, "apple", "a photo of an apple", judge, concept_set=cs, n=1, steps=2,
              sites=sites(dit)[:1] + blocks, tokens=True)
    assert t.layers()["site"].tolist() == sites(dit)[:1] + blocks
    assert set(t.table["kind"]) == {"text", "token", "dit"} and t.token_grid().shape[0] == 1
    assert t.table["probability"].between(0, 1).all()
    effects = encoder_effects(dit, "apple", "a photo of an apple", judge, concept_set=cs, n=1, steps=2)
    assert effects["corrupted"].tolist() == ["none", "all", *family_of(dit).encoders(dit)]
    assert same_family_state(dit, state) and processors_of(dit) == saved
    assert not any(m._forward_hooks for m in family_of(dit).blocks(dit).values())
    with pytest.raises(ValueError, match="no such site.*dit.0.img"):
        trace(dit, "apple", "a photo of an apple", judge, concept_set=cs, sites=["dit.0.ffn"])


def test_restoring_a_block_from_the_clean_run_in_every_copy_of_the_batch(dit):
    from workbench.tracing import _block_restorer
    text, image = torch.arange(4.0).reshape(4, 1), -torch.arange(4.0).reshape(4, 1)
    both = _block_restorer([1], [0], 2, (0, 1))(None, (), (text, image))
    assert both[0].flatten().tolist() == [0, 0, 2, 2] and both[1].flatten().tolist() == [0, 0, -2, -2]
    one = _block_restorer([1], [0], 4, (1,))(None, (), (None, image))
    assert one[0] is None and one[1].flatten().tolist() == [0, 0, -2, -3]


def test_landing_spaces_are_the_conditioning_each_encoders_layers_and_the_context_embedder(flux, sd3):
    assert spaces(flux) == ["text", "text.0", "text.1", "text2.0", "text2.1", "dit.context.proj"]
    assert spaces(sd3) == ["text", "text.0", "text.1", "text2.0", "text2.1", "text3.0", "text3.1", "dit.context.proj"]
    with pytest.raises(ValueError, match="own text stream.*Spaces of this model: text, .*dit.context.proj"):
        embed(flux, "apple", space="dit.0.text.k")
    with pytest.raises(ValueError, match="pooled text vector"):
        embed(flux, "apple", space="dit.pooled.in")


@pytest.mark.parametrize("space", ["text", "text2.1", "dit.context.proj"])
@pytest.mark.parametrize("pool", ["mean", "concept"])
def test_embed_works_in_the_conditioning_a_t5_layer_and_the_context_embedder(dit, space, pool):
    space = "text3.1" if space == "text2.1" and family_of(dit).name == "sd3" else space
    out = embed(dit, ["apple", "car"], space=space, pool=pool, template="a photo of {}")
    assert out.shape[0] == 2 and np.isfinite(out).all() and not np.allclose(out[0], out[1])


def test_the_context_space_is_the_token_rows_projected_through_its_linear_and_pooled(dit):
    words = ["apple", "red car"]
    cond = conditioning(dit, words)
    ids = {e: family_of(dit).tokenize(dit, words, encoder=e) for e, _ in family_of(dit).row_segments(dit)}
    mask = torch.cat([m for _, m in ids.values()], 1).float()
    linear = parts(dit)["dit.context.proj"]
    with torch.no_grad():
        projected = linear(cond.tokens[:, :mask.shape[1]])
    expected = (projected * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    np.testing.assert_allclose(embed(dit, words, space="dit.context.proj"), expected.numpy(), rtol=1e-5, atol=1e-6)
    rows = embed_rows(dit, cond.tokens, words, space="dit.context.proj")
    np.testing.assert_allclose(rows, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_a_sweep_cell_selects_the_blocks_stream_and_kind_of_matrix(flux, sd3):
    assert selectors(flux, "dit.0", "img.attn") == ["dit.0.img.[qkv]", "dit.0.img.out"]
    assert select(flux, selectors(flux, "dit.0", "text.ffn")) == ["dit.0.text.ffn.in", "dit.0.text.ffn.out"]
    assert select(flux, selectors(flux, "dit.single.1", "attn")) == [f"dit.single.1.{m}" for m in "qkv"]
    assert selectors(flux, "dit.single.1", "single.q") == ["dit.single.1.q"]
    assert selectors(flux, "dit.single.1", "img.ffn") == []
    assert selectors(sd3, "dit.1", "text.attn") == ["dit.1.text.[qkv]"]  # SD 3's last text stream ends at attention
    assert selectors(sd3, "dit.1", "text.ffn") == []
    runs = _layer_runs(sd3, "apple", "esd", ["img.attn", "text.ffn"], False, (0,), None)
    assert [(r.layer_name, r.component) for r in runs] == [("dit.0", "img.attn"), ("dit.0", "text.ffn"),
                                                           ("dit.1", "img.attn")]
    cumulative = _layer_runs(flux, "apple", "esd", ["ffn"], True, (0,), None)
    assert select(flux, list(cumulative[-1].selectors)) == select(flux, [f"dit.{i}.{s}.ffn" for i in (0, 1)
                                                                         for s in ("img", "text")]
                                                                  + ["dit.single.0.ffn", "dit.single.1.ffn"])
    with pytest.raises(ValueError, match="component 'mlp' matches nothing.*img.ffn.*a group: img.attn"):
        _layer_runs(flux, "apple", "esd", ["mlp"], False, (0,), None)


def test_an_esd_sweep_over_attention_and_ffn_of_each_stream_edits_what_each_row_says(dit):
    state = family_state(dit)
    walked = layers(dit, "esd")
    block = [b for b in walked if not b.startswith("dit.single.")][-1]  # the last double block
    table = layer_sweep(dit, "apple", "esd", ["img.attn", "img.ffn", "text.attn"], layers=[walked.index(block)],
                        measure=False, progress=False, iterations=1, sample_steps=2)
    edited = {row.component: set(row.parts_edited) for row in table.itertuples()}
    assert edited["img.attn"] == {f"{block}.img.{m}" for m in "qkv"} | {f"{block}.img.out"}
    assert edited["img.ffn"] == {f"{block}.img.ffn.in", f"{block}.img.ffn.out"}
    assert all(p.startswith(f"{block}.text.") for p in edited["text.attn"]) and (table["dW"] > 0).all()
    assert same_family_state(dit, state)
