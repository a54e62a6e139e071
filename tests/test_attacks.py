import pandas as pd
import pytest
import torch

from conftest import same_state, state_of
from workbench import plots
from workbench.anatomy import parts, select
from workbench.attacks import ATTACKS, attack, budget_curve, unattacked
from workbench.attacks.table import across_concepts, attack_edit, concept_differences, summary
from workbench.attacks.common import SoftTokens, original_weights, slot
from workbench.attacks.unlearndiff import Vocabulary
from workbench.edits import Edit
from workbench.embed import encode
from workbench.methods import erase
from workbench.methods.uce import XATTN
from workbench.store import saved
from workbench.toy import TOY_CONCEPTS

#: The smallest budgets that still run every step of each attack.
TINY = {"derived": None, "inversion": 2, "unlearndiff": 2, "concept_vector": 2}


@pytest.fixture(scope="module")
def edits(toy):
    return {"uce": erase(toy, "apple", "uce"), "fewshot": erase(toy, "apple", "fewshot", progress=False)}


def test_soft_tokens_holding_a_real_token_encode_exactly_like_the_prompt(toy):
    table = toy.text_encoder.get_input_embeddings().weight
    apple = toy.tokenizer("apple", add_special_tokens=False).input_ids
    soft = SoftTokens(toy, ["a photo of an {}", "{} by seurat"], table[apple].detach())
    with torch.no_grad():
        got = soft.encode().tokens.float()
    want = encode(toy, ["a photo of an apple", "apple by seurat"])
    assert torch.allclose(got, want, atol=1e-5)


def test_slot_replaces_whole_words_only():
    assert slot("a cat by seurat", "cat") == "a {} by seurat"
    assert slot("a catalogue of a cat", "cat") == "a catalogue of a {}"
    with pytest.raises(ValueError, match="does not contain the concept"):
        slot("a dog", "cat")


def test_the_derived_attack_is_the_closed_form_against_the_final_weights(toy, edits):
    edit = edits["uce"]
    names = select(toy, XATTN)
    before = {n: parts(toy)[n].weight.detach().clone() for n in names}
    with edit.apply(toy):
        crafted = ATTACKS["derived"](toy, "apple", TOY_CONCEPTS)
        assert all(torch.equal(original_weights(toy, [n])[n], before[n].float()) or
                   torch.allclose(original_weights(toy, [n])[n], before[n].float(), atol=1e-6) for n in names)
        after = {n: parts(toy)[n].weight.detach().double() for n in names}
    d = crafted.embeds.shape[-1]
    A = sum(W.T @ W for W in after.values()) + 1e-3 * torch.eye(d, dtype=torch.float64)
    B = sum(after[n].T @ before[n].double() for n in names)
    c = encode(toy, ["an apple", "a blue apple", "an apple by seurat"]).double()
    want = c @ torch.linalg.solve(A, B).T
    assert torch.allclose(crafted.embeds.double(), want, rtol=1e-4, atol=1e-4)
    assert crafted.prompts == ["derived from: an apple", "derived from: a blue apple", "derived from: an apple by seurat"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["uce", "fewshot"])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_every_attack_runs_on_every_kind_of_edit_and_leaves_the_pipeline_exact(toy, oracle, edits, method, name):
    state = state_of(toy)
    result = attack(toy, edits[method], "apple", oracle, name, budget=TINY[name], eval_seeds=[7000])
    assert same_state(toy, state)
    assert len(result.images) == len(result.table) == 3 and result.table["seed"].eq(7000).all()
    assert result.table["label"].isin(TOY_CONCEPTS.labels("object")).all()
    assert result.rate.n == 3 and result.rate.lo <= result.rate.rate <= result.rate.hi
    assert torch.isfinite(result.crafted.embeds).all() and result.crafted.embeds.shape[0] == 3


def test_unlearndiff_projects_its_prefix_onto_real_tokens(toy, edits):
    vocab = Vocabulary(toy)
    with edits["uce"].apply(toy):
        crafted = ATTACKS["unlearndiff"](toy, "apple", TOY_CONCEPTS, budget=2)
    prefix = crafted.info["prefix"]
    assert crafted.prompts[0] == f"{prefix} an apple"
    assert len(toy.tokenizer(prefix, add_special_tokens=False).input_ids) >= 5
    v = torch.randn(5, 384, generator=torch.Generator().manual_seed(0))
    table = toy.text_encoder.get_input_embeddings().weight.detach()
    ids = vocab.nearest(v)
    assert torch.equal(vocab.project(v), table[ids]) and not set(ids.tolist()) & set(toy.tokenizer.all_special_ids)


