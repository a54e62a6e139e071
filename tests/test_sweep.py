import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import same_state, state_of
from workbench.anatomy import select
from workbench.grid import sweep_grid
from workbench.methods.fewshot import default_parts
from workbench.metrics import drift, evaluate
from workbench.plots import dw_per_layer, save, subset_bars, sweep_heatmap
from workbench.sweep import aggregate, ffn_vs_attention, finding, layer_sweep, layers
from workbench.toy import TOY_CONCEPTS


def _selected(pipe, part: str) -> set[str]:
    return set(select(pipe, part.split(" + ")))


@pytest.mark.slow
def test_uce_sweep_edits_one_cross_attention_matrix_per_run(toy):
    state = state_of(toy)
    table = layer_sweep(toy, "apple", method="uce", measure=False, progress=False)
    xattn = layers(toy, "uce")
    assert len(table) == 2 * len(xattn)
    for row in table.itertuples():
        assert row.parts_edited == (f"{xattn[row.layer]}.{row.component}",) == tuple(select(toy, row.part))
        assert row.dW > 0 and set(row.dW_by_layer) == {xattn[row.layer]}
    assert same_state(toy, state)


def test_fewshot_sweep_edits_only_the_named_part_and_cumulative_includes_earlier_layers(toy):
    state = state_of(toy)
    single = layer_sweep(toy, "cat", layers=[1, 3], measure=False, progress=False, steps=1)
    assert list(zip(single["layer"], single["component"])) == [(1, "ffn"), (1, "attn"), (3, "ffn"), (3, "attn")]
    for row in single.itertuples():
        assert set(row.parts_edited) == _selected(toy, row.part) == set(select(toy, f"text.{row.layer}.{row.component}"))
    cumulative = layer_sweep(toy, "cat", components="ffn", cumulative=True, layers=[2], seeds=(3,),
                             measure=False, progress=False, steps=1)
    row = cumulative.iloc[0]
    assert row["cumulative"] and row["seed"] == 3 and row["layer"] == 2
    assert set(row["parts_edited"]) == set(select(toy, ["text.0.ffn", "text.1.ffn", "text.2.ffn"]))
    assert list(row["dW_by_layer"]) == ["text.0", "text.1", "text.2"]
    assert same_state(toy, state)


def test_ffn_vs_attention_subsets_edit_what_they_say(toy):
    table = ffn_vs_attention(toy, ["car"], seeds=(0,), measure=False, progress=False, steps=1)
    edited = dict(zip(table["subset"], table["parts_edited"]))
    assert set(edited["ffn"]) == set(select(toy, "text.*.ffn"))
    assert set(edited["attn"]) == set(select(toy, "text.*.attn"))
    assert set(edited["ffn + last attn"]) == set(default_parts(toy))
    assert set(edited["all"]) == set(select(toy, "text.*"))
    assert table.set_index("subset").loc["ffn + last attn", "part"] == "text.*.ffn + text.5.attn"
    assert table["layer"].isna().all()


@pytest.mark.slow
def test_measured_rows(toy, oracle):
    table = layer_sweep(toy, "apple", method="uce", components=["xattn.v"], layers=[2], seeds=(0, 7),
                        judge=oracle, others=["banana", "car"], per_prompt=2, per_other=1, progress=False)
    for col in ("part", "component", "layer", "concept", "method", "efficacy", "preservation", "dW",
                "seconds", "seed", "drift", "drift_chance", "preservation_related", "preservation_unrelated"):
        assert col in table.columns
    assert list(table["seed"]) == [0, 7] and (table["method"] == "uce").all()
    assert table["efficacy"].between(0, 1).all() and table["drift"].between(0, 1).all()
    assert (table["n_images"] == 2).all() and (table["eval_seconds"] > 0).all()
    assert np.allclose(table["efficacy"], 1 - table["accuracy"])
    base = table.attrs["baselines"]["apple"]
    assert set(base["others"]) == {"banana", "car"} and table.attrs["base_seconds"] > 0
    # UCE is deterministic and so is the evaluation: the two seeds give the same row
    assert table.iloc[0]["efficacy"] == table.iloc[1]["efficacy"]


