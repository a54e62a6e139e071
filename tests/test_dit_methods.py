"""The trained methods (ESD, few-shot unlearning) and the attacks on the transformer families (FLUX.1 and
SD 3), on their tiny pipelines: the presets, exact revert, FLUX-dev's distilled guidance, every text
encoder, bfloat16, and every attack leaving the model as it was."""
import pytest
import torch
from PIL import Image

import workbench
from conftest import family_state, same_family_state
from workbench.anatomy import component_of, select
from workbench.attacks import ATTACKS, attack
from workbench.attacks.common import SoftTokens, vocabulary_encoders
from workbench.attacks.unlearndiff import Vocabulary
from workbench.concepts import ConceptSet
from workbench.embed import conditioning
from workbench.families import Conditioning, family_of
from workbench.judges import ClipJudge, tiny_clip
from workbench.methods import esd, fewshot
from workbench.methods.esd import DIT_PRESETS, preset_parts, presets
from workbench.sampling import generate_from

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    return ClipJudge.load(tiny_clip(tmp_path_factory.mktemp("clip")))


def images() -> list[Image.Image]:
    return [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (30, 200, 30))]


def test_esd_presets_on_a_transformer_train_the_joint_blocks_text_stream(dit):
    assert presets(dit) is DIT_PRESETS
    every = select(dit, "dit.*")
    text = [n for n in every if component_of(n) in ("text.q", "text.k", "text.v", "text.out")]
    assert preset_parts(dit, "esd-all") == every
    assert preset_parts(dit, "esd-x") == text and all(n.split(".")[1].isdigit() for n in text)
    assert preset_parts(dit, "esd-x-strict") == select(dit, ["dit.*.text.k", "dit.*.text.v"]) \
        == ["dit.0.text.k", "dit.0.text.v", "dit.1.text.k", "dit.1.text.v"]
    assert set(preset_parts(dit, "esd-u")) == set(every) - set(text)
    assert {"dit.context.proj", "dit.0.img.q", "dit.0.text.ffn.in"} <= set(preset_parts(dit, "esd-u"))
    with pytest.raises(ValueError, match=rf"\({family_of(dit).name}\).*esd-x: the text-stream attention.*dit\.\*\.text"):
        esd(dit, "apple", preset="esd-xl")
    with pytest.raises(ValueError, match="ESD trains transformer parts.*text-encoder parts.*fewshot.*dit"):
        esd(dit, "apple", parts="text.*.ffn")


def test_an_esd_edit_of_a_transformer_is_made_without_touching_it_and_reverts_exactly(dit):
    state = family_state(dit)
    edit = esd(dit, "apple", preset="esd-x", iterations=2, sample_steps=3, lr=1e-3, progress=False)
    assert same_family_state(dit, state)
    assert sorted(edit.parts) == sorted(preset_parts(dit, "esd-x")) and edit.params["preset"] == "esd-x"
    assert all(d.dtype == torch.float32 and torch.isfinite(d).all() for d in edit.deltas.values())
    assert sum(float(d.norm()) for d in edit.deltas.values()) > 0
    with edit.apply(dit):
        assert not same_family_state(dit, state)
    assert same_family_state(dit, state)


def _calls(monkeypatch, pipe) -> list[tuple[int, float | None, bool]]:
    """Record every denoiser call of ``pipe``'s family: (batch, guidance, with trained weights)."""
    family = family_of(pipe)
    calls, denoise = [], family.denoise

    def spy(pipe, latents, t, cond, params=None, guidance=None):
        calls.append((len(latents), guidance, bool(params)))
        return denoise(pipe, latents, t, cond, params, guidance)

    monkeypatch.setattr(family, "denoise", spy)
    return calls