@pytest.mark.slow
def test_unattacked_rows_measure_the_edit_and_the_unedited_model_on_the_same_prompts(toy, oracle, edits):
    rows, images = unattacked(toy, edits["uce"], "apple", oracle, eval_seeds=[7000])
    assert [len(images[k]) for k in ("unedited", "none")] == [3, 3]
    assert rows.groupby("attack")["prompt"].apply(list).to_dict() == {
        "none": ["an apple", "a blue apple", "an apple by seurat"],
        "unedited": ["an apple", "a blue apple", "an apple by seurat"]}
    assert rows.loc[rows["attack"] == "unedited", "hit"].all()


def test_bad_input_is_refused_with_what_is_valid_and_changes_nothing(toy, oracle, edits):
    state = state_of(toy)
    other = Edit({"unet.mid.0.xattn.k.weight": torch.zeros(3, 3)}, "uce", "apple")
    with pytest.raises(ValueError, match="made for another model"):
        attack(toy, other, "apple", oracle, "derived")
    with pytest.raises(ValueError, match="its concepts: apple, banana"):
        attack(toy, edits["uce"], "snoopy", oracle, "derived")
    with pytest.raises(ValueError, match="budget must be a positive whole number"):
        attack(toy, edits["uce"], "apple", oracle, "inversion", budget=0)
    with pytest.raises(ValueError, match="choose one of derived, inversion, unlearndiff, concept_vector"):
        attack(toy, edits["uce"], "apple", oracle, "jailbreak")
    with pytest.raises(ValueError, match="also an evaluation seed"):
        attack(toy, edits["uce"], "apple", oracle, "derived", seed=7000)
    with pytest.raises(TypeError, match="its options: tokens, lr, batch"):
        attack(toy, edits["uce"], "apple", oracle, "inversion", budget=1, eval_seeds=[7000], colour="red")
    assert same_state(toy, state)


@pytest.mark.slow
def test_the_attack_panel_shows_what_came_back_with_its_rates(toy, oracle):
    from workbench.widgets import AttackPanel
    panel = AttackPanel(toy, oracle, concept="apple", method="uce", attack="derived", seeds=1)
    assert panel.error is None, panel.error
    rates = panel.result["rates"].set_index("attack")
    assert list(rates.index) == ["unedited", "none", "derived"] and (rates["n"] == 3).all()
    assert "derived on apple:" in panel.status.value and len(panel.output.outputs) == 3
    with pytest.raises(ValueError, match="attack cannot be 'jailbreak'; choose from derived, inversion"):
        panel.set(attack="jailbreak")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["inversion", "unlearndiff"])
def test_a_budget_curve_judges_each_budget_exactly_as_a_run_to_that_budget(toy, oracle, edits, name):
    state = state_of(toy)
    alone = attack(toy, edits["uce"], "apple", oracle, name, budget=2, eval_seeds=[7000])
    curve = budget_curve(toy, edits["uce"], "apple", oracle, name, [3, 2], eval_seeds=[7000])
    assert same_state(toy, state)
    assert [r.budget for r in curve] == [2, 3] and [r.crafted.info["steps"] for r in curve] == [2, 3]
    assert torch.equal(curve[0].crafted.embeds, alone.crafted.embeds)
    assert curve[0].crafted.prompts == alone.crafted.prompts
    assert curve[0].table["hit"].tolist() == alone.table["hit"].tolist()
    assert curve[1].crafted.info["loss_last"] != curve[0].crafted.info["loss_last"]  # a step more was taken
    assert 0 < curve[0].seconds < curve[1].seconds


def test_checkpoints_outside_the_budget_are_refused(toy, edits):
    with edits["uce"].apply(toy), pytest.raises(ValueError, match=r"checkpoints must be whole numbers of steps in 1..2"):
        ATTACKS["inversion"](toy, "apple", TOY_CONCEPTS, budget=2, checkpoints=[5])