def test_evaluate_refuses_a_baseline_measured_otherwise(toy, oracle):
    before = {"settings": {"others": ["pear"], "per_prompt": 1, "per_other": 1, "seed": 0}}
    with pytest.raises(ValueError, match="other settings"):
        evaluate(toy, oracle, "apple", others=["banana"], per_prompt=1, per_other=1, seed=0, before=before)
    with pytest.raises(ValueError, match="own preservation set"):
        evaluate(toy, oracle, "apple", others=["apple"])


def test_default_others_are_related_then_unrelated():
    assert TOY_CONCEPTS.others("car") == ["truck", "boat", "airplane", "apple", "sun", "cat"]
    assert TOY_CONCEPTS.others("van gogh") == ["seurat", "mondrian", "picasso", "apple", "car", "sun"]


def test_drift_on_hand_made_predictions():
    labels = ["cat", "dog", "dog", "fish", "car", "apple", "cat", "sun"]
    d = drift(labels, "cat", TOY_CONCEPTS)
    assert d["drift"] == pytest.approx(3 / 8)  # dog, dog, fish
    assert d["drift_chance"] == pytest.approx(6 / 8 * 3 / 15)
    assert drift(["cat"] * 4, "cat", TOY_CONCEPTS) == {"drift": 0.0, "drift_chance": 0.0}
    assert all(math.isnan(v) for v in drift(["plain"] * 8, "seurat", TOY_CONCEPTS).values())


def _table(eff: dict[str, float], related_share: float = 0.3) -> pd.DataFrame:
    """Three seeds of each subset for apple and car, and a layer sweep; ``related_share`` of the images
    that left the concept went to a related object, the rest to an object of the other concept's group."""
    rows = []
    relative, stranger = {"apple": "pear", "car": "truck"}, {"apple": "truck", "car": "pear"}

    def labels(concept: str, e: float) -> list[str]:
        moved = round(e * 10)
        near = round(moved * related_share)
        return [concept] * (10 - moved) + [relative[concept]] * near + [stranger[concept]] * (moved - near)

    for concept in ("apple", "car"):
        for seed in (0, 1, 2):
            for subset, e in eff.items():
                rows.append(dict(concept=concept, seed=seed, subset=subset, part=subset, layer=None, layer_name="all",
                                 component=subset, cumulative=False, efficacy=round(e * 10) / 10, preservation=0.9,
                                 dW=1.0 + seed, seconds=1.0, n_images=10, drift=e * related_share,
                                 drift_chance=e * 3 / 15, labels=labels(concept, e),
                                 dW_by_layer={f"text.{i}": 0.1 * i for i in range(6)}))
    for i in range(6):
        for comp in ("ffn", "attn"):
            rows.append(dict(concept="apple", seed=0, subset="layer", part=f"text.{i}.{comp}", layer=i,
                             layer_name=f"text.{i}", component=comp, cumulative=False, efficacy=i / 6,
                             preservation=1.0, dW=1.0, seconds=1.0, n_images=10, drift=i / 6 * related_share,
                             drift_chance=i / 6 * 3 / 15, labels=labels("apple", i / 6),
                             dW_by_layer={f"text.{i}": 1.0}))
    table = pd.DataFrame(rows)
    table["layer"] = table["layer"].astype("Int64")
    return table


def test_finding_reads_the_table():
    holds = finding(_table({"ffn": 0.9, "attn": 0.2, "ffn + last attn": 0.9, "all": 0.95}, related_share=0.6),
                    TOY_CONCEPTS)
    assert "(a) Knowledge mainly in the FFNs: holds" in holds and "(b) Erased objects drift to related objects: holds" in holds
    fails = finding(_table({"ffn": 0.3, "attn": 0.3, "ffn + last attn": 0.5, "all": 0.9}, related_share=0.1),
                    TOY_CONCEPTS)
    assert "FFNs: does not hold" in fails and "related objects: does not hold" in fails
    assert "everything minus FFN only is +0.60" in fails
    with pytest.raises(ValueError, match="measure=True"):
        finding(pd.DataFrame({"subset": ["ffn"]}))


def test_finding_says_not_significant_when_the_runs_cannot_decide():
    table = _table({"ffn": 0.5, "attn": 0.3, "ffn + last attn": 0.5, "all": 0.6})
    ffn = table["subset"] == "ffn"
    table.loc[ffn, "efficacy"] = table.loc[ffn, "seed"].map({0: 0.1, 1: 0.9, 2: 0.5})  # mean 0.5, seeds disagree
    unsure = finding(table, TOY_CONCEPTS)
    assert "FFNs: not significant at n = 60 images per subset (6 concept x seed units)" in unsure