def test_esd_samples_flux_dev_in_one_pass_with_its_distilled_guidance(flux, monkeypatch):
    assert family_of(flux).distilled(flux)
    calls = _calls(monkeypatch, flux)
    esd(flux, "apple", preset="esd-x-strict", iterations=4, sample_steps=4, sample_guidance=6.0, progress=False)
    sampling = [c for c in calls if c[1] is not None]
    assert sampling and all(c == (1, 6.0, True) for c in sampling)  # one branch, the distilled guidance
    # the rest: the frozen target (empty and concept, default guidance) and the trained prediction
    assert [c for c in calls if c[1] is None] == [(2, None, False), (1, None, True)] * 4


def test_esd_guidance_changes_a_flux_edit_through_the_distilled_input(flux):
    made = [esd(flux, "apple", preset="esd-x-strict", iterations=3, sample_steps=4, sample_guidance=g, lr=1e-3,
                progress=False) for g in (1.0, 1.0, 8.0)]
    assert all(torch.equal(made[0].deltas[k], made[1].deltas[k]) for k in made[0].deltas)
    assert any(not torch.equal(made[0].deltas[k], made[2].deltas[k]) for k in made[0].deltas)


def test_esd_keeps_classifier_free_guidance_on_sd3(sd3, monkeypatch):
    assert not family_of(sd3).distilled(sd3)
    calls = _calls(monkeypatch, sd3)
    esd(sd3, "apple", preset="esd-x-strict", iterations=4, sample_steps=4, progress=False)
    assert all(c[1] is None for c in calls) and (2, None, True) in calls  # both branches in one trained pass


@pytest.mark.parametrize("name, parts, encoders", [
    ("flux", None, {"text", "text2"}), ("flux", "text.*.ffn", {"text"}), ("flux", "text2.*.ffn", {"text2"}),
    ("sd3", None, {"text", "text2", "text3"}), ("sd3", "text2.1.attn", {"text2"}),
    ("sd3", "text3.*.ffn", {"text3"}), ("sd3", ["text.*.ffn", "text3.*.ffn"], {"text", "text3"}),
])
def test_few_shot_unlearning_goes_through_clip_t5_or_both(request, name, parts, encoders):
    pipe = request.getfixturevalue(name)
    state = family_state(pipe)
    edit = fewshot(pipe, "apple", images=images(), steps=2, parts=parts, lr=1e-3, progress=False)
    assert {p.split(".")[0] for p in edit.parts} == encoders
    if parts is None:  # every encoder's FFNs and its last layer's attention, as on SDXL
        assert {"text.1.attn.k", "text2.0.ffn.in"} <= set(edit.parts)
    assert all(torch.isfinite(d).all() for d in edit.deltas.values())
    assert any(float(d.abs().max()) > 0 for d in edit.deltas.values())
    plain = conditioning(pipe, ["an apple"])
    with edit.apply(pipe):
        changed = conditioning(pipe, ["an apple"])
    assert not torch.equal(changed.pooled, plain.pooled) or not torch.equal(changed.tokens, plain.tokens)
    if (name, parts) == ("flux", "text.*.ffn"):  # FLUX's CLIP makes only the pooled vector
        assert torch.equal(changed.tokens, plain.tokens)
    assert same_family_state(pipe, state)


def test_few_shot_unlearning_refuses_transformer_parts(dit):
    with pytest.raises(ValueError, match="text encoders only.*transformer parts"):
        fewshot(dit, "apple", images=images(), parts="dit.*.text.k")