@pytest.mark.slow
def test_an_attack_table_row_says_the_budget_each_attack_ran_at(toy, oracle, edits):
    rows, crafted = attack_edit(toy, edits["uce"], oracle, "apple", ["derived", "concept_vector", "inversion"],
                                {"inversion": [1, 2], "concept_vector": 2}, eval_seeds=[7000])
    budgets = rows.groupby("attack", sort=False)["budget"].apply(lambda b: sorted(b.dropna().unique().tolist()))
    assert budgets.to_dict() == {"unedited": [], "none": [], "derived": [], "concept_vector": [2], "inversion": [1, 2]}
    assert set(crafted) == {("derived", None), ("concept_vector", 2), ("inversion", 1), ("inversion", 2)}
    assert crafted[("inversion", 1)]["prompts"] == ["a <v>", "a blue <v>", "a <v> by seurat"]


def unit_table(rates: dict[str, tuple[float, float]], seeds: int = 3, prompts: int = 4) -> pd.DataFrame:
    """Image rows of two methods a and b: per concept, the share of images with a hit under each."""
    rows = []
    for concept, (ra, rb) in rates.items():
        for method, r in (("a", ra), ("b", rb)):
            hits = [i < round(r * seeds * prompts) for i in range(seeds * prompts)]
            rows += [dict(method=method, concept=concept, attack="inversion", seed=7000 + i // prompts,
                          prompt=f"{method} crafted {i}", hit=h) for i, h in enumerate(hits)]
    return pd.DataFrame(rows)


def test_per_concept_differences_show_which_way_each_concept_goes_and_pool_over_concepts():
    agree = unit_table({f"c{i}": (0.75, 0.25) for i in range(6)})
    d = concept_differences(agree, "a", "b", "inversion")
    assert list(d["concept"]) == [f"c{i}" for i in range(6)] + ["pooled"]
    assert (d["difference"].round(6) == 0.5).all() and (d["direction"] == "a higher").all()
    assert d.iloc[-1]["n"] == 72 and d.iloc[-1]["p"] < 0.01
    split = unit_table({**{f"up{i}": (1.0, 0.0) for i in range(3)}, **{f"down{i}": (0.0, 1.0) for i in range(3)}})
    d = concept_differences(split, "a", "b", "inversion")
    assert list(d["direction"][:6]) == ["a higher"] * 3 + ["b higher"] * 3
    pooled = d.iloc[-1]
    assert pooled["difference"] == 0 and pooled["direction"] == "not significant"
    # concepts that disagree widen the pooled interval far beyond one concept's images
    assert pooled["lo"] < -0.3 and pooled["hi"] > 0.3
    with pytest.raises(ValueError, match="has methods a, b"):
        concept_differences(split, "a", "rece", "inversion")
    verdicts = [across_concepts(t, "a", "b")["verdict"].item() for t in (agree, split, unit_table({"c": (1.0, 0.0)}))]
    assert verdicts == ["a higher", "depends on the concept", "too few concepts (1) to pool"]


def test_the_forest_plot_has_a_row_per_concept_and_the_pooled_estimate():
    d = concept_differences(unit_table({f"c{i}": (0.5 + i / 20, 0.5) for i in range(6)}), "a", "b", "inversion")
    fig = plots.forest(d, "a - b")
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == [f"c{i}" for i in range(6)] + ["pooled over concepts"]
    assert len(fig.axes[0].patches) == 1  # the pooled diamond


def test_the_budget_curves_have_a_line_per_method_and_a_panel_per_attack():
    t = pd.concat([unit_table({f"c{i}": (b / 100, b / 200) for i in range(5)}).assign(budget=b)
                   for b in (25, 50, 100)], ignore_index=True)
    s = summary(t, ("method", "attack", "budget"))
    assert s[["method", "budget"]].values.tolist() == [["a", 25], ["a", 50], ["a", 100], ["b", 25], ["b", 50], ["b", 100]]
    fig = plots.budget_curves(s)
    assert len(fig.axes) == 1 and len(fig.axes[0].lines) == 2
    assert fig.axes[0].lines[0].get_xdata().tolist() == [25, 50, 100]


def test_saved_attack_rows_are_found_through_the_package_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    table = saved("attacks_toy")
    assert table["concept"].nunique() == 20 and table["budget"].dtype == "Int64"
    with pytest.raises(FileNotFoundError, match="saved: .*attacks_toy"):
        saved("attacks_sd")