def test_aggregate_mean_and_std():
    agg = aggregate(_table({"ffn": 0.9, "attn": 0.2, "all": 0.95}).query("concept == 'apple'"), by="subset", values=["dW"])
    row = agg.set_index("subset").loc["ffn"]
    assert row["dW"] == pytest.approx(2.0) and row["dW_std"] == pytest.approx(1.0) and row["n"] == 3
    with pytest.raises(KeyError, match="no column"):
        aggregate(agg, values=["nope"])


@pytest.mark.parametrize("suffix", [".pdf", ".svg", ".png"])
def test_figures_save(tmp_path, suffix):
    table = _table({"ffn": 0.9, "attn": 0.2, "ffn + last attn": 0.9, "all": 0.95})
    for name, fig in (("heat", sweep_heatmap(table)), ("bars", subset_bars(table)), ("dw", dw_per_layer(table))):
        path = save(fig, tmp_path / f"{name}{suffix}")
        assert path.stat().st_size > 1000
    heat = sweep_heatmap(table)
    assert [t.get_text() for t in heat.axes[0].get_yticklabels()] == ["ffn", "attn"]
    with pytest.raises(ValueError, match="layer_sweep"):
        sweep_heatmap(table[table["layer"].isna()])


def test_bad_input_is_explained(toy):
    with pytest.raises(ValueError, match="unknown method 'ablate'.*rece, uce, fewshot, esd"):
        layer_sweep(toy, "apple", method="ablate", measure=False, progress=False)
    with pytest.raises(ValueError, match="unknown method 'ablate'.*rece, uce, fewshot, esd"):
        sweep_grid(toy, "apple", method="ablate")
    with pytest.raises(ValueError, match="component 'mlp' matches nothing.*attn, ffn"):
        layer_sweep(toy, "apple", components=["mlp"], measure=False, progress=False)
    with pytest.raises(ValueError, match="UCE edits the matrices that read text directly.*unet.down.1.0.ffn.in.*ESD"):
        layer_sweep(toy, "apple", method="uce", components=["ffn"], measure=False, progress=False)
    with pytest.raises(ValueError, match="layer index 6 is out of range"):
        layer_sweep(toy, "apple", layers=[6], measure=False, progress=False)
    with pytest.raises(ValueError, match="chooses `parts`"):
        layer_sweep(toy, "apple", parts="text.1.ffn", measure=False, progress=False)


def test_every_measurement_default_is_read_from_one_object():
    import inspect

    from workbench.grid import MEASURE
    from workbench.metrics import DEFAULTS, accuracy, predictions, preservation_sets
    from workbench.sweep import unet_subsets

    assert (DEFAULTS.per_prompt, DEFAULTS.per_other, DEFAULTS.seed, DEFAULTS.seeds) == (8, 4, 1234, (1234, 1235))
    for fn, names in ((predictions, dict(per_prompt="per_prompt", seed="seed")),
                      (accuracy, dict(per_prompt="per_prompt", seed="seed")),
                      (evaluate, dict(per_prompt="per_prompt", per_other="per_other", seed="seed")),
                      (preservation_sets, dict(per_concept="per_concept", seeds="seeds")),
                      *((f, dict(per_prompt="per_prompt", per_other="per_other", eval_seed="seed"))
                        for f in (layer_sweep, ffn_vs_attention, unet_subsets))):
        params = inspect.signature(fn).parameters
        assert {p: params[p].default for p in names} == {p: getattr(DEFAULTS, d) for p, d in names.items()}, fn
    assert MEASURE == dict(per_prompt=8, per_other=4, others=None, eval_seed=1234)


def test_the_sweep_pools_runs_into_concept_by_seed_cells_weighted_by_their_images():
    from workbench.sweep import _cells, subset_rates

    runs = pd.DataFrame({"subset": ["ffn"] * 3, "concept": ["b", "a", "b"], "seed": [0, 0, 0],
                         "efficacy": [0.5, 1.0, 0.25], "n_images": [8, 4, 4], "preservation": [1.0] * 3})
    cells = _cells(runs)
    assert cells.to_dict("index") == {("a", 0): {"sum": 4, "count": 4}, ("b", 0): {"sum": 5, "count": 12}}
    assert subset_rates(runs)[["k", "n", "units"]].values.tolist() == [[9, 16, 2]]