def test_soft_tokens_reach_every_encoder_and_projection_keeps_to_one_vocabulary(flux, sd3):
    assert vocabulary_encoders(flux) == ["text2"] and vocabulary_encoders(sd3) == ["text", "text2"]
    soft = SoftTokens(flux, ["a photo of {}"], torch.randn(1, 64))  # CLIP's 32 and T5's 32 side by side
    cond = soft.encode()
    weights = torch.randn(cond.pooled.shape[-1], generator=torch.Generator().manual_seed(0))
    (cond.tokens.sum() + (cond.pooled * weights).sum()).backward()  # a plain sum of CLIP's layer norm is constant
    clip, t5 = soft.vectors.grad[:, :32], soft.vectors.grad[:, 32:]
    assert float(clip.abs().sum()) > 0 and float(t5.abs().sum()) > 0
    vocab = Vocabulary(sd3)
    assert vocab.rows.shape[1] == 32 + 48 and vocab.encoders == ["text", "text2"]
    prefix = SoftTokens(sd3, ["{} an apple"], vocab.rows[:2], vocab.encoders)
    assert torch.equal(prefix.fixed["text3"][0], family_of(sd3).tokenize(sd3, ["an apple"], encoder="text3")[0])


@pytest.mark.parametrize("name", [n for n in ATTACKS if n != "derived"])
def test_every_attack_runs_on_a_transformer_edit_and_leaves_the_model_as_it_was(dit, judge, name):
    cs = ConceptSet.of(objects=["apple", "car"])
    state = family_state(dit)
    edit = esd(dit, "apple", preset="esd-x-strict", iterations=1, sample_steps=2, lr=1e-3, progress=False)
    result = attack(dit, edit, "apple", judge, name, 2, eval_seeds=[7000], concept_set=cs)
    embeds = result.crafted.embeds
    plain = conditioning(dit, ["an apple"])
    assert isinstance(embeds, Conditioning) and embeds.tokens.shape[1:] == plain.tokens.shape[1:]
    assert embeds.pooled.shape[1:] == plain.pooled.shape[1:] and torch.isfinite(embeds.tokens).all()
    assert len(result.table) == len(result.images) > 0
    assert all(im.size == (family_of(dit).image_size(dit),) * 2 for im in result.images)
    if name == "unlearndiff":
        assert isinstance(result.info["prefix"], str) and result.crafted.prompts[0].startswith(result.info["prefix"])
    assert same_family_state(dit, state)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_esd_and_few_shot_run_on_a_bfloat16_transformer_and_revert_exactly(request, name):
    pipe = workbench.load(request.getfixturevalue(f"tiny_{name}_dir"), dtype=torch.bfloat16)
    state = family_state(pipe)
    edits = [esd(pipe, "apple", preset="esd-x-strict", iterations=2, sample_steps=2, lr=1e-3, progress=False),
             fewshot(pipe, "apple", images=images(), steps=2, lr=1e-3, progress=False)]
    for edit in edits:
        assert all(torch.isfinite(d).all() and d.dtype == torch.float32 for d in edit.deltas.values())
        assert sum(float(d.norm()) for d in edit.deltas.values()) > 0
        with edit.apply(pipe):
            assert generate_from(pipe, conditioning(pipe, ["an apple"]), steps=2)[0].size == (32, 32)
    assert same_family_state(pipe, state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_esd_few_shot_and_the_attacks_run_on_a_half_precision_transformer_on_cuda(request, judge, name, dtype):
    pipe = workbench.load(request.getfixturevalue(f"tiny_{name}_dir"), dtype=dtype, device="cuda")
    state = family_state(pipe)
    edits = [esd(pipe, "apple", preset="esd-x", iterations=2, sample_steps=3, lr=1e-3, progress=False),
             fewshot(pipe, "apple", images=images(), steps=2, lr=1e-3, progress=False)]
    for edit in edits:
        assert all(d.is_cuda and d.dtype == torch.float32 and torch.isfinite(d).all() for d in edit.deltas.values())
        assert sum(float(d.norm()) for d in edit.deltas.values()) > 0
    cs = ConceptSet.of(objects=["apple", "car"])
    for attack_name in [n for n in ATTACKS if n != "derived"]:
        result = attack(pipe, edits[0], "apple", judge, attack_name, 2, eval_seeds=[7000], concept_set=cs)
        assert torch.isfinite(result.crafted.embeds.tokens).all() and len(result.table) > 0
    assert same_family_state(pipe, state)
